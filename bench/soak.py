"""Soak: mixed load with random aborts and bad requests against a real Serve app for a fixed time; reports what
was served, every unexpected error, and the memory of the replica and its workers over time (should be flat).

python -m bench.soak [--minutes 10] [--clients 16] [--tp 2] [--pp 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from collections import Counter
from typing import Any

import httpx
import ray
from ray import serve

from bench.serve_load import free_port
from cluster.config import DEFAULT_MODEL
from deployments.make_model import ensure_default_model
from deployments.serve_app import build_app

BAD = [{"model": "tiny", "prompt": "x", "max_tokens": -1}, {"model": "nope", "prompt": "x"},
       {"model": "tiny", "prompt": "x", "temperature": "hot"}, {"model": "tiny", "prompt": ""}]


async def client(http: httpx.AsyncClient, seed: int, stop_at: float, tally: Counter) -> None:
    """One user: completions, chats, streams it sometimes leaves early, and a bad request now and then."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind = rng.choices(["complete", "chat", "stream", "abort", "bad"], [4, 2, 3, 2, 1])[0]
        body: dict[str, Any] = {"model": "tiny", "max_tokens": rng.randint(1, 48), "temperature": rng.random()}
        try:
            if kind == "bad":
                r = await http.post("/v1/completions", json=rng.choice(BAD))
                four = 400 <= r.status_code < 500
                tally["bad request answered 4xx" if four else f"bad request got {r.status_code}"] += 1
            elif kind == "chat":
                body["messages"] = [{"role": "user", "content": f"tell me about {rng.randint(0, 99)}"}]
                r = await http.post("/v1/chat/completions", json=body)
                tally["ok" if r.status_code == 200 else f"chat got {r.status_code}"] += 1
            elif kind == "complete":
                r = await http.post("/v1/completions", json={**body, "prompt": f"number {rng.randint(0, 999)}"})
                tally["ok" if r.status_code == 200 else f"completion got {r.status_code}"] += 1
            else:
                body.update(prompt=[rng.randint(5, 200) for _ in range(rng.randint(1, 20))], stream=True,
                            ignore_eos=True)
                leave_after = rng.randint(1, 5) if kind == "abort" else None
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: {")
                        if leave_after is not None and n >= leave_after:
                            break
                        if '"error"' in line:
                            tally["stream error event"] += 1
                    tally["aborted by client" if leave_after is not None and n >= leave_after else
                          "ok" if r.status_code == 200 else f"stream got {r.status_code}"] += 1
        except httpx.HTTPError as exc:
            tally[f"client error {type(exc).__name__}"] += 1


def memory_of(status: dict[str, Any]) -> tuple[int, int]:
    """(replica RSS, sum of worker RSS) in bytes from one /status answer and /proc."""
    with open(f"/proc/{status['pid']}/statm") as f:
        replica = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return replica, sum(w["host_rss_bytes"] for w in status["workers"])


async def sampler(http: httpx.AsyncClient, stop_at: float, every_s: float, series: list) -> None:
    """Record (elapsed s, replica RSS, workers RSS) every `every_s` seconds until `stop_at`."""
    start = time.monotonic()
    while time.monotonic() < stop_at:
        status = (await http.get("/status")).json()
        series.append((time.monotonic() - start, *memory_of(status)))
        await asyncio.sleep(every_s)


async def soak(url: str, minutes: float, clients: int) -> tuple[Counter, list]:
    """Run the clients and the memory sampler until the time is up."""
    tally: Counter = Counter()
    series: list = []
    stop_at = time.monotonic() + 60 * minutes
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(sampler(http, stop_at, max(5.0, 6 * minutes), series),
                             *(client(http, seed, stop_at, tally) for seed in range(clients)))
        series.append((60 * minutes, *memory_of((await http.get("/status")).json())))
    return tally, series


def main() -> None:
    """Start Serve, soak, print the tally and the memory series."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    a = ap.parse_args()
    args = ensure_default_model({"model": DEFAULT_MODEL, "served_model_name": "tiny", "tensor_parallel_size": a.tp,
                                 "pipeline_parallel_size": a.pp, "cpus_per_worker": 0.25, "replica_cpus": 0.5,
                                 "max_model_len": 256, "max_num_seqs": 32})
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="gridserve", route_prefix="/")
        tally, series = asyncio.run(soak(f"http://127.0.0.1:{port}", a.minutes, a.clients))
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; tp={a.tp} pp={a.pp}; {a.minutes:g} min, "
          f"{a.clients} clients")
    print("| outcome | count |\n| --- | ---: |")
    for outcome, count in sorted(tally.items(), key=lambda kv: -kv[1]):
        print(f"| {outcome} | {count} |")
    print("\n| elapsed s | replica RSS MiB | workers RSS MiB (sum) |\n| ---: | ---: | ---: |")
    for t, rep, work in series:
        print(f"| {t:.0f} | {rep / 2**20:.1f} | {work / 2**20:.1f} |")
    first, last = series[1] if len(series) > 2 else series[0], series[-1]  # skip the pre-warm-up sample
    print(f"\nmemory growth after warm-up: replica {(last[1] - first[1]) / 2**20:+.1f} MiB, "
          f"workers {(last[2] - first[2]) / 2**20:+.1f} MiB")


if __name__ == "__main__":
    main()
