"""Multi-LoRA over HTTP with the official openai client: `model` selects an adapter (HF + peft's greedy tokens),
/v1/models lists adapters with their parent, vLLM's load/unload routes, bad adapters and unknown models refused."""
from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.lora_adapters import peft_greedy, write_adapter
from tests.serving import ONE_NODE, SharedServe

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
PROMPT = [3, 17, 5, 42, 8, 11, 2]
NEW = 6


@pytest.fixture(scope="module")
def adapters(chat_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter served from lora_modules, one to load at runtime, one too big for max_lora_rank."""
    root, model = tmp_path_factory.mktemp("loras"), Path(chat_model)
    return {"static": write_adapter(model, root / "static", 4, 8, ["q_proj", "v_proj", "down_proj"], seed=1),
            "runtime": write_adapter(model, root / "runtime", 8, 16, ["o_proj", "gate_proj", "up_proj"], seed=2),
            "big": write_adapter(model, root / "big", 16, 16, ["q_proj"], seed=3)}


@pytest.fixture(scope="module")
def url(shared_serve: SharedServe, chat_model: str, adapters: dict[str, Path]) -> str:
    """The tiny Llama at tp=2 with one configured adapter, runtime loading on, two slots of rank 8."""
    url = shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2, "cpus_per_worker": 0.5,
         "replica_cpus": 0.5, "max_num_batched_tokens": 256, "block_size": 4, "kv_cache_memory_bytes": 2**20,
         "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "lora_modules": {"static": str(adapters["static"])},
         "allow_runtime_lora_updating": True}, {})})
    httpx.get(f"{url}/health", timeout=30).raise_for_status()
    return url


def completion(client: openai.OpenAI, model: str) -> str:
    """Greedy NEW tokens of PROMPT under `model`, as text."""
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def expected(chat_model: str, adapter: Path | None) -> str:
    """HF + peft's greedy continuation of PROMPT, decoded."""
    from transformers import AutoTokenizer

    tokens = peft_greedy(Path(chat_model), adapter, [PROMPT], NEW)[0]
    return str(AutoTokenizer.from_pretrained(chat_model).decode(tokens, skip_special_tokens=True))


def test_model_selects_the_adapter_and_models_lists_it(client: openai.OpenAI, chat_model: str,
                                                        adapters: dict[str, Path]) -> None:
    """`model` = an adapter's name gives HF + peft's tokens, the model's name the base model's; /v1/models lists
    the adapter with the model as parent; a chat request selects it too."""
    assert completion(client, "static") == expected(chat_model, adapters["static"])
    assert completion(client, "tiny") == expected(chat_model, None)
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["static"]["parent"] == "tiny" and cards["static"]["root"] == str(adapters["static"])
    chat = client.chat.completions.create(model="static", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "static" and chat.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="static", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == expected(chat_model, adapters["static"])
    response = client.responses.create(model="static", input="hi", max_output_tokens=4, temperature=0)
    assert response.model == "static" and response.status in ("completed", "incomplete")


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    """A model that is neither served nor loaded: OpenAI's 404 body, code model_not_found."""
    with pytest.raises(openai.NotFoundError) as err:
        completion(client, "nope")
    assert err.value.body["code"] == "model_not_found" and "'nope'" in err.value.body["message"]


def test_load_serve_unload_at_runtime(url: str, client: openai.OpenAI, chat_model: str,
                                      adapters: dict[str, Path]) -> None:
    """vLLM's routes: load -> listed and served (HF + peft's tokens); unload -> 404; unload again -> 404."""
    load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(adapters["runtime"])},
                      timeout=60)
    assert load.status_code == 200 and "rt" in load.text
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(adapters["runtime"])},
                       timeout=60)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert "rt" in [m.id for m in client.models.list().data]
    assert completion(client, "rt") == expected(chat_model, adapters["runtime"])
    inplace = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(adapters["static"]),
                                                                "load_inplace": True}, timeout=60)
    assert inplace.status_code == 200  # new weights under the same name: served from the next request on
    assert completion(client, "rt") == expected(chat_model, adapters["static"])
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "rt"}, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        completion(client, "rt")
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "rt"}, timeout=60)
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


@pytest.mark.parametrize("name,path,needle", [
    ("big", "big", "rank r=16 exceeds max_lora_rank=8"),
    ("missing", "/nonexistent/adapter", "no adapter_config.json"),
    ("static", "static", "lora_modules"),  # configured adapters are changed in the config only
])
def test_bad_adapter_is_a_400_and_the_server_keeps_serving(url: str, client: openai.OpenAI, chat_model: str,
                                                           adapters: dict[str, Path], name: str, path: str,
                                                           needle: str) -> None:
    """A refused load names the problem (400) and changes nothing: the configured adapter still answers."""
    folder = str(adapters[path]) if path in adapters else path
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": folder}, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert completion(client, "static") == expected(chat_model, adapters["static"])
