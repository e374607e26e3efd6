"""The compile pipeline, in one place: checkpoint -> graph -> passes -> TVM build -> artifact.

Phases of `build_library` (per-target differences inline):
  1. graph rewrites   paged attention (the frontend's attention op -> TVM's paged KV cache),
                      transpose+matmul fusion so weights are never transposed at run time
  2. legalize / fuse  Relax ops -> TIR, fused into kernels
  3. schedules        per-target rules over the fused TIR kernels
  4. VM lowering      TVM's default Relax build pipeline, then codegen
Set RELAXLM_DUMP_IR=DIR to write the module after each phase.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm
from tqdm import tqdm
from tvm import relax

import relaxlm
from relaxlm.artifacts import ArtifactWriter, Manifest
from relaxlm.errors import RelaxlmError
from relaxlm.frontends import ExportedModel, export, load_checkpoint
from relaxlm.frontends.checkpoint import Checkpoint

from . import schedules
from .lower_attention_to_paged_kv import LowerAttentionToPagedKV, paged_kv_layout
from .targets import TargetPreset, resolve_target

QUANT_SCHEMES = ("none",)
DEFAULT_PREFILL_CHUNK = 1024


def compile_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "cpu",
    quant: str = "none",
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Compile a checkpoint into an artifact folder at `output`; returns its path."""
    if quant not in QUANT_SCHEMES:
        raise RelaxlmError(
            f"quantization {quant!r} is not supported yet; supported: {', '.join(QUANT_SCHEMES)}"
        )
    say = _Reporter(progress)
    preset = resolve_target(target)
    checkpoint = load_checkpoint(model)
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) for {preset.name}")
    exported = export(checkpoint, dtype)
    say("graph exported")
    executable, kv_layout = build_library(exported, preset, say)
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / f"{preset.name}{preset.library_suffix}"
        executable.export_library(str(library))
        say("library linked")
        writer.add_library(preset.name, library, preset.tvm_target)
        layout = [
            (n, exported.param_shapes[n], np.dtype(dtype_of(dtype))) for n in exported.param_names
        ]
        writer.write_weights(layout, _converted_weights(checkpoint, exported, say.enabled))
        say("weights written")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        manifest = Manifest(
            relaxlm_version=relaxlm.__version__,
            tvm_version=tvm.__version__,
            architecture=exported.architecture,
            model_config=exported.config,
            dtype=dtype,
            quantization={"scheme": quant},
            context_window=exported.context_window,
            prefill_chunk_size=min(DEFAULT_PREFILL_CHUNK, exported.context_window),
            vocab_size=exported.vocab_size,
            kv_cache={**kv_layout, "page_size": 16},
            params=[],
            shards={},
            targets={},
            tokenizer={},
            source={"path": str(checkpoint.path)},
        )
        out = writer.commit(manifest)
    say(f"artifact written to {out}")
    return out


def build_library(
    exported: ExportedModel, preset: TargetPreset, say=lambda msg: None
) -> tuple[tvm.runtime.Executable, dict]:
    """Run the four phases on the exported graph; returns the executable and KV layout."""
    target = preset.target()
    mod = exported.mod
    dump = os.environ.get("RELAXLM_DUMP_IR")

    # 1. graph rewrites
    mod = LowerAttentionToPagedKV(target, exported.dtype)(mod)
    kv_layout = paged_kv_layout(mod)
    mod = relax.transform.FuseTransposeMatmul()(mod)
    _dump(dump, "1-graph", mod)

    # 2. legalize / fuse
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)
    _dump(dump, "2-fused", mod)

    # 3. schedules
    with target:
        mod = schedules.for_target(preset)(mod)
    _dump(dump, "3-scheduled", mod)
    say("graph lowered and scheduled; generating code")

    # 4. VM lowering and codegen
    start = time.perf_counter()
    executable = relax.build(
        mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline()
    )
    say(f"code generated in {time.perf_counter() - start:.1f} s")
    return executable, kv_layout


def dtype_of(dtype: str):
    """numpy dtype for a weight dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _converted_weights(checkpoint: Checkpoint, exported: ExportedModel, show: bool):
    """Checkpoint tensors in graph order, converted to the compile dtype one at a time."""
    target = np.dtype(dtype_of(exported.dtype))
    names = exported.param_names
    for name in tqdm(names, desc="weights", unit="tensor", disable=not show, file=sys.stderr):
        array = checkpoint.read(name)
        if array.dtype != target:
            # via float32: numpy cannot cast bfloat16 to float16 directly
            array = array.astype(np.float32).astype(target)
        yield name, array


def _dump(folder: str | None, phase: str, mod: tvm.IRModule) -> None:
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{phase}.py").write_text(mod.script(show_meta=False))


class _Reporter:
    """Phase messages with elapsed time on stderr (the CLI's progress display)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(
                f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True
            )
