"""Builds the CPU kernels in csrc/ into one shared library: at install (setup.py puts it beside the sources) and,
where that file is missing or was built from other sources or for another CPU, at first use into a per-machine cache.

Standard library only: setup.py loads this file by path inside pip's isolated build environment, where neither
torch nor this package can be imported.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sysconfig
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "paged_decode.c", "gemv.c", "gemm.c", "pointwise.c", "quant_gemm.c", "build_key.c")]
HEADERS = [CSRC / "simd.h"]  # included by the sources: part of the key
# -march=native: built for the CPU that runs it, so the CPU's flags are part of the key.
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
# Linked without -fopenmp, so the library names no OpenMP runtime of its own: its GOMP_*/omp_* calls stay
# unresolved until native.py loads it beside the runtime torch already uses (see native._openmp_runtime).
LINK_FLAGS = ["-shared"]
# setup.py's name for the install-time build: in csrc/, which is no package, so that pkgutil and importlib never
# mistake the library (no Python module) for an extension module of actors.shard.
EXTENSION = "actors.shard.csrc.kernels"
MARKER = "gridserve-kernel-key:"  # prefix of the key stored in the library (csrc/build_key.c)
TIMEOUT_S = 300


def kernel_dir() -> Path:
    """$GRIDSERVE_CACHE/kernels, else ~/.cache/gridserve/kernels: the root cluster.cache uses for models too."""
    return Path(os.environ.get("GRIDSERVE_CACHE") or Path.home() / ".cache" / "gridserve") / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), '' where /proc/cpuinfo has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def key() -> str:
    """What a build depends on: the sources, the flags and the CPU."""
    parts = [path.read_bytes() for path in SOURCES + HEADERS]
    parts += [" ".join(COMPILE_FLAGS + LINK_FLAGS).encode(), cpu_flags().encode(), platform.machine().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def installed_path() -> Path:
    """Where setup.py's build of the kernels lies (beside their sources)."""
    return CSRC / f"kernels{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def installed_library() -> Path | None:
    """The install-time build when it exists and was built from these sources for this CPU, else None."""
    path = installed_path()
    try:
        current = f"{MARKER}{key()}".encode() in path.read_bytes()
    except OSError:
        return None
    return path if current else None


def cached_library() -> Path:
    """The first-use build in the per-machine cache, compiled now unless this key's build is there already."""
    target = kernel_dir() / f"kernels-{key()}.so"
    if not target.exists():
        compile_library(target)
    return target


def compile_library(target: Path) -> None:
    """Compile the sources (in parallel) with $CC, else gcc, and link them into `target`."""
    cc = os.environ.get("CC") or "gcc"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a private folder, then renamed: workers starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = [f"{tmp}/{src.stem}.o" for src in SOURCES]
        define = f'-DGRIDSERVE_KERNEL_KEY="{key()}"'
        _run_all([[cc, *COMPILE_FLAGS, define, "-c", str(src), "-o", obj] for src, obj in zip(SOURCES, objects)])
        _run_all([[cc, *LINK_FLAGS, "-o", f"{tmp}/kernels.so", *objects, "-lm"]])
        os.replace(f"{tmp}/kernels.so", target)


def _run_all(commands: list[list[str]]) -> None:
    """Run `commands` at once; raise CalledProcessError (with the compiler's stderr) if any fails."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for proc, command in zip(procs, commands):
            _, err = proc.communicate(timeout=TIMEOUT_S)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, command, stderr=err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
