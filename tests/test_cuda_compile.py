"""CUDA builds on a machine without a GPU: launch limits checked at compile time (a test
double schedules blocks too large to launch).

The compile failures seen on an H200 (notes/gpu-h200.md: float16 matmuls crashing in dlight's
tensor-core path, TVM's TIR CSE breaking a Llama-3-style build, Phi-3's head_dim 24 decode
block) are cells of the compile matrix, tests/test_cuda_matrix.py.
"""

import pytest

from relaxlm.errors import RelaxlmError
from relaxlm.tvm_api import ScheduleRule, s_tir, tirx

CUDA = "cuda:sm_80,sm_90"


def _exported(checkpoints_or_dir, dtype="float32"):
    from relaxlm.frontends import export, load_checkpoint

    return export(load_checkpoint(checkpoints_or_dir), dtype)


class TooLargeBlock(ScheduleRule):
    """A test double: schedules each single-block injective kernel with 2048-thread blocks."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1:
            return None
        try:
            fused = sch.fuse(*sch.get_loops(blocks[0]))
            bx, tx = sch.split(fused, [None, 2048])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        except Exception:  # a reduction: not this double's to schedule
            return None
        return sch


def test_a_schedule_with_too_large_blocks_is_refused_at_compile_time(checkpoints, monkeypatch):
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.schedules import gpu
    from relaxlm.compiler.targets import resolve_target

    rules = gpu.gpu_rules
    monkeypatch.setattr(gpu, "gpu_rules", lambda: [TooLargeBlock(), *rules()])
    exported = _exported(checkpoints("llama_gqa"))
    with pytest.raises(RelaxlmError) as error:
        pipeline.build_library(exported, resolve_target(CUDA), scheduled_only=True)
    message = str(error.value)
    assert message.startswith("LlamaForCausalLM in float32: kernel ")
    assert "2048x1x1 = 2048 threads on target 'cuda' (sm_80, sm_90)" in message
    assert "at most 1024 threads per block and 1024x1024x64" in message
