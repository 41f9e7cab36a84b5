"""vLLM's side of bench.speculative, run in the peer venv: n-gram speculation off and on, the same chat prompts,
greedy, EOS ignored; prints one JSON line per (workload, clients, speculation) with output tokens/s.

.peer/vllm/bin/python bench/peer_speculative.py MODEL '{"quote JSON": "...", ...}' CLIENTS... --tokens N --k K
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Python puts this script's folder first on the path, and bench/kernels.py would then shadow the `kernels` package
# that transformers (under vLLM) probes for at import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def rates(model: str, prompts: dict[str, str], clients: list[int], tokens: int, spec: dict[str, Any] | None
          ) -> list[dict[str, Any]]:
    """Output tokens/s of each workload at each client count, on one engine (speculation as given)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=2048, max_num_seqs=max(clients), speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = []
    for name, prompt in prompts.items():
        chat = [[{"role": "user", "content": prompt}]]
        llm.chat(chat, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm
        for n in clients:
            start = time.perf_counter()
            done = llm.chat(chat * n, params, use_tqdm=False)
            wall = time.perf_counter() - start
            out.append({"workload": name, "clients": n, "spec": spec is not None,
                        "tok_s": sum(len(o.outputs[0].token_ids) for o in done) / wall,
                        "tokens": [list(o.outputs[0].token_ids) for o in done[:1]]})
    return out


def main() -> None:
    """Both engines (off, then on) in turn; JSON lines on stdout."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts", help="JSON object: workload name -> user message")
    ap.add_argument("clients", type=int, nargs="+")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": a.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    for row in rates(a.model, json.loads(a.prompts), a.clients, a.tokens, None) + rates(
            a.model, json.loads(a.prompts), a.clients, a.tokens, spec):
        print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
