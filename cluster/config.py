"""The one config schema: `ray_config.yaml` args, CLI flags and Python callers all go through it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from actors.shard.checkpoint import model_spec
from actors.shard.partition import Partition, resolve_partition
from actors.shard.spec import ModelSpec
from cluster.speculative import SpeculativeConfig, draft_problems

log = logging.getLogger("gridserve")

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"  # fetched on first use (deployments/smollm2.py)
FALLBACK_MODEL = "models/demo-random"  # random demo model written when the real one cannot be fetched
DEFAULT_BATCHED_TOKENS = 2048  # default step budget: long prompts go in chunks, decodes never wait behind them


class ConfigError(ValueError):
    """Settings that do not validate: one readable line per problem (field, value, why, fix)."""


class GridServeConfig(BaseModel):
    """Everything that shapes one model replica (a TP x PP grid of Ray actors) and how it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Local Hugging Face model folder (config.json + safetensors), "
                       "a .gguf file, or a folder holding one .gguf file (dequantized at load).")
    served_model_name: str | None = Field(None, description="Name clients use in requests; default: the folder name "
                                          "(a .gguf file's name without the suffix).")
    tensor_parallel_size: int = Field(1, ge=1, description="Workers per pipeline stage; they shard every layer.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages; each owns a contiguous run of layers.")
    pipeline_layer_partition: Literal["even", "balanced"] | list[int] = Field(
        "even", description="Decoder layers per pipeline stage: 'even' splits them equally; 'balanced' evens out "
        "weight reads per decode step (the last stage's LM head counts as extra layers; for memory-bound GPU "
        "decode); or one count per stage, e.g. [18, 14], to match stage times you measured (gridserve status).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; 'auto' keeps the checkpoint's (float16 needs CUDA).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where workers compute: 'auto' uses CUDA when the worker sees a GPU, else CPU.")
    resource: Literal["auto", "GPU", "CPU"] = Field(
        "auto", description="What each worker's placement bundle asks for: 'auto' = GPU if the cluster has any.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a worker's bundle asks for when resource is CPU.")
    worker_nice: int | None = Field(0, ge=-20, le=19, description="Nice value of the model workers (Ray starts them "
                                    "at 15, behind every other process of the box); None keeps Ray's.")
    serve_nice: int | None = Field(0, ge=-20, le=19, description="Nice value of the Serve replicas on the request "
                                   "path (OpenAIIngress, LLMServer; Ray starts them at 15): behind a step on every "
                                   "core they take requests in one by one, each then prefilled in a step of its "
                                   "own; None keeps Ray's.")
    max_model_len: int | None = Field(None, ge=2, description="Longest prompt + completion, in tokens; default: "
                                      "the model's context length, capped by what the KV cache holds.")
    max_num_seqs: int = Field(32, ge=1, description="Most sequences in one running batch.")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="Token budget of one engine step: a token "
                                               "per decoding sequence, then prompt chunks (a longer prompt is "
                                               "prefilled over several steps). Default 2048; at least "
                                               "max_num_seqs.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    kv_cache_memory_bytes: int = Field(4 * 2**30, ge=1, description="KV-cache budget per worker on CPU, in bytes "
                                       "(vLLM's CPU default), at most half the host memory free at start; a full "
                                       "batch's blocks come in at start, the rest as tokens fill it.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory a worker may use (CUDA).")
    placement_timeout_s: float = Field(60.0, gt=0, description="Give up waiting for the grid's resources after this.")
    step_timeout_s: float = Field(30.0, gt=0, description="A grid step slower than this declares the grid "
                                  "failed (a stuck or dead worker) instead of hanging its requests.")
    migration_timeout_s: float = Field(60.0, ge=0, description="When the grid (or, under Serve, the whole replica) "
                                       "fails under a request, how long the request may wait for the rebuilt grid "
                                       "or another replica and continue there from its prompt plus the tokens it "
                                       "already has (the client sees no error); 0 fails it at once.")
    allow_tp_across_nodes: bool = Field(False, description="Let one TP group span nodes (slow: all-reduce crosses "
                                        "the network).")
    compiled_graph: bool = Field(False, description="Drive engine steps through a Ray Compiled Graph (shared-memory "
                                 "channels) when the whole grid sits on one node (ignored across nodes). Its readers "
                                 "busy-wait, a core per worker even idle: pick it only with spare cores.")
    step_channel: Literal["auto", "socket", "ray"] = Field(
        "auto", description="How the engine hands each step to its workers: 'socket' = one Unix socket per worker "
        "and per stage hand-off (no Ray call per step; the driver and every worker on one Linux host), 'ray' = "
        "Ray actor calls with object refs between stages, 'auto' = socket where it fits, else ray. "
        "compiled_graph, when on, takes precedence.")
    cpu_weights: Literal["auto", "packed", "packed+plain", "plain"] = Field(
        "auto", description="Layout of large fp32 linear weights on CPU workers: 'auto' = every path (the C "
        "kernels, oneDNN's packed copy, PyTorch's GEMM, a GGUF's Q4_1/Q8_0 blocks) timed per token count on the "
        "worker's CPU when it loads and the fastest taken, the packed copy made only where it wins and the plain "
        "one kept beside it while that costs at most 1 GiB per worker; fixed layouts: 'plain' = as loaded, the C "
        "kernels up to 256 tokens per step and PyTorch's GEMM above; 'packed' = oneDNN's copy only (as vLLM's CPU "
        "path); 'packed+plain' = both, the C kernels up to 256 tokens and oneDNN above. Ignored on CUDA.")
    shm_allreduce: bool = Field(True, description="CPU TP ranks on one host sum through shared memory (x86-64) "
                                "instead of gloo over loopback TCP; false forces gloo. CUDA always uses NCCL.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV blocks of prompt prefixes already computed "
                                        "(shared system prompts, chat history): their prefill is skipped.")
    async_scheduling: bool | None = Field(None, description="With pp = 1: send each step before the previous one "
                                          "answers (its decodes read the tokens the worker just sampled), so the "
                                          "worker never waits on the engine's bookkeeping; off with speculative "
                                          "decoding. Default (null): on with GPU workers, and with CPU workers only "
                                          "when their threads leave the replica's node a core (where they fill it, "
                                          "the engine's work overlapping a step takes cores from that step).")
    speculative_config: SpeculativeConfig | None = Field(
        None, description="Speculative decoding, vLLM's names: n-gram {method: ngram, num_speculative_tokens: k, "
        "prompt_lookup_max, prompt_lookup_min} copies drafts from the sequence's own earlier tokens; a draft model "
        "{model: <folder>, num_speculative_tokens: k} (method draft_model) proposes them with a smaller model of "
        "the same tokenizer. Drafts are verified k at a time with the same output as without (greedy identical, "
        "sampled by rejection). Off when unset.")
    enable_lora: bool = Field(False, description="Serve LoRA adapters (vLLM's names below): a request whose `model` "
                              "names an adapter runs with it, in the same steps as other adapters and the base model.")
    max_loras: int = Field(1, ge=1, le=64, description="LoRA adapters resident per replica (slots on every worker); a "
                           "request for another waits until one slot's requests end, then the least recently used "
                           "adapter is replaced.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank r accepted; every slot is this "
                               "rank (lower ranks are zero-padded), so it sets the slots' memory.")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="Adapters served from the start: name (what "
                                         "requests give as `model`) -> local PEFT folder (adapter_config.json + "
                                         "adapter_model.safetensors); vLLM's list of 'name=path' or {name, path} "
                                         "is accepted too.")
    allow_runtime_lora_updating: bool = Field(False, description="Enable POST /v1/load_lora_adapter and "
                                              "/v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING). "
                                              "They read folders on the server: turn on only for trusted clients.")
    seed: int = Field(0, description="Seed of the sampler for requests that do not set their own.")
    api_key: str | None = Field(None, description="If set, HTTP clients must send `Authorization: Bearer <key>`.")
    max_waiting_requests: int = Field(256, ge=1, description="Queue limit per replica; beyond it HTTP 503 + "
                                      "Retry-After.")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs of the Serve replica actor (placement bundle 0).")
    ingress_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the HTTP ingress actor (it mostly waits).")
    ingress_on_head: bool = Field(True, description="Place the HTTP ingress (not colocated) on the Ray head node, "
                                  "which every worker host's loss spares: its client connections survive and their "
                                  "requests move to another model replica. Off: Serve places it on any node.")
    colocate_ingress: bool = Field(False, description="Run each model replica inside the HTTP ingress: one Serve "
                                   "deployment (OpenAIIngress; its num_replicas/autoscaling_config apply) and no "
                                   "handle hop per streamed chunk, which leaves the workers more CPU on a small box; "
                                   "Serve's proxy then balances replicas by queue length (prefix_routing is not "
                                   "used). Off: OpenAIIngress calls the LLMServer deployment.")
    prefix_routing: bool = Field(True, description="With several Serve replicas, send a request to the replica whose "
                                 "KV cache holds the longest prefix of its prompt (from the block digests the "
                                 "replicas report); off: Serve's power-of-two-choices router.")
    prefix_routing_imbalance: int = Field(8, ge=0, description="Prefix routing yields to load balancing when the "
                                          "best-matching replica has more than this many ongoing requests above the "
                                          "least-loaded one.")
    _model_len_from_model: bool = PrivateAttr(False)  # max_model_len was derived, so the KV cache may cap it

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> GridServeConfig:
        """Validate `args`, raising ConfigError with one readable line per problem instead of pydantic's dump."""
        try:
            return cls(**args)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc)) from None

    @field_validator("model")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Resolve the folder now, so workers with another working directory find it too."""
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_list(cls, value: Any) -> Any:
        """vLLM's forms ('name=path' strings or {name, path} objects) or a mapping; folders made absolute."""
        value = lora_module_map(value) if isinstance(value, list) else value
        if not isinstance(value, dict):
            return value
        return {k: str(Path(v).expanduser().resolve()) if isinstance(v, str) else v for k, v in value.items()}

    @model_validator(mode="after")
    def _check(self) -> GridServeConfig:
        """Fill the lengths the model decides, then cross-field checks that need the model's own config."""
        spec = self.spec()
        if self.max_model_len is None:
            object.__setattr__(self, "max_model_len", spec.max_position_embeddings)
            self._model_len_from_model = True
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", max(DEFAULT_BATCHED_TOKENS, self.max_num_seqs))
        problems = self._cross_field_errors(spec)
        if problems:
            raise ValueError("\n  - ".join(problems))  # one line each (describe_errors indents the first)
        return self

    def _cross_field_errors(self, spec: ModelSpec) -> list[str]:
        """Every problem between the settings and the model, not only the first."""
        assert self.max_model_len is not None and self.max_num_batched_tokens is not None, "_check fills both"
        problems = []
        for check in (lambda: spec.check_tp(self.tensor_parallel_size),
                      lambda: resolve_partition(spec, self.pipeline_parallel_size, self.pipeline_layer_partition)):
            try:
                check()
            except ValueError as exc:
                problems.append(str(exc))
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs="
                            f"{self.max_num_seqs} so every running sequence can decode in one step; raise it")
        problems += lora_problems(self, spec)
        problems += draft_problems(self.speculative_config, spec, self.max_model_len)
        if self.max_model_len > spec.max_position_embeddings:
            problems.append(f"max_model_len={self.max_model_len} exceeds the model's context length "
                            f"(max_position_embeddings={spec.max_position_embeddings}); lower max_model_len or "
                            "leave it unset to use the model's")
        return problems

    def fit_kv_cache(self, kv_tokens: int) -> GridServeConfig:
        """This config with max_model_len within the `kv_tokens` the grid's KV cache holds (logs which limit won)."""
        assert self.max_model_len is not None, "the validator fills max_model_len"
        if self.max_model_len <= kv_tokens:
            log.info("max_model_len=%d (%s; the KV cache holds %d tokens)", self.max_model_len,
                     "the model's context length" if self._model_len_from_model else "as configured", kv_tokens)
            return self
        if not self._model_len_from_model:
            raise ValueError(f"max_model_len={self.max_model_len} but the KV cache holds only {kv_tokens} tokens; "
                             "lower max_model_len, or raise kv_cache_memory_bytes (CPU) / gpu_memory_utilization "
                             "(GPU), or spread the model over more workers")
        log.info("max_model_len=%d: capped by the KV cache (the model's context length is %d); raise "
                 "kv_cache_memory_bytes / gpu_memory_utilization for longer requests", kv_tokens, self.max_model_len)
        fitted = self.model_copy(update={"max_model_len": kv_tokens})
        fitted._model_len_from_model = True
        return fitted

    def spec(self) -> ModelSpec:
        """The model's architecture numbers (raises ValueError naming `model` if the folder or file is wrong)."""
        return model_spec(self.model)

    def layer_partition(self) -> Partition:
        """Decoder layers per pipeline stage, resolved against the model."""
        return resolve_partition(self.spec(), self.pipeline_parallel_size, self.pipeline_layer_partition)

    @property
    def world_size(self) -> int:
        """Workers in one replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def model_name(self) -> str:
        """The name clients address the model by."""
        path = Path(self.model)
        return self.served_model_name or (path.stem if path.suffix == ".gguf" else path.name)

    @property
    def torch_dtype_name(self) -> str | None:
        """The dtype to build the model in, or None for the checkpoint's."""
        return None if self.dtype == "auto" else self.dtype


def lora_module_map(items: list[Any]) -> dict[str, str]:
    """vLLM's lora_modules list ('name=path' or {"name", "path"}) as name -> path."""
    out: dict[str, str] = {}
    for item in items:
        if isinstance(item, str) and "=" in item:
            name, path = item.split("=", 1)
        elif isinstance(item, dict) and {"name", "path"} <= set(item):
            name, path = str(item["name"]), str(item["path"])
        else:
            raise ValueError(f"lora_modules entry {item!r} is neither 'name=path' nor {{name, path}}")
        out[name] = path
    return out


def lora_problems(cfg: GridServeConfig, spec: ModelSpec) -> list[str]:
    """LoRA settings that do not fit together or with the model (each adapter is read and checked now)."""
    from actors.shard.lora_files import read_adapter

    if not cfg.enable_lora:
        on = [f for f in ("lora_modules", "allow_runtime_lora_updating") if getattr(cfg, f)]
        return [f"{', '.join(on)} set but enable_lora is false; set enable_lora: true"] if on else []
    problems = []
    for name, path in cfg.lora_modules.items():
        if name == cfg.model_name:
            problems.append(f"lora_modules: adapter name {name!r} is the served model's name; rename it")
            continue
        try:
            read_adapter(name, path, spec, cfg.max_lora_rank, load=False)  # header only: shapes, no tensors
        except ValueError as exc:
            problems.append(f"lora_modules: {exc}")
    return problems


def describe_errors(exc: ValidationError) -> str:
    """One line per validation problem: `field=value: why` (our validators already say the fix)."""
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = (f"unknown setting {field!r}; valid settings: "
                   f"{', '.join(sorted(GridServeConfig.model_fields))}")
        elif field:
            shown = "<hidden>" if field == "api_key" else repr(err["input"])
            msg = f"{field}={shown}: {msg}"
        lines.append(msg)
    return "invalid gridserve settings:\n" + "\n".join(f"  - {line}" for line in lines)


def args_from_serve_config(path: str | Path, app: int = 0) -> dict[str, Any]:
    """The `args` of application `app` in a Ray Serve config file such as ray_config.yaml."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    apps = doc.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no `applications` list; expected a Ray Serve config file")
    return dict(apps[app].get("args") or {})
