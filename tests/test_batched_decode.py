"""`decode_batched` (compiler/batched_decode.py): decode for many sequences through GEMMs that
read each weight once a step, cuBLAS's (`--gemm library`, float weights) or TIR's (the batch as
the GEMM's rows: tensor cores on CUDA in float16).

Which builds have it and what its kernels are is checked on the graph; its tokens on CPU builds
made with it on request (CPUs leave it out: slower there), against each prompt alone and the
build without it. The TIR GEMM it takes on GPUs runs on lavapipe in tests/test_webgpu_kernels.py.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from relaxlm.artifacts.library_gemm import BATCHED_DECODE, BATCHED_DECODE_MIN
from relaxlm.testing.ir import called_kernels
from relaxlm.tvm_api import tirx

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import gpu_check  # a script, beside the package

CASE = "llama_gqa"


@pytest.mark.parametrize(
    "target, dtype, quant, gemm, built",
    [
        ("cuda:sm_90", "float16", "q4", "tir", True),
        ("cuda:sm_90", "float16", "none", "tir", True),
        ("cuda:sm_90", "bfloat16", "q4", "tir", False),  # no tensor-core GEMM for it in TIR
        ("cuda:sm_90", "float16", "none", "library", True),
        ("cuda:sm_90", "float16", "q4", "library", False),  # dequantized every step
        ("cpu", "float32", "q4", "tir", False),
    ],
)
def test_which_builds_have_it(checkpoints, target, dtype, quant, gemm, built):
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.quantization import resolve_scheme
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint

    mod, _, _ = pipeline.build_library(
        export(load_checkpoint(checkpoints(CASE)), dtype),
        resolve_target(target),
        resolve_scheme(quant),
        scheduled_only=True,
        gemm=gemm,
    )
    functions = {gv.name_hint for gv, _ in mod.functions_items()}
    assert (BATCHED_DECODE in functions) == built
    if not built or gemm == "library":
        return
    # every weight matmul takes the batch as rows: [batch, 1, k] -> [1, batch, k]
    kernels = called_kernels(mod, BATCHED_DECODE, "NT_matmul")
    assert len(kernels) == 5, kernels  # fused qkv, o, fused gate/up, down, the logits head
    for name in kernels:
        x = list(mod[name].params[0].ty.shape)
        assert isinstance(x[0], tirx.IntImm) and int(x[0]) == 1, (name, x)
        if quant == "q4":  # the dequantize in the GEMM's tile loads, not DecodeGEMV's reduction
            assert "dequantize_reindex" in mod[name].script(), name
    # decode keeps DecodeGEMV's kernels
    assert not set(kernels) & set(called_kernels(mod, "decode", "NT_matmul"))


@pytest.mark.parametrize("gemm", ["tir", "library"])
def test_many_sequences_decode_batched_each_as_alone(checkpoints, tmp_path, gemm):
    """With BATCHED_DECODE_MIN sequences or more, a step runs BATCHED_DECODE (built here on
    request); the tokens are those of each prompt alone and of a build without it."""
    import relaxlm
    from relaxlm.compiler.pipeline import compile_model

    quant = "q4" if gemm == "tir" else "none"
    folder = compile_model(
        checkpoints(CASE),
        tmp_path / "m",
        progress=False,
        quant=quant,
        gemm=gemm,
        batched_decode=True,
    )
    batched = relaxlm.LLM(str(folder), max_batch_size=32)
    plain = relaxlm.LLM(
        str(compile_model(checkpoints(CASE), tmp_path / "p", progress=False, quant=quant))
    )
    entries = batched.model.stages[0].entries
    calls = {BATCHED_DECODE: 0, "decode": 0}
    for name in calls:
        entries[name] = _counted(entries[name], name, calls)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, batched.vocab_size, n).tolist() for n in range(3, 21)]
    assert len(prompts) > BATCHED_DECODE_MIN
    greedy = relaxlm.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    together = [r.token_ids for r in batched.generate(prompts, greedy)]
    assert calls[BATCHED_DECODE] > 0
    alone = [batched.generate([p], greedy)[0].token_ids for p in prompts]
    assert together == alone == [r.token_ids for r in plain.generate(prompts, greedy)]
    assert calls["decode"] > 0  # the prompts alone: batches of one
    # scripts/gpu_check.py's check of it: one step both ways, logits within float32's tolerance
    calls.update({BATCHED_DECODE: 0, "decode": 0})
    assert gpu_check.batched_decode_error(batched.model, prompts[:4]) <= 1e-5
    assert calls == {BATCHED_DECODE: 1, "decode": 1}
    assert BATCHED_DECODE in entries  # put back
    assert gpu_check.batched_decode_error(plain.model, prompts) is None


def _counted(entry, name: str, calls: dict):
    """`entry`, adding one to calls[name] at each call."""

    def call(*args):
        calls[name] += 1
        return entry(*args)

    return call
