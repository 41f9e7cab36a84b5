"""Client side of `bench.peer --parts online`, run by the peer venv's python (never imported by the project): every
`vllm bench serve` run planned for one server start, in one process (vLLM's import costs ~15 s; paid once).

python bench/online_client.py PLAN.json  -> one line per run on stdout: "RESULT " + JSON (metrics or "error")

PLAN.json: {"runs": [{"tag": str, "args": [vllm bench serve arguments], "synth": null | {"path": JSONL to write,
"tokenizer": folder, "lengths": [[prompt tokens, output tokens], ...], "seed": int}}]}
"""
from __future__ import annotations

import json
import random
import re
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder leads sys.path, and its siblings (engine.py, common.py, ...) would shadow
# modules vLLM imports by those names.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def one_token_words(tok: Any) -> list[str]:
    """Words (a space, then 2+ lowercase letters) that the tokenizer encodes as exactly one token each, so that
    a string of n of them is n tokens long."""
    words = [w for w in (tok.decode([i]) for i in range(tok.vocab_size)) if re.fullmatch(r" [a-z]{2,}", w)]
    ids = tok(words, add_special_tokens=False)["input_ids"]
    return sorted({w for w, i in zip(words, ids) if len(i) == 1})


def exact_prompt(tok: Any, words: list[str], n: int, rng: random.Random) -> str:
    """Text of `n` tokens (random words; re-encoded and trimmed until the count is exact, or close after 8 tries)."""
    text = "".join(rng.choice(words) for _ in range(n))
    for _ in range(8):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) == n:
            break
        text = tok.decode(ids[:n]) if len(ids) > n else text + "".join(rng.choice(words) for _ in range(n - len(ids)))
    return text


def synthesize(spec: dict[str, Any], cache: dict[str, Any]) -> None:
    """Write the custom dataset JSONL of one mixed-length run: a prompt of each planned length, its output length."""
    from transformers import AutoTokenizer

    if spec["tokenizer"] not in cache:
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        cache[spec["tokenizer"]] = (tok, one_token_words(tok))
    tok, words = cache[spec["tokenizer"]]
    rng = random.Random(spec["seed"])
    with open(spec["path"], "w") as f:
        for prompt_len, output_len in spec["lengths"]:
            f.write(json.dumps({"prompt": exact_prompt(tok, words, prompt_len, rng), "output_tokens": output_len}))
            f.write("\n")


def main() -> None:
    """Run every planned client run; a failed run reports its error and the next one still runs."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plan = json.loads(Path(sys.argv[1]).read_text())
    cache: dict[str, Any] = {}
    for run in plan["runs"]:
        try:
            if run.get("synth"):
                synthesize(run["synth"], cache)
            parser = FlexibleArgumentParser()
            add_cli_args(parser)
            res = serve_main(parser.parse_args(run["args"]))
            out = {k: v for k, v in res.items() if isinstance(v, (int, float, str)) or v is None}
        except Exception as exc:  # the server died or refused: say so in the row, go on
            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps({"tag": run["tag"], **out}), flush=True)


if __name__ == "__main__":
    main()
