"""`--cuda-graph` (compiler/cuda_graph.py): an artifact compiled for CUDA with it replays its
decode kernels as CUDA graphs. Codegen only here (no GPU): the VM code of the linked library is
read back and the capture calls counted."""

import json
import re

import pytest

import relaxlm
from relaxlm.errors import RelaxlmError


def _vm_functions(library: str) -> dict[str, str]:
    """The linked library's VM code (TVM's `as_text`), function name -> its instructions."""
    import tvm

    from relaxlm.compiler.targets import _load_cuda_runtime

    _load_cuda_runtime()  # its CUDA module loads only with TVM's CUDA plugin registered
    text = tvm.runtime.load_module(library)["as_text"]()
    parts = re.split(r"^@([\w.]+):$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cuda_graph_captures_decode_between_attention_calls(checkpoints, tmp_path):
    checkpoint = checkpoints("llama_gqa")
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    out = relaxlm.compile(
        checkpoint, output=tmp_path / "a", target="cuda:sm_90", cuda_graph=True, progress=False
    )
    entry = json.loads((out / "manifest.json").read_text())["targets"]["cuda"]
    assert entry["cuda_graph"] is True
    functions = _vm_functions(str(out / entry["library"]))
    decode = functions["decode"]
    # One graph before each layer's paged-attention call and one after the last: the KV cache's
    # vm.builtin calls are never captured, so they split the step.
    captured = re.findall(r"run_or_capture in: %vm, f\[(decode_cuda_graph_capture\d*)\]", decode)
    assert len(captured) == len(set(captured)) == layers + 1
    assert all(name in functions for name in captured)
    assert decode.count("attention_kv_cache_attention") == layers
    assert "vm.builtin.cuda_graph.get_cached_alloc" in decode  # storage planned once, reused
    assert "cuda_graph" not in functions["prefill"]  # prefill launches as before


def test_cuda_graph_needs_a_cuda_target(checkpoints, tmp_path):
    with pytest.raises(RelaxlmError, match="--cuda-graph captures CUDA kernels, and target cpu"):
        relaxlm.compile(checkpoints("llama_gqa"), output=tmp_path / "a", cuda_graph=True)
