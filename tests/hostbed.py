"""A test bed of hosts on this machine: each a real `ray start` behind its own network, with token auth on.

A host is a network namespace (its own interfaces, ports and loopback) entered with new UTS, PID and mount
namespaces (its own hostname, process tree and /proc), plugged by a veth into a Linux bridge with no uplink.
Addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarks): no real network uses them and nothing on the
bridge is routed anywhere. The bridge holds .1 of the bed's /24 so this namespace (a test's driver) reaches the
hosts. Host 1 runs `ray start --head`, the others join it. A host's first process is pid 1 of its PID namespace:
killing it takes every process on the host down with it, which is both the cleanup and a whole-host failure.

Each bed records itself in STATE_ROOT/<tag>/state.json, so `python -m bench.hosts down` can remove a bed that a
crashed run or the `up` command left behind.
"""
from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
STATE_ROOT = Path("/tmp/gs-hosts")  # short: Ray's socket paths under each host's temp dir must stay < 108 bytes
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # Ray's defaults: every host has its own port space
TOOLS = ("ip", "unshare", "nsenter", "setpriv")
# Env vars that must not reach a host: the tests' loopback pin (a joining `ray start` refuses to run with it,
# and a head would advertise 127.0.0.1) and any cluster address of the caller's.
DROPPED_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
_BEDS = itertools.count()  # beds made by this process


@dataclass
class Host:
    """One host: its names, address, Ray temp dir, and the processes that hold it up."""

    index: int
    hostname: str
    netns: str
    veth: str
    address: str
    temp_dir: str
    pid: int = 0  # the `unshare` process, as seen from this namespace
    init_pid: int = 0  # its child: pid 1 of the host's PID namespace


@dataclass
class HostBed:
    """A bed of hosts on one bridge; `owner` (pid, start time) is the process that made it."""

    tag: str
    bridge: str
    gateway: str
    root: str
    owner: tuple[int, int]
    hosts: list[Host] = field(default_factory=list)
    cpus: int = 1  # what each host's Ray declares (kept so a host can be restarted alike)
    gpus: int = 2
    object_store_mb: int = 256
    tied: bool = True
    head_gpus: int | None = None  # host 1's, when not `gpus` (0: nothing GPU-bound lands beside the GCS)

    @property
    def token_path(self) -> str:
        """The bed's own auth token file (never ~/.ray/auth_token, which other clusters on this machine share)."""
        return f"{self.root}/auth_token"

    @property
    def head_address(self) -> str:
        """The GCS address workers and drivers join."""
        return f"{self.hosts[0].address}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard (and job API), reachable from this namespace over the bridge."""
        return f"http://{self.hosts[0].address}:{DASHBOARD_PORT}"

    def env(self) -> dict[str, str]:
        """Environment for Ray processes and clients of this bed: token auth with the bed's token."""
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                    "TOKENIZERS_PARALLELISM": "false",
                    # A raylet waits this long for its dashboard agent, whose start is slow on a loaded box (a
                    # host restarted under load); Ray's default gives up first.
                    "RAY_raylet_start_wait_time_s": "60"})
        return env

    def run_on(self, index: int, args: list[str], capture: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `args` on host `index` (1-based), inside all its namespaces, with the bed's env (output captured as
        text unless `capture` is False)."""
        host = self.hosts[index - 1]
        cmd = ["nsenter", f"--target={host.init_pid}", "--net", "--uts", "--pid", "--mount", "--"] + args
        return subprocess.run(cmd, env=self.env(), capture_output=capture, text=True, **kwargs)

    def running(self, index: int) -> bool:
        """Whether host `index`'s first process still runs."""
        host = self.hosts[index - 1]
        return runs_host(host.init_pid, host)

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET `path` from the head's dashboard (POST `body` as JSON if given) with the bed's token; the decoded
        JSON."""
        headers = {"Authorization": f"Bearer {Path(self.token_path).read_text()}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.dashboard_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Rows of Ray's state API (`kind`: nodes, actors, ...) whose fields equal `filters`."""
        query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        return self.api(f"/api/v0/{kind}?limit=10000&detail=true{query}")["data"]["result"]["result"]

    def nodes(self) -> list[dict[str, Any]]:
        """Ray's alive nodes ([] while the head is not answering)."""
        try:
            return self.state("nodes", state="ALIVE")
        except (OSError, ValueError, KeyError):
            return []

    def kill_host(self, index: int) -> None:
        """SIGKILL host `index` whole: its pid 1, so the kernel ends every process in its PID namespace."""
        host = self.hosts[index - 1]
        for pid in (host.init_pid, host.pid):
            if runs_host(pid, host):
                with suppress(ProcessLookupError):  # it exited since the check
                    os.kill(pid, signal.SIGKILL)

    def set_link(self, index: int, up: bool) -> None:
        """Plug host `index`'s cable in or pull it (its veth on the bridge up or down): a partition, not a crash."""
        _ip("link", "set", self.hosts[index - 1].veth, "up" if up else "down")

    def restart_host(self, index: int, timeout_s: float = 120) -> None:
        """Boot host `index` again after it died (killed, or its raylet gave up after a partition): a fresh
        `ray start` joins the head from the same address; returns once Ray lists a new alive node there."""
        host = self.hosts[index - 1]
        self.kill_host(index)
        for pid in (host.pid, host.init_pid):
            _wait(lambda p=pid: _gone(p, host), 30, f"process {pid} of host {index} to exit")
        self.set_link(index, True)
        before = {n["node_id"] for n in self.nodes()}
        deadline = time.monotonic() + timeout_s

        def joined() -> bool:
            if any(n["node_ip"] == host.address and n["node_id"] not in before for n in self.nodes()):
                return True
            if not self.running(index):  # `ray start` gave up (it waits 30 s for its raylet): boot again
                _boot(self, host, _ray_command(self, host, self.cpus, self.gpus, self.object_store_mb), self.tied)
            return False

        _boot(self, host, _ray_command(self, host, self.cpus, self.gpus, self.object_store_mb), self.tied)
        _wait(joined, max(0.0, deadline - time.monotonic()), f"host {index} ({host.address}) to rejoin as an "
              "alive Ray node")

    def save(self) -> None:
        """Record the bed (names, pids) so a later process can take it down."""
        Path(self.root, "state.json").write_text(json.dumps(asdict(self), indent=1))


def missing() -> str | None:
    """Why no bed can be made here (not root, a tool missing, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "the host test bed needs root (network namespaces, veths, a bridge)"
    gone = [t for t in TOOLS if shutil.which(t) is None]
    if gone:
        return f"the host test bed needs {', '.join(gone)} (apt-get install iproute2 util-linux)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are refused here (unshare: {probe.stderr.strip()})"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One iproute2 command; raises naming the command and its error."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def start_time(pid: int) -> int:
    """A process's start time in clock ticks (0 if it is gone): a pid plus this names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _free_subnet(start: int) -> ipaddress.IPv4Network:
    """A /24 of BENCH_NET that no interface of this namespace uses (other beds' bridges hold .1 of theirs)."""
    used = {ipaddress.ip_interface(w).network.supernet(new_prefix=24)
            for line in _ip("-4", "-o", "addr", "show").stdout.splitlines()
            for w in line.split()[3:4] if ipaddress.ip_interface(w).ip in BENCH_NET}
    subnets = list(BENCH_NET.subnets(new_prefix=24))
    for k in range(len(subnets)):
        net = subnets[(start + k) % len(subnets)]
        if net not in used:
            return net
    raise RuntimeError(f"every /24 of {BENCH_NET} is in use; take stale beds down with `python -m bench.hosts down`")


def _plumb(bed: HostBed, count: int) -> None:
    """The bridge (holding the gateway address) and one namespace + veth + address per host."""
    STATE_ROOT.mkdir(exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as lock:  # two beds starting at once must not pick the same /24
        fcntl.flock(lock, fcntl.LOCK_EX)
        net = _free_subnet(os.getpid())
        bed.gateway = str(net[1])
        _ip("link", "add", bed.bridge, "type", "bridge")
        bed.save()
        _ip("addr", "add", f"{bed.gateway}/24", "dev", bed.bridge)
    _ip("link", "set", bed.bridge, "up")
    for i in range(1, count + 1):
        host = Host(i, f"host{i}", f"{bed.tag}h{i}", f"{bed.tag}v{i}", str(net[1 + i]), f"{bed.root}/h{i}")
        bed.hosts.append(host)
        bed.save()
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{bed.tag}p{i}")
        _ip("link", "set", f"{bed.tag}p{i}", "netns", host.netns, "name", "eth0")
        _ip("link", "set", host.veth, "master", bed.bridge, "up")
        for args in (["addr", "add", f"{host.address}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"]):
            _ip("-n", host.netns, *args)


def _ray_command(bed: HostBed, host: Host, cpus: int, gpus: int, object_store_mb: int) -> list[str]:
    """`ray start --block` for one host: the head on host 1, a worker joining it elsewhere."""
    ray = Path(sys.executable).with_name("ray")
    if host.index == 1 and bed.head_gpus is not None:
        gpus = bed.head_gpus
    cmd = [str(ray) if ray.exists() else "ray", "start", "--block", f"--node-ip-address={host.address}",
           f"--temp-dir={host.temp_dir}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
           f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats",
           # "host<i>": 1 lets a test pin work to one host (a job's entrypoint, a placeholder holding its room).
           f"--resources={json.dumps({f'host{host.index}': 1})}"]
    if host.index == 1:
        return cmd + ["--head", f"--port={GCS_PORT}", f"--dashboard-host={host.address}",
                      f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true"]
    return cmd + [f"--address={bed.head_address}"]


def _boot(bed: HostBed, host: Host, ray_cmd: list[str], tied: bool) -> None:
    """Start the host's namespaces around `ray_cmd`; records the pids."""
    Path(host.temp_dir).mkdir(parents=True, exist_ok=True)
    # --kill-child: the host dies with its `unshare`; tied: that `unshare` dies with its caller (a test run).
    cmd = (["setpriv", "--pdeathsig", "KILL"] if tied else []) + [
        "ip", "netns", "exec", host.netns, "unshare", "--uts", "--pid", "--mount-proc", "--kill-child", "--",
        "sh", "-c", 'hostname "$0" && exec "$@"', host.hostname, *ray_cmd]
    with open(f"{bed.root}/h{host.index}.log", "a") as log:  # a restarted host adds to its log
        proc = subprocess.Popen(cmd, env=bed.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    host.pid = proc.pid
    host.init_pid = _wait(lambda: _child(proc), 10, f"host {host.index}'s first process")
    bed.save()


def _child(proc: subprocess.Popen) -> int:
    """The one child of `proc` (0 while it has none); raises if `proc` exited."""
    if proc.poll() is not None:
        raise RuntimeError(f"`{proc.args!r}` exited with {proc.returncode}")
    try:
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        return 0
    return int(kids[0]) if kids else 0


def _wait(check: Any, timeout_s: float, what: str) -> Any:
    """Poll `check` until truthy (returned); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)
    return value


def up(count: int = 3, cpus: int = 1, gpus: int = 2, object_store_mb: int = 256, tied: bool = True,
       timeout_s: float = 120, head_gpus: int | None = None) -> HostBed:
    """A bed of `count` hosts with a Ray cluster over them (all nodes alive); torn down again if anything fails.

    `tied`: the hosts die with this process (a test run); False keeps them after it exits (`bench.hosts up`).
    `head_gpus`: host 1's logical GPUs when not `gpus`."""
    if count < 1:
        raise ValueError(f"count={count}: a bed needs at least 1 host")
    # The pid keeps runs apart, the letter keeps one run's beds apart; short, as interface names end at 15 bytes.
    tag = f"gs{os.getpid()}{chr(ord('a') + next(_BEDS) % 26)}"
    bed = HostBed(tag, f"{tag}br", "", str(STATE_ROOT / tag), (os.getpid(), start_time(os.getpid())), [], cpus, gpus,
                  object_store_mb, tied, head_gpus)
    try:
        Path(bed.root).mkdir(parents=True)
        Path(bed.token_path).write_text(secrets.token_hex(32))
        _plumb(bed, count)
        # All at once: a joining `ray start` retries until the head's GCS answers (for about 40 s).
        for host in bed.hosts:
            _boot(bed, host, _ray_command(bed, host, cpus, gpus, object_store_mb), tied)
        try:
            _wait(lambda: len(bed.nodes()) == count, timeout_s, f"{count} alive Ray nodes")
        except TimeoutError as exc:  # the logs go with the bed: quote them
            logs = "".join(f"\n--- host {h.index}:\n" + Path(bed.root, f"h{h.index}.log").read_text()[-1500:]
                           for h in bed.hosts)
            raise TimeoutError(f"{exc}; what the hosts' `ray start` said:{logs}") from None
    except BaseException:
        down(bed)
        raise
    return bed


def down(bed: HostBed) -> None:
    """Kill every host's processes, then remove the veths, namespaces, bridge and files the bed made."""
    for host in bed.hosts:
        bed.kill_host(host.index)
    for host in bed.hosts:
        for pid in (host.pid, host.init_pid):  # a namespace is only freed once nothing runs in it
            _wait(lambda p=pid, h=host: _gone(p, h), 30, f"process {pid} of host {host.index} to exit")
        _ip("link", "delete", host.veth, check=False)  # takes its peer in the namespace along
        _ip("netns", "delete", host.netns, check=False)
    _ip("link", "delete", bed.bridge, check=False)
    shutil.rmtree(bed.root, ignore_errors=True)


def runs_host(pid: int, host: Host) -> bool:
    """Whether `pid` is still one of `host`'s processes (its Ray command names the host's temp dir), not a
    process that got the number after ours exited."""
    try:
        return pid > 0 and f"--temp-dir={host.temp_dir}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _gone(pid: int, host: Host) -> bool:
    """Whether `pid` no longer runs `host`; reaps it if it is this process's child."""
    if pid > 0:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return not runs_host(pid, host)


@contextmanager
def host_bed(count: int = 3, **kwargs: Any) -> Iterator[HostBed]:
    """A bed for the duration of the block, taken down afterwards whatever happened in it."""
    bed = up(count, **kwargs)
    try:
        yield bed
    finally:
        down(bed)
