"""Pipelines over a rate-limited network (issue 29 item 3): a pp=2 Serve app on a bed of hosts (tests/hostbed.py),
both stages on one host versus each stage on its own host with a `tbf` rate limit on every host's interface
(unlimited, 1 Gbit, 100 Mbit, 10 Mbit), driven by the official `openai` client (streamed completions of ~512
random token ids, 32 tokens, greedy, ignore_eos) at 1 client (4 requests in turn) and 16 clients (one wave).
Reports output tok/s, TTFT p50 and TPOT p50 per row as a markdown table, and saves JSON under bench/out/.

One-way delay is not measured: it needs the `netem` qdisc, and kernels built without CONFIG_NET_SCH_NETEM (this
one) have none; `tbf` shapes rate only.

  python -m bench.network          # needs root, iproute2 (ip, tc), util-linux (as bench.hosts)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from bench.common import serve_on_bed
from tests import hostbed

REPO = Path(__file__).resolve().parent.parent
APP = "net"
# Big enough that a prompt's hand-off between stages is MBs, small enough for seconds per request on 2 cores.
SHAPE: dict[str, Any] = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=None, max_position_embeddings=1024)
PROMPT_LEN, NEW_TOKENS, STEP_TOKENS = 512, 32, 2048  # STEP_TOKENS: the engine's max_num_batched_tokens
RATES: list[int | None] = [None, 10**9, 10**8, 10**7]  # bit/s on every host's egress; None: no qdisc
LOADS = ((1, 4), (16, 16))  # (clients, requests)
PROBE_PORT = 5201
# The probe: a bulk TCP transfer, timed by the sender until the receiver acknowledges the last byte.
RECV = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',int(sys.argv[1])));s.listen(1);s.settimeout(30);c,_=s.accept();n=0\n"
        "while n<int(sys.argv[2]):\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\nc.sendall(b'k')")
SEND = ("import socket,sys,time\nfor _ in range(100):\n try: c=socket.create_connection((sys.argv[1],int(sys.argv[2])))"
        "\n except OSError: time.sleep(0.1); continue\n break\nt=time.monotonic();c.sendall(bytes(int(sys.argv[3])))\n"
        "c.recv(1);print(time.monotonic()-t)")


@dataclass
class Row:
    """One table row: a layout, a rate, a load, and what it measured."""

    layout: str
    rate: str
    clients: int
    requests: int
    tok_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    probe_mbit_s: float | None = None  # a timed bulk transfer host 2 -> host 3 under this rate
    sent_mb: dict[str, float] | None = None  # bytes each host's interface sent during the row


def rate_name(bits: int | None) -> str:
    """'unlimited', '1 Gbit', '100 Mbit', ..."""
    if bits is None:
        return "unlimited"
    return f"{bits // 10**9} Gbit" if bits % 10**9 == 0 else f"{bits // 10**6} Mbit"


def serve_config(model: Path) -> dict[str, Any]:
    """One model replica, a tp=1 x pp=2 grid; the ingress and proxy on the head."""
    args = {"model": str(model), "pipeline_parallel_size": 2, "max_num_seqs": 16, "max_model_len": 1024,
            "max_num_batched_tokens": STEP_TOKENS, "kv_cache_memory_bytes": 512 * 2**20, "replica_cpus": 1,
            "step_timeout_s": 300}  # a prefill step's hand-off at 10 Mbit takes seconds, not a stuck worker
    return {"proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "deployments.serve_app:build_app",
                              "args": args, "deployments": [{"name": "LLMServer", "num_replicas": 1}]}]}


def deploy(bed: hostbed.HostBed, model: Path, work: Path) -> None:
    """`serve deploy` the app onto the bed and wait until it runs."""
    serve_on_bed(bed, serve_config(model), APP, work / f"serve-{bed.tag}.json")


def stage_hosts(bed: hostbed.HostBed) -> list[int]:
    """The host index of each pipeline stage, from the grid's own /status report (node ids) and Ray's nodes."""
    import httpx

    status = httpx.get(f"http://{bed.hosts[0].address}:8000/status", timeout=30).json()
    where = {n["node_id"]: n["node_ip"] for n in bed.state("nodes")}
    index = {h.address: h.index for h in bed.hosts}
    return [index[where[w["node_id"]]] for w in sorted(status["workers"], key=lambda w: w["pp_rank"])]


def shape(bed: hostbed.HostBed, bits: int | None) -> None:
    """Put a `tbf` of `bits`/s on every host's eth0 egress, or remove it (None)."""
    for h in bed.hosts:
        if bits is None:
            bed.run_on(h.index, ["tc", "qdisc", "del", "dev", "eth0", "root"])  # none there: an error, ignored
            continue
        # burst: >= 100 ms of rate (over rate/HZ at any HZ), 64 KB at least (one GSO packet); latency: a queue
        # of 0.5 s, so TCP meets back-pressure rather than drops.
        burst = max(bits // 8 // 10, 64 * 1024)
        proc = bed.run_on(h.index, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{bits}bit",
                                    "burst", str(burst), "latency", "500ms"])
        if proc.returncode != 0:
            raise RuntimeError(f"tc tbf rate {bits}bit on host {h.index} failed: {proc.stderr.strip()}; needs "
                               "sch_tbf (CONFIG_NET_SCH_TBF)")


def sent_bytes(bed: hostbed.HostBed) -> dict[str, int]:
    """Bytes each host's eth0 has sent (kernel counters, read inside its namespace)."""
    out = {}
    for h in bed.hosts:
        link = json.loads(bed.run_on(h.index, ["ip", "-j", "-s", "link", "show", "dev", "eth0"]).stdout)
        out[h.hostname] = int(link[0]["stats64"]["tx"]["bytes"])
    return out


def tbf_drops(bed: hostbed.HostBed) -> dict[str, int]:
    """Packets each host's tbf dropped so far (0 where there is none)."""
    out = {}
    for h in bed.hosts:
        qd = json.loads(bed.run_on(h.index, ["tc", "-j", "-s", "qdisc", "show", "dev", "eth0"]).stdout or "[]")
        out[h.hostname] = sum(int(q.get("drops", 0)) for q in qd if q.get("kind") == "tbf")
    return out


def probe(bed: hostbed.HostBed, bits: int | None) -> float:
    """Mbit/s of one timed bulk TCP transfer from host 2 to host 3 (about 2 s at the limit, 64 MB at most)."""
    size = 64 * 2**20 if bits is None else min(64 * 2**20, bits // 8 * 2)
    py = sys.executable
    with ThreadPoolExecutor(1) as pool:
        recv = pool.submit(bed.run_on, 3, [py, "-c", RECV, str(PROBE_PORT), str(size)])
        send = bed.run_on(2, [py, "-c", SEND, bed.hosts[2].address, str(PROBE_PORT), str(size)])
        recv.result(timeout=60)
    if send.returncode != 0:
        raise RuntimeError(f"the probe transfer host 2 -> host 3 failed: {send.stderr.strip()[-500:]}")
    return size * 8 / float(send.stdout.strip()) / 1e6


async def one(client: openai.AsyncOpenAI, model: str, prompt: list[int]) -> tuple[float, float, int]:
    """One streamed greedy completion: (TTFT s, TPOT s, output tokens)."""
    start = time.perf_counter()
    first, tokens = 0.0, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and not first:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if tokens != NEW_TOKENS:
        raise RuntimeError(f"a request produced {tokens} tokens; expected {NEW_TOKENS} (ignore_eos)")
    return first - start, (end - first) / (tokens - 1), tokens


async def load(url: str, model: str, clients: int, requests: int, seed: int,
               vocab: int) -> tuple[float, float, float]:
    """`requests` fresh random prompts (no prefix-cache hits) shared by `clients` clients: (tok/s, TTFT p50 s,
    TPOT p50 s)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, vocab) for _ in range(PROMPT_LEN)] for _ in range(requests)]
    client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
    results: list[tuple[float, float, int]] = []

    async def user(mine: list[list[int]]) -> None:
        for p in mine:
            results.append(await one(client, model, p))

    t0 = time.perf_counter()
    await asyncio.gather(*(user(prompts[c::clients]) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return (sum(r[2] for r in results) / wall, statistics.median(r[0] for r in results),
            statistics.median(r[1] for r in results))


def measure(bed: hostbed.HostBed, layout: str, bits: int | None, model: str, vocab: int, seed: int) -> list[Row]:
    """Both loads at the bed's current rate."""
    url = f"http://{bed.hosts[0].address}:8000/v1"
    rows = []
    for clients, requests in LOADS:
        before = sent_bytes(bed)
        tok_s, ttft, tpot = asyncio.run(load(url, model, clients, requests, seed + clients, vocab))
        after = sent_bytes(bed)
        rows.append(Row(layout, rate_name(bits), clients, requests, tok_s, 1000 * ttft, 1000 * tpot,
                        sent_mb={k: (after[k] - before[k]) / 1e6 for k in after}))
        print(f"  {layout} {rate_name(bits)} {clients} clients: {tok_s:.1f} tok/s, TTFT p50 {1000 * ttft:.0f} ms, "
              f"TPOT p50 {1000 * tpot:.0f} ms, sent MB {rows[-1].sent_mb}", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as markdown, each with its ratio of tok/s to 'one host' at the same load."""
    base = {r.clients: r.tok_s for r in rows if r.layout == "one host"}
    lines = ["| layout | rate | clients | tok/s | TTFT p50 ms | TPOT p50 ms | tok/s vs one host | probe Mbit/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.tok_s / base[r.clients]:.2f}" if r.clients in base else "-"
        probe_s = "-" if r.probe_mbit_s is None else f"{r.probe_mbit_s:.0f}"
        lines.append(f"| {r.layout} | {r.rate} | {r.clients} | {r.tok_s:.1f} | {r.ttft_p50_ms:.0f} | "
                     f"{r.tpot_p50_ms:.1f} | {ratio} | {probe_s} |")
    return "\n".join(lines)


def warm(bed: hostbed.HostBed, model: str, vocab: int) -> None:
    """One request through the whole path, so the first measured row pays no start-up."""
    asyncio.run(load(f"http://{bed.hosts[0].address}:8000/v1", model, 1, 1, 999, vocab))


def run_layout(layout: str, model: Path, vocab: int, work: Path, notes: dict[str, Any]) -> list[Row]:
    """One bed for `layout`, the app deployed once, the rows measured with only the qdisc changing between them."""
    across = layout == "across hosts"
    kwargs: dict[str, Any] = {"cpus": 2, "gpus": 1 if across else 2, "head_gpus": 0}
    rows: list[Row] = []
    with hostbed.host_bed(3 if across else 2, **kwargs) as bed:
        deploy(bed, model, work)
        stages = stage_hosts(bed)
        notes[f"{layout}: host of each stage"] = stages
        if (across and (len(set(stages)) != 2 or 1 in stages)) or (not across and stages != [2, 2]):
            raise RuntimeError(f"{layout}: the grid placed its stages on hosts {stages}; expected "
                               f"{'two different non-head hosts' if across else 'both on host 2'}")
        print(f"{layout}: stages on hosts {stages} (from /status)", flush=True)
        warm(bed, model.name, vocab)
        for k, bits in enumerate(RATES if across else [None]):
            shape(bed, bits)
            try:
                mbit = probe(bed, bits) if across else None
                rows += measure(bed, layout, bits, model.name, vocab, seed=100 * k + (50 if across else 0))
                for r in rows[-len(LOADS):]:
                    r.probe_mbit_s = mbit
                if bits is not None:
                    notes[f"{layout} {rate_name(bits)}: tbf drops"] = tbf_drops(bed)
            finally:
                shape(bed, None)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    if reason := hostbed.missing() or (None if shutil.which("tc") else "`tc` is missing (apt-get install iproute2)"):
        print(f"bench.network: {reason}", file=sys.stderr)
        return 2
    from deployments.make_model import write_model

    work = Path(f"/tmp/gs-network-{os.getpid()}")
    model = write_model(work / "net-llama", "llama", seed=1, **SHAPE)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    hidden = SHAPE["hidden_size"]
    notes: dict[str, Any] = {
        "model": f"random Llama, hidden {hidden}, {SHAPE['num_hidden_layers']} layers, intermediate "
                 f"{SHAPE['intermediate_size']}, {SHAPE['num_attention_heads']}/{SHAPE['num_key_value_heads']} "
                 f"heads, vocab {vocab}, float32",
        "hand-off per prefill step": f"{STEP_TOKENS} tokens x {hidden} x 4 B = {STEP_TOKENS * hidden * 4 / 2**20:.0f}"
                                     f" MiB ({PROMPT_LEN * hidden * 4 / 2**20:.0f} MiB per {PROMPT_LEN}-token prompt)",
        "hand-off per decode step": f"{hidden * 4 / 1024:.0f} KiB per sequence ({16 * hidden * 4 / 1024:.0f} KiB at "
                                    "16 sequences)",
        "hand-off transport": "one host: a Unix socket per stage (step_channel auto); across hosts: Ray objects "
                              "pulled from the stage-0 host's object store",
        "delay": "not measured: this kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set); tbf shapes rate only",
    }
    for k, v in notes.items():
        print(f"{k}: {v}", flush=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the bed's teardown runs on SIGTERM too
    try:
        rows = run_layout("one host", model, vocab, work, notes) + run_layout("across hosts", model, vocab, work,
                                                                              notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    out = REPO / "bench" / "out" / f"network-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"notes": notes, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
