"""The real bundled model through HTTP, in the layout ray_config.yaml ships: it knows things."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cluster.config import args_from_serve_config
from tests.serving import serving

pytestmark = pytest.mark.slow  # a Ray cluster and a Serve start-up in the module's fixture, and the real model
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_client(smollm2_dir: Path) -> Iterator[openai.OpenAI]:
    """The shipped Serve args, pointed at the fetched SmolLM2 GGUF folder; max_model_len from the model."""
    args = args_from_serve_config(ROOT / "ray_config.yaml")
    args.update(model=str(smollm2_dir))
    with serving(args) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_capital_of_france(real_client: openai.OpenAI) -> None:
    """A greedy chat answer names Paris; the model's name and context length come from the GGUF."""
    model = real_client.models.list().data[0]
    assert model.id == "SmolLM2-135M-Instruct" and model.model_extra["max_model_len"] > 1024
    out = real_client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"  # the model's own EOS (<|im_end|>) ended it
