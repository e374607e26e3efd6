"""CUDA builds on a machine without a GPU: launch limits checked at compile time, and the
two compile failures seen on an H200 (notes/gpu-h200.md) that no test caught: float16 matmuls
crashing in dlight's tensor-core path, and TVM's TIR CSE breaking a Llama-3-style build.
"""

import shutil
import subprocess
import sys

import pytest

from relaxlm.errors import RelaxlmError
from relaxlm.tvm_api import ScheduleRule, s_tir, tirx

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
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
    assert message.startswith("LlamaForCausalLM: kernel ")
    assert "2048x1x1 = 2048 threads on target 'cuda' (sm_80)" in message
    assert "at most 1024 threads per block and 1024x1024x64" in message


def test_phi3_head_dim_24_decode_block_is_refused(tmp_path):
    """TVM's decode attention for head_dim 24 asks for blockDim.z = 85 (CUDA allows 64): the
    launch error seen on an H200, now a compile-time error."""
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.testing.tiny_models import make_model

    model = make_model(
        tmp_path / "phi3",
        arch="Phi3ForCausalLM",
        hidden_size=96,
        head_dim=24,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    with pytest.raises(
        RelaxlmError,
        match=r"Phi3ForCausalLM: kernel tir_attention_decode would "
        r"launch blocks of 6x1x85 = 510 threads on target 'cuda' \(sm_80\)",
    ):
        pipeline.build_library(_exported(model), resolve_target(CUDA), scheduled_only=True)


# -- the two crashes of issue 17 ---------------------------------------------------------------


def _compile_in_child(tmp_path, script: str) -> subprocess.CompletedProcess:
    # A segfault (what the tensorize path did) must fail this test, not end the test session.
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )


def test_float16_matmuls_schedule_for_cuda_without_tensorize(tmp_path):
    """dlight's Matmul takes its tensor-core path for float16 once every fixed dimension is
    above 64, and its tensorize segfaults in this TVM (hidden 64 never got there)."""
    script = (
        "from relaxlm.testing.tiny_models import make_model, TINY_CONFIG\n"
        "from relaxlm.frontends import export, load_checkpoint\n"
        "from relaxlm.compiler import pipeline\n"
        "from relaxlm.compiler.quantization import resolve_scheme\n"
        "from relaxlm.compiler.targets import resolve_target\n"
        "config = {**TINY_CONFIG, 'hidden_size': 128, 'intermediate_size': 256}\n"
        "model = make_model('m', base_config=config)\n"
        "exported = export(load_checkpoint(model), 'float16')\n"
        f"preset = resolve_target({CUDA!r})\n"
        "for quant in ('none', 'q4'):\n"
        "    pipeline.build_library(exported, preset, resolve_scheme(quant), scheduled_only=True)\n"
        "print('scheduled')\n"
    )
    proc = _compile_in_child(tmp_path, script)
    assert proc.returncode == 0 and "scheduled" in proc.stdout, proc.stderr[-3000:]


@needs_nvcc
def test_llama3_style_model_compiles_for_cuda(tmp_path):
    """TVM's TIR common-subexpression pass wrote `cse_vN` uses before their definitions for
    this config (llama3 RoPE, tied embeddings, hidden 256); GPU builds switch it off."""
    script = (
        "import relaxlm\n"
        "from relaxlm.testing.tiny_models import make_model, TINY_CONFIG\n"
        "config = {**TINY_CONFIG, 'hidden_size': 256, 'intermediate_size': 512}\n"
        "rope = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,\n"
        "        'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}\n"
        "model = make_model('m', base_config=config, tie_word_embeddings=True,\n"
        "                   rope_theta=500000.0, rope_scaling=rope)\n"
        f"relaxlm.compile(model, output='art', target={CUDA!r}, progress=False)\n"
        "print('compiled')\n"
    )
    proc = _compile_in_child(tmp_path, script)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
