"""The model math stays Ray-free: importing every actors.shard module must not import ray."""
from __future__ import annotations

import subprocess
import sys


def test_shard_package_does_not_import_ray() -> None:
    """A fresh interpreter imports all of actors.shard and finds no ray in sys.modules."""
    code = ("import sys, pkgutil, importlib, actors.shard as s\n"
            "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('actors.shard.' + m.name)\n"
            "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
            "assert not bad, bad\nprint(len(list(pkgutil.iter_modules(s.__path__))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 8  # every module was really imported
