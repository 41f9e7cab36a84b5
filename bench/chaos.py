"""Chaos soak on a bed of hosts (tests/hostbed.py): a Serve app of two tp=1 x pp=2 model replicas (on hosts 2 and 3;
the ingress on host 1, the head, as shipped) under a steady load of official `openai` clients (streamed and not,
greedy, no client retries), and a fault every `--every` seconds rotating through a worker killed, a worker stopped
past step_timeout_s, a host cut off for 20 s, the Serve controller killed, and a host killed. Reports requests ok,
client-visible errors, hung (no answer in 120 s), greedy outputs that differ from the undisturbed run, the time
until every request in flight at a fault has ended (per kind), and the memory of the bed's processes over time.

  python -m bench.chaos --hosts 3 --minutes 10      # needs root, iproute2, util-linux (as bench.hosts)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import openai

from bench.common import serve_on_bed
from tests import hostbed
from tests.ray_cli import processes_with

REPO = Path(__file__).resolve().parent.parent
# The host kill last: bringing its host back takes longest, and the next fault waits for that.
KINDS = ("worker kill", "worker stop", "partition", "controller kill", "host kill")
HUNG_S = 120.0  # a request with no answer in this long counts as hung
PARTITION_S = 20.0
STEP_TIMEOUT_S = 5.0
NEW_TOKENS = 32


@dataclass
class Record:
    """One request: when it ran, how it ended."""

    start: float
    end: float = 0.0
    outcome: str = ""  # "ok", "mismatch", "hung" or the client-visible error's type
    prompt: int = 0


@dataclass
class Soak:
    """Everything the run measures."""

    records: list[Record] = field(default_factory=list)
    faults: list[tuple[str, float, str]] = field(default_factory=list)  # kind, time, victim
    memory: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # time, MiB per process kind
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)


def serve_config(model: Path) -> dict[str, Any]:
    """Two model replicas, each a pp=2 grid on one host's two GPUs; the ingress on the head (ingress_on_head)."""
    args = {"model": str(model), "pipeline_parallel_size": 2, "max_num_seqs": 8, "step_timeout_s": STEP_TIMEOUT_S,
            "replica_cpus": 1}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": [{"name": "chaos", "route_prefix": "/", "import_path": "deployments.serve_app:build_app",
                              "args": args, "deployments": [{"name": "LLMServer", "num_replicas": 2}]}]}


def deploy(bed: hostbed.HostBed, model: Path, work: Path) -> None:
    """`serve deploy` the app onto the bed and wait until it runs."""
    serve_on_bed(bed, serve_config(model), "chaos", work / "serve.json")


async def ask(client: openai.AsyncOpenAI, model: str, prompt: list[int], stream: bool) -> str:
    """One greedy completion's text, streamed or not."""
    extra = {"ignore_eos": True}
    if not stream:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body=extra)
        return r.choices[0].text
    parts: list[str] = []
    async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS,
                                                       temperature=0, stream=True, extra_body=extra):
        parts.extend(c.text for c in chunk.choices)
    return "".join(parts)


async def user(client: openai.AsyncOpenAI, model: str, prompts: list[list[int]], reference: list[str], seed: int,
               stop_at: float, soak: Soak) -> None:
    """One client: greedy completions back to back, every other one streamed."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        k = rng.randrange(len(prompts))
        rec = Record(time.monotonic(), prompt=k)
        soak.records.append(rec)
        try:
            text = await asyncio.wait_for(ask(client, model, prompts[k], rng.random() < 0.5), HUNG_S)
            rec.outcome = "ok" if text == reference[k] else "mismatch"
        except asyncio.TimeoutError:
            rec.outcome = "hung"
        except openai.APIError as exc:
            rec.outcome = f"{type(exc).__name__} {getattr(exc, 'status_code', '')}".strip()
        rec.end = time.monotonic()


def workers(bed: hostbed.HostBed) -> list[tuple[int, int]]:
    """(host, pid inside it) of every alive grid worker."""
    where = {n["node_id"]: n["node_ip"] for n in bed.state("nodes")}
    index = {h.address: h.index for h in bed.hosts}
    return [(index[where[a["node_id"]]], int(a["pid"])) for a in bed.state("actors", class_name="Worker",
                                                                           state="ALIVE") if a.get("pid")]


def inject(bed: hostbed.HostBed, kind: str, rng: random.Random) -> tuple[str, Any]:
    """Apply one fault; (victim, what to undo later)."""
    alive = [(h, p) for h, p in workers(bed) if h != 1 or kind in ("worker kill", "worker stop")]
    if not alive:
        return "no worker to hit", None
    host, pid = rng.choice(alive)
    if kind == "controller kill":
        pids = [int(a["pid"]) for a in bed.state("actors", class_name="ServeController", state="ALIVE")]
        if not pids:
            return "no Serve controller alive", None
        bed.run_on(1, ["kill", "-KILL", str(pids[0])])
        return f"host 1 pid {pids[0]}", None
    if kind == "worker kill":
        bed.run_on(host, ["kill", "-KILL", str(pid)])
        return f"host {host} pid {pid}", None
    if kind == "worker stop":
        bed.run_on(host, ["kill", "-STOP", str(pid)])
        return f"host {host} pid {pid}", ("cont", host, pid)
    if kind == "host kill":
        bed.kill_host(host)
        return f"host {host}", ("restart", host)
    bed.set_link(host, False)
    return f"host {host}", ("plug", host)


def undo(bed: hostbed.HostBed, action: Any) -> None:
    """End a fault: resume a stopped worker, plug a cable back, restart a killed host (so the next has room)."""
    if action is None:
        return
    if action[0] == "cont":
        bed.run_on(action[1], ["kill", "-CONT", str(action[2])])
    elif action[0] == "plug":
        bed.set_link(action[1], True)
    alive = {n["node_ip"] for n in bed.nodes()}
    for h in bed.hosts[1:]:
        if action[0] != "cont" and (h.address not in alive or not bed.running(h.index)):
            bed.restart_host(h.index)


async def chaos(bed: hostbed.HostBed, every_s: float, stop_at: float, soak: Soak) -> None:
    """A fault every `every_s`, rotating through KINDS; each undone before the next."""
    rng = random.Random(0)
    for n in range(10**6):
        await asyncio.sleep(max(0.0, min(every_s, stop_at - time.monotonic() - every_s / 2)))
        if time.monotonic() > stop_at - every_s / 2:
            return
        kind = KINDS[n % len(KINDS)]
        victim, action = await asyncio.to_thread(inject, bed, kind, rng)
        soak.faults.append((kind, time.monotonic(), victim))
        print(f"  {time.strftime('%H:%M:%S')} fault: {kind} ({victim})", flush=True)
        await asyncio.sleep(PARTITION_S if kind == "partition" else 2 * STEP_TIMEOUT_S if kind == "worker stop"
                            else 30.0 if kind == "host kill" else 0.0)
        try:
            await asyncio.to_thread(undo, bed, action)
        except TimeoutError as exc:  # the run goes on with the hosts it has; the report says so
            soak.notes.append(f"{time.monotonic() - soak.t0:.0f} s: could not undo {kind}: {exc}")
            print(f"  {time.strftime('%H:%M:%S')} could not undo {kind}: {exc}", flush=True)


def memory(bed: hostbed.HostBed) -> dict[str, float]:
    """Resident MiB of the bed's processes, summed per kind (Ray's process title, or the program)."""
    out: dict[str, float] = defaultdict(float)
    for pid in processes_with(str(hostbed.STATE_ROOT / bed.tag)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        name = cmd.split(" ")[0].rsplit("/", 1)[-1]
        # Ray retitles a worker by the method it runs ("ray::Worker.execute"): group by the actor class.
        out[name.split(".")[0] if name.startswith("ray::") else name] += rss / 2**20
    return dict(out)


async def sample_memory(bed: hostbed.HostBed, stop_at: float, soak: Soak) -> None:
    """Memory every 15 s."""
    while time.monotonic() < stop_at:
        soak.memory.append((time.monotonic(), await asyncio.to_thread(memory, bed)))
        await asyncio.sleep(15)


def report(soak: Soak) -> str:
    """The run's figures as text."""
    done = [r for r in soak.records if r.end]
    tally = Counter(r.outcome for r in done)
    lines = [f"requests: {len(done)} ended, {tally['ok']} ok, {tally['mismatch']} greedy mismatches, "
             f"{tally['hung']} hung, {len(done) - tally['ok'] - tally['mismatch'] - tally['hung']} client-visible "
             f"errors {dict((k, v) for k, v in tally.items() if k not in ('ok', 'mismatch', 'hung'))}"]
    recovery: dict[str, list[float]] = defaultdict(list)
    for kind, at, victim in soak.faults:
        hit = [r for r in done if r.start <= at < r.end]
        errs = Counter(r.outcome for r in hit if r.outcome != "ok")
        recovery[kind].append(max((r.end - at for r in hit), default=0.0))
        lines.append(f"  fault at {at - soak.t0:6.1f} s: {kind:11} {victim:20} {len(hit)} requests in flight, "
                     f"all ended after {recovery[kind][-1]:.1f} s, not ok: {dict(errs) or 'none'}")
    for kind, values in recovery.items():
        lines.append(f"recovery {kind:11}: p50 {statistics.median(values):.1f} s, max {max(values):.1f} s "
                     f"({len(values)} faults)")
    lines += soak.notes
    if soak.memory:
        kinds = sorted({k for _, m in soak.memory for k in m})
        first, last = soak.memory[0][1], soak.memory[-1][1]
        peak = {k: max(m.get(k, 0.0) for _, m in soak.memory) for k in kinds}
        lines.append("memory MiB (first / last / max sample, summed per process kind):")
        lines += [f"  {k:40} {first.get(k, 0):8.0f} {last.get(k, 0):8.0f} {peak[k]:8.0f}" for k in kinds]
    return "\n".join(lines)


async def soak_run(bed: hostbed.HostBed, model: str, minutes: float, every_s: float, clients: int) -> Soak:
    """Reference answers undisturbed, then load and faults until the time is up."""
    url = f"http://{bed.hosts[0].address}:8000/v1"
    # no retries: every error the server lets through is counted, as a client without retries would see it
    client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=HUNG_S, max_retries=0)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randrange(4, 16))] for _ in range(16)]
    reference = [await ask(client, model, p, False) for p in prompts]
    soak = Soak()
    stop_at = soak.t0 + 60 * minutes
    await asyncio.gather(*(user(client, model, prompts, reference, s, stop_at, soak) for s in range(clients)),
                         chaos(bed, every_s, stop_at, soak), sample_memory(bed, stop_at, soak))
    return soak


def keep_logs(bed: hostbed.HostBed, to: Path) -> None:
    """Copy each host's `ray start` output and Ray logs out of the bed (its files go with it)."""
    for h in bed.hosts:
        try:
            shutil.copytree(Path(h.temp_dir) / "session_latest" / "logs", to / h.hostname, dirs_exist_ok=True)
            shutil.copy(Path(bed.root) / f"h{h.index}.log", to / h.hostname / "ray-start.log")
        except (OSError, shutil.Error) as exc:
            print(f"could not keep host {h.index}'s logs: {exc}", file=sys.stderr)
    print(f"hosts' logs kept in {to}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args(argv)
    if reason := hostbed.missing():
        print(f"bench.chaos: {reason}", file=sys.stderr)
        return 2
    from deployments.make_model import write_model
    from tests.configs import VARIANTS

    work = Path(f"/tmp/gs-chaos-{os.getpid()}")
    family, overrides = VARIANTS["llama_gqa"]
    model = write_model(work / "chaos-tiny", family, seed=1, **cast(dict[str, Any], overrides))
    # The hosts' Ray processes inherit this: Serve imports `deployments` from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the bed's teardown runs on SIGTERM too
    t0 = time.monotonic()
    # No GPUs on host 1: both model replicas sit on hosts that faults may hit; the proxy and the ingress stay on
    # host 1.
    with hostbed.host_bed(args.hosts, cpus=2, gpus=2, head_gpus=0) as bed:
        try:
            deploy(bed, model, work)
            print(f"bed up and app running in {time.monotonic() - t0:.0f} s; {args.clients} clients for "
                  f"{args.minutes:g} min, a fault every {args.every:g} s", flush=True)
            soak = asyncio.run(soak_run(bed, model.name, args.minutes, args.every, args.clients))
            print(report(soak), flush=True)
        finally:  # the bed's files go with it: keep the hosts' logs for a look afterwards
            keep_logs(bed, work / "logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
