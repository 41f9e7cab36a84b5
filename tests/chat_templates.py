"""Chat templates the HTTP tests give their tiny random models, and a tiny model that renders tools with one."""
from __future__ import annotations

import json
from pathlib import Path

# Hermes-style: tools listed in the system turn, calls as <tool_call>{...}</tool_call>, results as a user turn.
HERMES = ("{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}\n"
          "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>\n{% endif %}"
          "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>\n"
          "{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
          "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}</s>\n"
          "{% elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}</tool_response></s>\n"
          "{% else %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tool_model(folder: Path, layers: int, seed: int) -> Path:
    """A tiny random Llama in `folder` whose tokenizer renders tools, calls and tool results with HERMES."""
    from transformers import AutoTokenizer

    from deployments.make_model import write_model

    path = write_model(folder, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, seed=seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = HERMES
    tok.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())  # older transformers keep it only here
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": HERMES}))
    return Path(path)
