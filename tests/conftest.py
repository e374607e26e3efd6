"""Shared fixtures: tiny checkpoints built once per session, compiled once per session."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the user's cache; compiled artifacts are shared within one session. Under
# pytest-xdist (the README's `-n auto`) every worker of a run shares one cache: entries are keyed
# by content and compiled under a lock, so a model one worker compiled is loaded by the others.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _run:
    _cache = Path(tempfile.gettempdir()) / f"relaxlm-test-cache-{_run}"
    _cache.mkdir(exist_ok=True)
    os.environ["RELAXLM_CACHE"] = str(_cache)
else:
    os.environ["RELAXLM_CACHE"] = tempfile.mkdtemp(prefix="relaxlm-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TVM sizes its CPU thread pool once, when the first parallel kernel runs, to half the CPUs
# unless TVM_NUM_THREADS says (runtime/loader.py `use_threads`): one thread on a 2-core CI
# machine for the whole session if a test runs a kernel before any model is loaded. The workers
# split the CPUs: TVM's and torch's pools spin at their barriers, so more threads than cores
# slow every parallel kernel down.
_threads = max(
    1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
)
os.environ.setdefault("TVM_NUM_THREADS", str(_threads))
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case name -> checkpoint folder, built on first use."""
    from hf_models import PARITY_CASES, make_model

    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = make_model(tmp_path_factory.mktemp(case), **PARITY_CASES[case])
        return built[case]

    return get


@pytest.fixture(scope="session")
def compiled(checkpoints):
    """(case name, dtype) -> loaded relaxlm.LLM (compiled into the session cache on first use)."""
    import relaxlm

    loaded: dict[tuple[str, str], relaxlm.LLM] = {}

    def get(case: str, dtype: str = "float32") -> "relaxlm.LLM":
        if (case, dtype) not in loaded:
            loaded[case, dtype] = relaxlm.LLM(str(checkpoints(case)), dtype=dtype)
        return loaded[case, dtype]

    return get


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory):
    """A one-layer Llama whose weight dimensions all exceed 64 (dlight's tensor-core minimum)
    and span several GEMM tiles: hidden 256, MLP 704, a vocabulary of a few hundred. Loaded."""
    from relaxlm.frontends import load_checkpoint
    from relaxlm.testing.tiny_models import DEMO_CONFIG, make_model

    folder = tmp_path_factory.mktemp("wide")
    return load_checkpoint(make_model(folder, base_config=DEMO_CONFIG, num_hidden_layers=1))
