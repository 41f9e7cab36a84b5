"""Chat templates the HTTP tests give their tiny random models."""

# Hermes-style: tools listed in the system turn, calls as <tool_call>{...}</tool_call>, results as a user turn.
HERMES = ("{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}\n"
          "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>\n{% endif %}"
          "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>\n"
          "{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
          "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}</s>\n"
          "{% elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}</tool_response></s>\n"
          "{% else %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
