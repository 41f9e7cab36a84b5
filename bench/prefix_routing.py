"""Prefix-aware routing vs Serve's default router: 2 replicas, shared system prompts, random arrival, one run.

Workload (issue #16): 8 distinct system prompts of 512 tokens, 8 users each with their own question, the 64
requests sent in random order with exponential gaps (Poisson arrival) over loopback HTTP, streamed. Each router
gets a fresh deployment (empty caches) and the same requests at the same times; the routers alternate for
`--rounds`. Reported: prefix-cache hit rate (cached prompt tokens / prompt tokens, from the answers'
`usage.prompt_tokens_details.cached_tokens`), TTFT p50/p99, end-to-end p50, and how requests split over replicas.

python -m bench.prefix_routing [--rate 1.5] [--rounds 2] [--max-tokens 16] [--model models/SmolLM2-135M-Instruct]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
SYSTEMS, USERS, SYSTEM_LEN, USER_LEN = 8, 8, 512, 32


def workload(vocab: int, rate: float, seed: int) -> list[tuple[float, int, list[int]]]:
    """(send time s, system prompt index, prompt ids) for every request, in send order."""
    rng = random.Random(seed)
    systems = [[rng.randrange(100, vocab) for _ in range(SYSTEM_LEN)] for _ in range(SYSTEMS)]
    reqs = [(s, systems[s] + [rng.randrange(100, vocab) for _ in range(USER_LEN)])
            for s in range(SYSTEMS) for _ in range(USERS)]
    rng.shuffle(reqs)
    t, out = 0.0, []
    for s, prompt in reqs:
        out.append((t, s, prompt))
        t += rng.expovariate(rate)
    return out


async def one(http: httpx.AsyncClient, url: str, start: float, at: float, prompt: list[int], new: int
              ) -> dict[str, Any]:
    """Send at `start + at`; time to first token, end to end, cached tokens, and the replica's engine header."""
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    ttft, usage = None, None
    body = {"model": "gridserve", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"request failed: {chunk['error']}")
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - sent
            usage = chunk.get("usage") or usage
    return {"ttft": ttft, "e2e": time.perf_counter() - sent, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def drive(url: str, reqs: list[tuple[float, int, list[int]]], new: int) -> list[dict[str, Any]]:
    """Every request at its time, concurrently."""
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        return list(await asyncio.gather(*(one(http, url, start, at, p, new) for at, _, p in reqs)))


def served_per_replica(url: str) -> dict[str, int]:
    """Requests each replica took (its prompt-tokens counter), from /status answers spread over both."""
    seen: dict[str, int] = {}
    for _ in range(40):
        st = httpx.get(f"{url}/status", timeout=60).json()
        seen[st["replica"]] = st["engine"]["prompt_tokens_total"]
    return seen


def run_once(url: str, args: dict[str, Any], routing: bool, reqs: list, new: int) -> dict[str, Any]:
    """Deploy 2 fresh replicas with the given router, drive the workload, summarize."""
    from ray import serve

    from cluster.config import GridServeConfig
    from deployments.serve_app import make_app

    serve.run(make_app(GridServeConfig(**args, prefix_routing=routing), num_replicas=2), name="gridserve",
              route_prefix="/")
    httpx.post(f"{url}/v1/completions", json={"model": "gridserve", "prompt": [1, 2, 3], "max_tokens": 1},
               timeout=300).raise_for_status()  # warm-up: 3 tokens, no block shared with the workload
    time.sleep(2)
    res = asyncio.run(drive(url, reqs, new))
    split = served_per_replica(url)
    serve.delete("gridserve")
    ttft = np.array([r["ttft"] for r in res]) * 1000
    return {"router": "prefix-aware" if routing else "Serve default (power of two)",
            "hit_rate": sum(r["cached"] for r in res) / sum(r["prompt"] for r in res),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "e2e_p50": float(np.percentile([r["e2e"] for r in res], 50)) * 1000,
            "prefill_tokens": sorted(split.values())}


def main() -> None:
    """Alternate the two routers over fresh deployments; print a markdown table."""
    import ray
    from ray import serve

    from deployments.make_model import ensure_default_model
    from tests.loopback import free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--rate", type=float, default=1.5, help="mean requests per second (Poisson arrival)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    args = ensure_default_model({"model": a.model} if a.model else {})
    args.update({"served_model_name": "gridserve", "cpus_per_worker": 0.75, "replica_cpus": 0.25,
                 "max_model_len": 1024, "max_num_batched_tokens": 2048})
    from cluster.config import GridServeConfig

    vocab = GridServeConfig(**args).spec().vocab_size
    reqs = workload(vocab, a.rate, a.seed)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for k in range(a.rounds):
            for routing in (True, False):
                rows.append({"round": k + 1, **run_once(url, args, routing, reqs, a.max_tokens)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    ideal = (SYSTEMS * (USERS - 1) * (SYSTEM_LEN // 16 * 16)) / (SYSTEMS * USERS * (SYSTEM_LEN + USER_LEN))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args['model']}; "
          f"{SYSTEMS} system prompts x {USERS} users, {SYSTEM_LEN}+{USER_LEN} prompt tokens, {a.max_tokens} new, "
          f"Poisson {a.rate}/s; best possible hit rate {ideal:.1%}\n")
    print("| round | router | hit rate | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | prefilled tokens per replica |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['round']} | {r['router']} | {r['hit_rate']:.1%} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | "
              f"{r['e2e_p50']:.0f} | {' / '.join(str(t) for t in r['prefill_tokens'])} |")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/prefix-routing.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
