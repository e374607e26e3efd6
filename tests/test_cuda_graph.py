"""`--cuda-graph` (compiler/cuda_graph.py): an artifact compiled for CUDA with it replays its
decode kernels as CUDA graphs. Codegen only here (no GPU): the VM code of the linked library is
read back and the capture calls counted."""

import json
import re
import subprocess
import sys

import pytest

import relaxlm
from relaxlm.errors import RelaxlmError

# Compiled and read back in a child process: TVM's CUDA plugin, which a CUDA build with device
# binaries loads, would stay loaded in this one, and later source-only CUDA builds of the suite
# (build_context(device_binaries=False)) cannot run after it.
_CHILD = """
import json, re, sys
import relaxlm
from relaxlm.compiler.targets import _load_cuda_runtime
import tvm

out = relaxlm.compile(sys.argv[1], output=sys.argv[2], target="cuda:sm_90", cuda_graph=True,
                      progress=False)
entry = json.loads((out / "manifest.json").read_text())["targets"]["cuda"]
_load_cuda_runtime()  # the library's CUDA module loads only with TVM's CUDA plugin registered
text = tvm.runtime.load_module(str(out / entry["library"]))["as_text"]()
(out.parent / "vm.txt").write_text(text)
"""


def _vm_functions(text: str) -> dict[str, str]:
    """The linked library's VM code (TVM's `as_text`), function name -> its instructions."""
    parts = re.split(r"^@([\w.]+):$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cuda_graph_captures_decode_between_attention_calls(checkpoints, tmp_path):
    checkpoint = checkpoints("llama_gqa")
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    child = [sys.executable, "-c", _CHILD, str(checkpoint), str(tmp_path / "a")]
    built = subprocess.run(child, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    entry = json.loads((tmp_path / "a" / "manifest.json").read_text())["targets"]["cuda"]
    assert entry["cuda_graph"] is True
    functions = _vm_functions((tmp_path / "vm.txt").read_text())
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
