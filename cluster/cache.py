"""Where gridserve keeps what it derives or fetches once per machine (models, converted tokenizers)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GRIDSERVE_CACHE, else ~/.cache/gridserve: shared by clones, CI runs and replicas on this machine."""
    return Path(os.environ.get("GRIDSERVE_CACHE") or Path.home() / ".cache" / "gridserve")
