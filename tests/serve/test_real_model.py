"""The real bundled model through HTTP, in the layout ray_config.yaml ships: it knows things."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from cluster.config import args_from_serve_config
from tests.serving import ONE_NODE, SharedServe

pytestmark = pytest.mark.slow  # the real model, served by the module's fixture (on the package's shared Ray)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_client(shared_serve: SharedServe, smollm2_dir: Path) -> openai.OpenAI:
    """The shipped Serve args, pointed at the fetched SmolLM2 GGUF folder; max_model_len from the model."""
    args = args_from_serve_config(ROOT / "ray_config.yaml")
    args.update(model=str(smollm2_dir))
    url = shared_serve.serve(ONE_NODE, {"gridserve": (args, {})})
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_capital_of_france(real_client: openai.OpenAI) -> None:
    """A greedy chat answer names Paris; the model's name and context length come from the GGUF."""
    model = real_client.models.list().data[0]
    assert model.id == "SmolLM2-135M-Instruct" and model.model_extra["max_model_len"] > 1024
    out = real_client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"  # the model's own EOS (<|im_end|>) ended it
