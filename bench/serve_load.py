"""Serve load test: cold start, then N requests at C concurrent over loopback HTTP against a real Serve app.

Every answer is checked against Hugging Face greedy output for its prompt; HF `generate` over the same requests
(static batches of C) runs in the same process as the reference rate. Serve's own overhead per request is the
client's latency minus the engine time the replica reports in the `x-gridserve-engine-ms` header.

python -m bench.serve_load [--requests 200] [--concurrency 32] [--max-tokens 32] [--tp 2] [--pp 2] [--proxy grpc]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from typing import Any

import httpx
import numpy as np
import ray
import torch
from ray import serve

from bench.serve_floor import Echo
from cluster.config import DEFAULT_MODEL
from deployments.make_model import ensure_default_model
from deployments.serve_app import build_app
from tests.loopback import free_port

TOPICS = ["the sea", "a cat", "numbers", "code", "a story", "the sun", "questions", "answers"]


def hf_reference(model: str, prompts: list[str], new: int, batch: int) -> tuple[dict[str, str], float]:
    """Greedy HF text for each distinct prompt, and HF tokens/s over all `prompts` in static batches of `batch`."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the requests set ignore_eos

    def run(chunk: list[str]) -> list[list[int]]:
        ids = [tok.encode(p) for p in chunk]
        width = max(map(len, ids))
        x = torch.tensor([[0] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        out = hf.generate(input_ids=x, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=new,
                          min_new_tokens=new)
        return out[:, width:].tolist()

    with torch.inference_mode():
        # References one prompt at a time (no padding), so they are exactly what an unbatched run gives.
        texts = {p: tok.decode(run([p])[0], skip_special_tokens=True) for p in sorted(set(prompts))}
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            run(prompts[i:i + batch])
        rate = len(prompts) * new / (time.perf_counter() - start)
    return texts, rate


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, new: int) -> tuple[float, float, str, int]:
    """POST one completion; returns (client ms, engine ms, text, completion tokens)."""
    start = time.perf_counter()
    r = await http.post(f"{url}/v1/completions", json={"model": "gridserve", "prompt": prompt, "max_tokens": new,
                                                       "temperature": 0, "ignore_eos": True})
    client_ms = 1000 * (time.perf_counter() - start)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    return client_ms, float(r.headers["x-gridserve-engine-ms"]), body["choices"][0]["text"], \
        body["usage"]["completion_tokens"]


async def load(url: str, prompts: list[str], new: int, concurrency: int) -> tuple[float, list[Any]]:
    """Send every prompt with at most `concurrency` in flight; returns wall s and per-request results."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def gated(prompt: str) -> Any:
            async with gate:
                return await one_request(http, url, prompt, new)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in prompts))
    return time.perf_counter() - start, results


def floor_ms(url: str, n: int, kind: str) -> list[float]:
    """Latency of `n` sequential calls that do no engine work, after 5 warm-ups: GET /health ("health"), a
    completion POST for an unknown model, answered 404 before the engine ("post"), or the same body POSTed to
    the smallest Serve app there is, `bench.serve_floor` ("serve")."""
    out = []
    body = {"model": "no-such-model", "prompt": "hello there"}
    with httpx.Client(timeout=30) as http:
        for i in range(n + 5):
            start = time.perf_counter()
            if kind == "post":
                r = http.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 404, r.text
            elif kind == "serve":
                http.post(f"{url}/floor/echo", json=body).raise_for_status()
            else:
                http.get(f"{url}/health").raise_for_status()
            if i >= 5:
                out.append(1000 * (time.perf_counter() - start))
    return out


def cold_start(url: str, args: dict[str, Any]) -> tuple[float, float]:
    """Deploy the app; returns (seconds until Serve reports it running, seconds until the first streamed token)."""
    start = time.perf_counter()
    serve.run(build_app(args), name="gridserve", route_prefix="/")
    ready = time.perf_counter() - start
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "gridserve", "prompt": "hello", "max_tokens": 1, "stream": True}) as r:
        next(r.iter_lines())
    return ready, time.perf_counter() - start


def main() -> None:
    """Cold start, reference, load; prints a markdown summary."""
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--proxy", choices=["grpc", "actor"], default="grpc",
                    help="how Serve's HTTP proxy reaches the replica (RAY_SERVE_PROXY_USE_GRPC; `gridserve serve` "
                    "uses grpc)")
    a = ap.parse_args()
    os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1" if a.proxy == "grpc" else "0"  # read when Ray starts the proxy
    args = ensure_default_model({"model": DEFAULT_MODEL, "served_model_name": "gridserve",
                                 "tensor_parallel_size": a.tp, "pipeline_parallel_size": a.pp,
                                 "cpus_per_worker": 0.25, "replica_cpus": 0.5, "max_model_len": 256,
                                 "max_num_seqs": a.concurrency, "max_waiting_requests": a.requests})
    prompts = [f"Tell me about {TOPICS[i % len(TOPICS)]}, item {i % 5}." for i in range(a.requests)]
    texts, hf_rate = hf_reference(args["model"], prompts, a.max_tokens, a.concurrency)
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()} {cores} cores, no GPU; torch {torch.__version__}, Ray {ray.__version__}, "
          f"transformers {transformers.__version__}; model {args['model']}; tp={a.tp} pp={a.pp}; "
          f"proxy->replica: {a.proxy}")
    ray.init(address="local", num_cpus=max(cores, 4), include_dashboard=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        ready, first = cold_start(url, args)
        wall, results = asyncio.run(load(url, prompts, a.max_tokens, a.concurrency))
        _, alone = asyncio.run(load(url, prompts[:20], a.max_tokens, 1))  # overhead without CPU contention
        floor, post_floor = floor_ms(url, 50, "health"), floor_ms(url, 50, "post")
        serve.run(Echo.bind(), name="floor", route_prefix="/floor")
        serve_floor = floor_ms(url, 50, "serve")
    finally:
        serve.shutdown()
        ray.shutdown()
    client = np.array([r[0] for r in results])
    engine = np.array([r[1] for r in results])
    wrong = sum(text != texts[p] or n != a.max_tokens for p, (_, _, text, n) in zip(prompts, results))
    rate = a.requests * a.max_tokens / wall
    print(f"\ncold start: deploy -> replica running {ready:.1f} s; deploy -> first streamed token {first:.1f} s")
    print(f"\n{a.requests} requests, {a.concurrency} concurrent, {a.max_tokens} new tokens each "
          f"(greedy, ignore_eos): {a.requests - wrong} answers equal HF greedy, {wrong} differ")
    print("| system | tokens/s | requests/s | latency p50 ms | latency p99 ms | engine p50 ms | "
          "Serve overhead p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| HF generate, static batches of {a.concurrency} | {hf_rate:.1f} | "
          f"{hf_rate / a.max_tokens:.2f} | – | – | – | – | – |")
    over = client - engine
    print(f"| gridserve over HTTP | {rate:.1f} | {a.requests / wall:.2f} | {np.median(client):.0f} | "
          f"{np.percentile(client, 99):.0f} | {np.median(engine):.0f} | {np.median(over):.1f} | "
          f"{np.percentile(over, 99):.1f} |")
    over1 = np.array([r[0] - r[1] for r in alone])
    print(f"\none request at a time (20 requests): latency p50 {np.median([r[0] for r in alone]):.0f} ms, "
          f"engine p50 {np.median([r[1] for r in alone]):.0f} ms, Serve overhead p50 {np.median(over1):.1f} ms, "
          f"p99 {np.percentile(over1, 99):.1f} ms; Serve's floor (proxy + replica, no engine work): GET /health "
          f"p50 {np.median(floor):.1f} ms, POST answered 404 p50 {np.median(post_floor):.1f} ms; Serve alone (a "
          f"FastAPI deployment that only reads the same POST body, bench.serve_floor): p50 "
          f"{np.median(serve_floor):.1f} ms")
    if wrong:
        raise SystemExit(f"{wrong} answers differ from HF greedy")


if __name__ == "__main__":
    main()
