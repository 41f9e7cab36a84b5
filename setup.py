"""Builds the CPU kernels (actors/shard/csrc) at install; everything else about the package is in pyproject.toml.

The build is optional: without a working C compiler the install still succeeds, and native.py builds the kernels
at first use or keeps the torch paths.
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent

# Loaded by path: inside pip's isolated build environment neither torch nor the package itself can be imported.
_spec = importlib.util.spec_from_file_location("kernel_build", ROOT / "actors/shard/kernel_build.py")
assert _spec is not None and _spec.loader is not None
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)


class BuildKernels(build_ext):
    """Compiles the kernels with the same commands as the first-use build (kernel_build), not Python's CFLAGS."""

    def build_extension(self, ext: Extension) -> None:
        """Build `ext` into the place setuptools expects; a failure is a CompileError (skipped: optional=True)."""
        try:
            kernel_build.compile_library(Path(self.get_ext_fullpath(ext.name)))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            raise CompileError(f"the CPU kernels did not build ({detail.strip()[:500]}); "
                               "install gcc (or set CC) for them, the torch paths work without") from e


sources = [str(path.relative_to(ROOT)) for path in kernel_build.SOURCES]
setup(ext_modules=[Extension(kernel_build.EXTENSION, sources=sources, optional=True)],
      cmdclass={"build_ext": BuildKernels})
