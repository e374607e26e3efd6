"""Shared fixtures: tiny checkpoints built once per session, compiled once per session."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the user's cache; compiled artifacts are shared within one session.
os.environ["RELAXLM_CACHE"] = tempfile.mkdtemp(prefix="relaxlm-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TVM sizes its CPU thread pool once, when the first parallel kernel runs, to half the CPUs
# unless TVM_NUM_THREADS says (runtime/loader.py `use_threads`): one thread on a 2-core CI
# machine for the whole session if a test runs a kernel before any model is loaded.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


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
