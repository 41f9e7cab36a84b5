"""Seeded random JSON schemas for structured-output property tests: nested objects, arrays, enums, required."""
from __future__ import annotations

import random
from typing import Any

WORDS = ["red", "green", "blue", "cat", "dog", "fox", "yes", "no", "a b", "x\"y"]


def leaf(rng: random.Random) -> dict[str, Any]:
    """A scalar schema whose instances are short (a random model must be able to finish them)."""
    kind = rng.choice(["integer", "string", "boolean", "enum", "null", "const"])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(WORDS)}
    return {"type": kind}


def random_schema(rng: random.Random, depth: int = 2) -> dict[str, Any]:
    """An object schema with up to 3 properties, some required, nested objects and bounded arrays."""
    props: dict[str, Any] = {}
    for i in range(rng.randint(1, 3)):
        roll = rng.random()
        if depth > 0 and roll < 0.25:
            props[f"o{i}"] = random_schema(rng, depth - 1)
        elif depth > 0 and roll < 0.45:
            items = random_schema(rng, depth - 1) if rng.random() < 0.3 else leaf(rng)
            props[f"a{i}"] = {"type": "array", "items": items, "minItems": rng.randint(0, 1), "maxItems": 3}
        else:
            props[f"p{i}"] = leaf(rng)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
