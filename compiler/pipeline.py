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
from relaxlm.frontends import ExportedModel, export, load_checkpoint
from relaxlm.frontends.checkpoint import Checkpoint

from . import schedules
from .fuse_dequantize_matmul import FuseDequantizeMatmul
from .lower_attention_to_paged_kv import LowerAttentionToPagedKV, paged_kv_layout
from .quantization import QuantScheme, quantize, resolve_scheme
from .quantize_weights import QuantizeWeights, param_plan
from .targets import TargetPreset, resolve_target

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
    scheme = resolve_scheme(quant)
    say = _Reporter(progress)
    preset = resolve_target(target)
    checkpoint = load_checkpoint(model)
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) for {preset.name}")
    exported = export(checkpoint, dtype)
    say("graph exported")
    executable, kv_layout, plan = build_library(exported, preset, scheme, say)
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / f"{preset.name}{preset.library_suffix}"
        executable.export_library(str(library))
        say("library linked")
        writer.add_library(preset.name, library, preset.tvm_target)
        layout = [(e["name"], tuple(e["shape"]), np.dtype(dtype_of(e["dtype"]))) for e in plan]
        writer.write_weights(layout, _converted_weights(checkpoint, exported, plan, scheme, say))
        say("weights written")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        manifest = Manifest(
            relaxlm_version=relaxlm.__version__,
            tvm_version=tvm.__version__,
            architecture=exported.architecture,
            model_config=exported.config,
            dtype=dtype,
            quantization=scheme.to_manifest() if scheme else {"scheme": "none"},
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
    exported: ExportedModel,
    preset: TargetPreset,
    scheme: QuantScheme | None = None,
    say=lambda msg: None,
) -> tuple[tvm.runtime.Executable, dict, list[dict]]:
    """Run the four phases on the exported graph.

    Returns the executable, the KV-cache layout and the weight plan: one entry per tensor
    the library takes, in order ({name, shape, dtype, source, part}).
    """
    target = preset.target()
    mod = exported.mod
    dump = os.environ.get("RELAXLM_DUMP_IR")

    # 1. graph rewrites
    mod = LowerAttentionToPagedKV(target, exported.dtype)(mod)
    kv_layout = paged_kv_layout(mod)
    if scheme is not None:
        mod = QuantizeWeights(scheme, exported.dtype)(mod)
        mod = FuseDequantizeMatmul()(mod)
    plan = _weight_plan(exported, param_plan(mod))
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
    return executable, kv_layout, plan


def _weight_plan(exported: ExportedModel, quantized: list[dict] | None) -> list[dict]:
    """Name, shape and dtype of every tensor the library takes, in its parameter order."""
    names = exported.param_names
    if quantized is None:
        quantized = [
            {
                "source": i,
                "part": "",
                "shape": list(exported.param_shapes[n]),
                "dtype": exported.dtype,
            }
            for i, n in enumerate(names)
        ]
    plan = []
    for entry in quantized:
        source = names[entry["source"]]
        name = f"{source}.{entry['part']}" if entry["part"] else source
        plan.append({**entry, "source": source, "name": name})
    return plan


def dtype_of(dtype: str):
    """numpy dtype for a weight dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _converted_weights(
    checkpoint: Checkpoint, exported: ExportedModel, plan: list[dict], scheme, say
):
    """The plan's tensors in order, each checkpoint tensor read and converted once.

    One tensor at a time: peak memory stays near the largest tensor, not the model.
    """
    compute = np.dtype(dtype_of(exported.dtype))  # of scales and zero points
    sources = list(dict.fromkeys(e["source"] for e in plan))
    entries = iter(plan)
    bar = tqdm(sources, desc="weights", unit="tensor", disable=not say.enabled, file=sys.stderr)
    for source in bar:
        array = checkpoint.read(source)
        first = next(entries)
        if first["part"] == "":  # stored as is, in its dtype (a cast scheme's narrower one)
            # via float32: numpy cannot cast bfloat16 to float16 directly
            yield first["name"], array.astype(np.float32).astype(dtype_of(first["dtype"]))
            continue
        parts = quantize(scheme, array, compute)
        yield first["name"], parts[0]
        for part in parts[1:]:
            yield next(entries)["name"], part


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
