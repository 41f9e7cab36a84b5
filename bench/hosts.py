"""A bed of hosts on this machine, to run gridserve across real (virtual) networks by hand; tests/hostbed.py does
the work and says how a host is made. Needs root, iproute2 and util-linux.

  python -m bench.hosts up --hosts 3 --cpus 2 --gpus 2    # prints the head's addresses and the env to use
  python -m bench.hosts status
  python -m bench.hosts run 1 -- ray status               # a command on host 1, inside its namespaces
  python -m bench.hosts fault 2 link-down                 # faults: link-down, link-up, kill, restart
  python -m bench.hosts down                              # every bed whose maker has exited (all `up` ones)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tests import hostbed


def cmd_up(args: argparse.Namespace) -> int:
    """Bring a bed up and leave it running after this command exits."""
    start = time.perf_counter()
    bed = hostbed.up(args.hosts, cpus=args.cpus, gpus=args.gpus, object_store_mb=args.object_store_mb, tied=False)
    print(f"bed {bed.tag}: {len(bed.hosts)} hosts up in {time.perf_counter() - start:.1f} s "
          f"(bridge {bed.bridge}, this namespace is {bed.gateway})")
    show(bed)
    print(f"\nexport RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={bed.token_path}\n"
          f"ray job submit --address {bed.dashboard_url} --working-dir . -- python -m deployments.batch ...\n"
          f"python -m bench.hosts run 1 -- python -m deployments.batch --address {bed.head_address} ...\n"
          f"python -m bench.hosts down --bed {bed.tag}")
    return 0


def show(bed: hostbed.HostBed) -> None:
    """One line per host: name, address, whether its processes run, and whether Ray lists it alive."""
    alive = {n["node_ip"] for n in bed.nodes()}
    for h in bed.hosts:
        running = bed.running(h.index)
        print(f"  host {h.index}  {h.hostname:8} {h.address:15} {'running' if running else 'stopped':8} "
              f"ray node {'alive' if h.address in alive else 'absent'}  netns {h.netns}  temp {h.temp_dir}")


def cmd_status(args: argparse.Namespace) -> int:
    """Every recorded bed and its hosts."""
    beds = recorded()
    for bed in beds:
        owner = f"made by pid {bed.owner[0]} (running)" if owner_alive(bed) else "maker exited"
        print(f"bed {bed.tag}: head {bed.head_address}, dashboard {bed.dashboard_url}, {owner}")
        show(bed)
    if not beds:
        print(f"no beds under {hostbed.STATE_ROOT}")
    return 0


def recorded() -> list[hostbed.HostBed]:
    """Every bed with a state file under STATE_ROOT (as `HostBed.save` wrote it)."""
    beds = []
    for path in sorted(hostbed.STATE_ROOT.glob("*/state.json")):
        raw = json.loads(Path(path).read_text())
        raw["hosts"] = [hostbed.Host(**h) for h in raw["hosts"]]
        beds.append(hostbed.HostBed(**{**raw, "owner": tuple(raw["owner"])}))
    return beds


def owner_alive(bed: hostbed.HostBed) -> bool:
    """Whether the process that made the bed still runs (a bed made by `up` has none)."""
    pid, started = bed.owner
    return hostbed.start_time(pid) == started != 0


def pick(tag: str | None) -> list[hostbed.HostBed]:
    """The bed named `tag`, or (None) every bed whose maker has exited: a running test's bed is left alone."""
    beds = recorded()
    chosen = [b for b in beds if b.tag == tag] if tag else [b for b in beds if not owner_alive(b)]
    if tag and not chosen:
        raise SystemExit(f"no bed {tag!r} under {hostbed.STATE_ROOT}; `python -m bench.hosts status` lists them")
    return chosen


def cmd_down(args: argparse.Namespace) -> int:
    """Take beds down: their processes, namespaces, links and files."""
    for bed in pick(args.bed):
        start = time.perf_counter()
        hostbed.down(bed)
        print(f"bed {bed.tag} down in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command on one host of the (only, or named) bed, with the bed's Ray env."""
    bed = the_bed(args.bed, args.host)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = bed.run_on(args.host, command, capture=False)
    return proc.returncode


def the_bed(tag: str | None, host: int) -> hostbed.HostBed:
    """The (only, or named) bed, checked to have host `host`."""
    beds = pick(tag) if tag else recorded()
    if len(beds) != 1:
        raise SystemExit(f"{len(beds)} beds recorded; name one with --bed (`python -m bench.hosts status`)")
    if not 1 <= host <= len(beds[0].hosts):
        raise SystemExit(f"host {host}: bed {beds[0].tag} has hosts 1..{len(beds[0].hosts)}")
    return beds[0]


def cmd_fault(args: argparse.Namespace) -> int:
    """Pull or plug a host's cable, kill it whole, or restart it (rejoining the head)."""
    bed = the_bed(args.bed, args.host)
    if args.what in ("link-down", "link-up"):
        bed.set_link(args.host, args.what == "link-up")
    elif args.what == "kill":
        bed.kill_host(args.host)
    else:
        bed.restart_host(args.host)
    print(f"bed {bed.tag} host {args.host}: {args.what} done")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("up", help="start a bed (kept after this command exits)")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs each host's Ray declares")
    p.add_argument("--gpus", type=int, default=2, help="logical GPUs each host's Ray declares (workers compute "
                   "on the CPU; one actor per declared GPU)")
    p.add_argument("--object-store-mb", dest="object_store_mb", type=int, default=512)
    p.set_defaults(run=cmd_up)
    sub.add_parser("status", help="list the recorded beds").set_defaults(run=cmd_status)
    p = sub.add_parser("down", help="take beds down (default: every bed whose maker has exited)")
    p.add_argument("--bed", help="the tag of one bed, as `status` prints it")
    p.set_defaults(run=cmd_down)
    p = sub.add_parser("run", help="run a command on one host")
    p.add_argument("--bed", help="the tag of the bed (needed when several are recorded)")
    p.add_argument("host", type=int, help="1-based host number")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_run)
    p = sub.add_parser("fault", help="pull or plug a host's cable, kill it whole, or restart it")
    p.add_argument("--bed", help="the tag of the bed (needed when several are recorded)")
    p.add_argument("host", type=int, help="1-based host number")
    p.add_argument("what", choices=["link-down", "link-up", "kill", "restart"])
    p.set_defaults(run=cmd_fault)
    args = ap.parse_args(argv)
    if args.action in ("up", "run", "fault") and (reason := hostbed.missing()):
        print(f"bench.hosts: {reason}", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
