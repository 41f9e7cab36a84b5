"""How the C kernels are found or built (install-time build, first-use cache, no compiler) and which OpenMP
runtime they run on."""
from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actors.shard
from actors.shard import kernel_build, native

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter at the repository root with `env` added to the environment."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **env})


def test_first_use_build_is_cached_and_keyed(tmp_path: Path) -> None:
    """A second process reuses the first's build, no temporaries are left, and the file holds its key."""
    code = "from actors.shard import kernel_build; print(kernel_build.cached_library())"
    first = python(code, GRIDSERVE_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    stamp = path.stat().st_mtime_ns
    again = python(code, GRIDSERVE_CACHE=str(tmp_path))
    assert Path(again.stdout.strip()) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [path.name]
    assert f"{kernel_build.MARKER}{kernel_build.key()}".encode() in path.read_bytes()


def test_the_installed_build_is_used_only_while_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The install-time file is taken while its key matches these sources and this CPU, else the cache's build."""
    installed, cached = tmp_path / "_kernels.so", tmp_path / "kernels-cached.so"
    shutil.copy(native.library_path(), installed)
    monkeypatch.setattr(kernel_build, "installed_path", lambda: installed)
    monkeypatch.setattr(kernel_build, "cached_library", lambda: cached)
    assert kernel_build.installed_library() == installed and native.library_path() == installed
    monkeypatch.setattr(kernel_build, "key", lambda: "0" * 20)  # edited sources, or another CPU
    assert kernel_build.installed_library() is None and native.library_path() == cached
    monkeypatch.undo()
    monkeypatch.setattr(kernel_build, "installed_path", lambda: tmp_path / "missing.so")
    assert kernel_build.installed_library() is None


def test_without_a_compiler_the_torch_paths_answer(tmp_path: Path) -> None:
    """No install-time build and no C compiler: the kernels are unavailable, a warning says why, and decode
    attention and the matmuls still answer through torch."""
    code = ("import torch\nfrom actors.shard import kernel_build, native\n"
            f"kernel_build.installed_path = lambda: kernel_build.Path({str(tmp_path / 'none.so')!r})\n"
            "from actors.shard.kv_cache import AttnMeta, PagedKVCache, paged_attention\n"
            "from actors.shard.layers import linear\n"
            "c = PagedKVCache(1, 4, 4, 1, 8, torch.float32, torch.device('cpu'))\n"
            "m = AttnMeta.build([1], [3], [[2]], 4, None, torch.device('cpu'))\n"
            "print(native.available(), native.matmuls_available(), "
            "tuple(paged_attention(torch.randn(1, 2, 8), c, 0, m, 0.5).shape), "
            "tuple(linear(torch.randn(1, 8), torch.randn(4, 8)).shape), "
            "tuple(linear(torch.randn(9, 8), torch.randn(4, 8)).shape))")
    out = python(code, CC="/nonexistent/cc", GRIDSERVE_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False (1, 16) (1, 4) (9, 4)"
    assert "fall back to torch" in out.stderr and "Install gcc" in out.stderr


def test_a_failed_compile_names_the_compilers_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails raises CalledProcessError with its stderr, and leaves no file behind."""
    monkeypatch.setenv("CC", "false")
    with pytest.raises(subprocess.CalledProcessError):
        kernel_build.compile_library(tmp_path / "k.so")
    assert list(tmp_path.iterdir()) == []


def test_the_kernels_run_on_torchs_openmp_runtime() -> None:
    """The library names no OpenMP runtime of its own: loaded beside torch, one runtime is mapped, torch's."""
    code = ("import pathlib, torch\nfrom actors.shard import native\nassert native.available()\n"
            "lines = open('/proc/self/maps').read().splitlines()\n"
            "paths = {l.split(maxsplit=5)[-1] for l in lines}\n"
            "print(sorted(p for p in paths if pathlib.Path(p).name.startswith(native.OPENMP_NAMES)))")
    out = python(code)
    assert out.returncode == 0, out.stderr
    runtimes = ast.literal_eval(out.stdout)
    assert len(runtimes) == 1 and runtimes[0].startswith(str(Path(torch.__file__).resolve().parent)), runtimes
    if shutil.which("readelf"):  # binutils: the library's own dependencies
        needed = subprocess.run(["readelf", "-d", str(native.library_path())], capture_output=True, text=True)
        assert "NEEDED" in needed.stdout and "omp" not in needed.stdout, needed.stdout


def test_openmp_runtime_prefers_torchs_own() -> None:
    """Of the OpenMP runtimes mapped here, the one in torch's folder is the one the kernels bind to."""
    path = native.openmp_runtime()
    assert path is not None and Path(path).name.startswith(native.OPENMP_NAMES)
    assert path.startswith(str(Path(torch.__file__).resolve().parent))


def test_the_installed_library_is_no_module_of_the_package() -> None:
    """The install-time build lies in csrc/, no package: walking actors.shard's modules never tries to import it."""
    names = {module.name for module in pkgutil.iter_modules(actors.shard.__path__)}
    assert kernel_build.installed_path().parent.name == "csrc" and "csrc" not in names
    assert not any(name.startswith(("kernels", "_kernels")) for name in names), names
