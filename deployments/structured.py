"""Turn a request's structured-output fields (OpenAI's and vLLM's) into one grammar, checked up front."""
from __future__ import annotations

import json
from typing import Any

from cluster.request import RequestError
from cluster.structured import GrammarSpec
from deployments.openai_extras import ClientFields


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """A JSON schema as canonical text (the grammar cache key); a string must hold a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(schema, dict):
        raise RequestError(f"{param} must be a JSON schema object", param)
    return json.dumps(schema, separators=(",", ":"))  # key order kept: it is the order fields are generated in


def requested(body: ClientFields) -> list[tuple[str, GrammarSpec]]:
    """Every (param name, grammar) the request asks for, in any spelling."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", GrammarSpec("json_object", "")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise RequestError("response_format.json_schema.schema is required for type json_schema",
                             "response_format.json_schema")
        found.append(("response_format", GrammarSpec("json_schema", _schema_text(rf.json_schema.json_schema,
                                                                                   "response_format"))))
    if body.guided_json is not None:
        found.append(("guided_json", GrammarSpec("json_schema", _schema_text(body.guided_json, "guided_json"))))
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("lark", body.guided_grammar)))
    so = body.structured_outputs
    if so is not None:
        found += [("structured_outputs", spec) for spec in _structured_outputs(so)]
    return found


def _structured_outputs(so: Any) -> list[GrammarSpec]:
    """vLLM's `structured_outputs` object as grammars."""
    specs = []
    if so.json_ is not None:
        specs.append(GrammarSpec("json_schema", _schema_text(so.json_, "structured_outputs.json")))
    if so.regex is not None:
        specs.append(GrammarSpec("regex", so.regex))
    if so.choice is not None:
        specs.append(GrammarSpec("choice", json.dumps(so.choice)))
    if so.grammar is not None:
        specs.append(GrammarSpec("lark", so.grammar))
    if so.json_object:
        specs.append(GrammarSpec("json_object", ""))
    return specs


def checked(param: str, spec: GrammarSpec) -> GrammarSpec:
    """`spec` if llguidance can compile it; else a 400 naming `param` and why."""
    if spec.kind == "choice" and not all(json.loads(spec.text)):
        raise RequestError(f"{param}: every choice must be a non-empty string", param)
    error = spec.error()
    if error:
        raise RequestError(f"{param} cannot be enforced: {error.strip().splitlines()[0][:500]}", param)
    return spec


def grammar_of(body: ClientFields, tool_grammar: tuple[str, GrammarSpec] | None = None) -> GrammarSpec | None:
    """The one grammar the output must follow (None = free text); two constraints at once are a 400."""
    found = requested(body) + ([tool_grammar] if tool_grammar else [])
    if len(found) > 1:
        names = ", ".join(sorted({p for p, _ in found}))
        raise RequestError(f"give at most one output constraint; this request sets {names}", found[1][0])
    return checked(*found[0]) if found else None
