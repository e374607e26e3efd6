"""NCCL for tensor-parallel shards on CUDA GPUs (runtime/nccl.py, runtime/disco.py), as far as a
machine without a GPU can check it: the binding's enum tables against the headers they come
from (the nvidia-nccl wheel's nccl.h, TVM's ReduceKind), the real libnccl loaded and called, a
sharded artifact compiled for CUDA, and clear errors where a GPU is needed. What a GPU run must
still verify: scripts/nccl_check.py."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tvm
from hf_models import make_model

import relaxlm
from relaxlm.artifacts import Manifest
from relaxlm.errors import RelaxlmError
from relaxlm.runtime import nccl


def _enum_values(header: Path) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"\b(\w+)\s*=\s*(\d+)\b", header.read_text())}


def test_the_tables_equal_the_headers():
    folder = importlib.util.find_spec("nvidia.nccl").submodule_search_locations[0]
    nccl_h = _enum_values(Path(folder) / "include" / "nccl.h")
    names = {"float16": "Float16", "float32": "Float32", "float64": "Float64"}
    names |= {"bfloat16": "Bfloat16", "int8": "Int8", "uint8": "Uint8", "int32": "Int32"}
    names |= {"uint32": "Uint32", "int64": "Int64", "uint64": "Uint64"}
    assert {dtype: nccl_h[f"nccl{n}"] for dtype, n in names.items()} == nccl.DATA_TYPES
    # Disco's reduce kinds (TVM's header) to NCCL's ops, by name: min and max swap places.
    disco_h = Path(tvm.__file__).parent / "include/tvm/runtime/disco/builtin.h"
    kinds = {v: k[1:] for k, v in _enum_values(disco_h).items() if re.fullmatch("k[A-Z]\\w+", k)}
    assert {kind: nccl_h[f"nccl{name}"] for kind, name in kinds.items()} == nccl.REDUCE_OPS
    assert len(kinds) == 5


def test_the_wheels_library_answers():
    assert nccl.version() == importlib.metadata.version("nvidia-nccl-cu13")
    a, b = nccl.unique_id(), nccl.unique_id()
    assert len(a) == len(b) == nccl.UNIQUE_ID_BYTES and a != b


def test_without_a_gpu_a_communicator_is_one_clear_error():
    with pytest.raises(RelaxlmError, match="CUDA|cuda"):
        nccl.Communicator(nccl.unique_id(), 1, 0, 0)
    with pytest.raises(RelaxlmError, match="128 bytes"):
        nccl.Communicator(b"short", 1, 0, 0)


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(nccl, "_LIBRARY", None)
    monkeypatch.setenv("RELAXLM_NCCL_LIBRARY", "/nonexistent/libnccl.so.2")
    with pytest.raises(RelaxlmError, match=r"pip install 'relaxlm\[cuda\]'"):
        nccl.version()


def test_a_sharded_cuda_artifact_compiles_and_asks_for_its_gpus(tmp_path):
    checkpoint = make_model(tmp_path / "ckpt", seed=3, num_attention_heads=8, num_key_value_heads=4)
    out = tmp_path / "tp2"
    # `relaxlm compile` in a child process: a CUDA build with device binaries loads TVM's CUDA
    # plugin for good, and later source-only CUDA builds of the suite cannot run after it.
    compile_ = ["compile", str(checkpoint), "-o", str(out), "--tensor-parallel", "2"]
    command = [sys.executable, "-m", "relaxlm", *compile_, "--target", "cuda", "--dtype", "float16"]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = Manifest.read(out)
    assert manifest.tensor_parallel["shards"] == 2 and list(manifest.targets) == ["cuda"]
    with pytest.raises(RelaxlmError, match="'cuda:0' is not available"):
        relaxlm.LLM(out, device="cuda")
    with pytest.raises(RelaxlmError, match="shard i takes device i"):
        relaxlm.LLM(out, device="cuda:1")
    with pytest.raises(RelaxlmError, match="no library for device 'cpu'"):
        relaxlm.LLM(out, device="cpu")
