"""The compile pipeline, in one place: checkpoint -> graph -> passes -> TVM build -> artifact.

Phases of `build_library` (per-target differences inline):
  1. graph rewrites   paged attention (the frontend's attention op -> TVM's paged KV cache;
                      for embedding models, which keep no cache, plain causal attention),
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
from relaxlm.artifacts import MANIFEST, ArtifactWriter, Manifest
from relaxlm.frontends import ExportedModel, export, load_checkpoint
from relaxlm.frontends.checkpoint import Checkpoint

from . import schedules
from .cpu_legalize import cpu_legalizations
from .fuse_dequantize_matmul import FuseDequantizeMatmul
from .fuse_parallel_linear import FuseParallelLinear, param_sources
from .int8_dot import has_int8_dot
from .lower_attention_to_causal import LowerAttentionToCausal
from .lower_attention_to_paged_kv import LowerAttentionToPagedKV, paged_kv_layout
from .quantization import (
    GGUF_SCHEMES,
    SCHEMES,
    QuantScheme,
    dequantize,
    quantize,
    resolve_scheme,
    row_tiled,
)
from .quantize_weights import QuantizeWeights, param_plan
from .targets import TargetPreset, build_context, resolve_targets

DEFAULT_PREFILL_CHUNK = 1024


def compile_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str | list[str] = "cpu",
    quant: str = "none",
    dtype: str = "float32",
    progress: bool = True,
    add: bool = False,
) -> Path:
    """Compile a checkpoint into an artifact folder at `output`; returns its path.

    target: a preset, several (`cuda:sm_80,sm_90,metal`, or a list): one library per target
        over one set of weights.
    add: keep the libraries of the artifact at `output` and add these (it must have been
        compiled from the same checkpoint with the same options: same weights).
    """
    say = _Reporter(progress)
    presets = resolve_targets(target)
    base = Path(output) if add else None
    scheme = scheme_for_targets(resolve_scheme(quant), presets, dtype, base)
    checkpoint = load_checkpoint(model)
    names = ", ".join(p.name for p in presets)
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) for {names}")
    exported = export(checkpoint, dtype)
    say("graph exported")
    stored = stored_schemes(checkpoint, exported, scheme)
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        if add:
            writer.keep_libraries(output)
        for preset in presets:  # the graph, weight plan and KV layout do not depend on it
            executable, kv_layout, plan = build_library(exported, preset, scheme, say, stored)
            library = Path(scratch) / f"{preset.name}{preset.library_suffix}"
            executable.export_library(str(library))
            say(f"{preset.name} library linked")
            writer.add_library(preset.name, library, preset.tvm_target, **preset.extra_manifest)
        layout = [(e["name"], tuple(e["shape"]), np.dtype(dtype_of(e["dtype"]))) for e in plan]
        writer.write_weights(layout, _converted_weights(checkpoint, exported, plan, say))
        say("weights written")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        manifest = Manifest(
            relaxlm_version=relaxlm.__version__,
            tvm_version=tvm.__version__,
            architecture=exported.architecture,
            model_config=exported.config,
            dtype=dtype,
            quantization=_quantization_manifest(checkpoint, scheme, plan),
            context_window=exported.context_window,
            # Per-layer sliding windows cap the tokens one sequence may add per forward.
            prefill_chunk_size=min(
                DEFAULT_PREFILL_CHUNK,
                exported.context_window,
                kv_layout.get("max_prefill_chunk") or DEFAULT_PREFILL_CHUNK,
            ),
            vocab_size=exported.vocab_size,
            kv_cache={**kv_layout, "page_size": 16} if kv_layout else {},
            params=[],
            shards={},
            targets={},
            tokenizer={},
            source={"path": str(checkpoint.path)},
            task=exported.task,
            embedding=exported.embedding,
        )
        out = writer.commit(manifest)
    say(f"artifact written to {out}")
    return out


def scheme_for_targets(
    scheme: QuantScheme | None, presets: list[TargetPreset], dtype: str, base: Path | None
) -> QuantScheme | None:
    """`scheme` as stored for these targets: `q4` and `q8` in row tiles where every target is a
    CPU with an int8 dot product and the model computes in float32 (see `row_tiled`), else as
    it is; when adding libraries to the artifact at `base`, as that artifact stores it."""
    if scheme is None or row_tiled(scheme) == scheme:
        return scheme
    if base is not None and (base / MANIFEST).is_file():
        tiled = bool(Manifest.read(base).quantization.get("row_tile"))
    else:
        tiled = dtype == "float32" and all(has_int8_dot(p.target()) for p in presets)
    return row_tiled(scheme) if tiled else scheme


def build_library(
    exported: ExportedModel,
    preset: TargetPreset,
    scheme: QuantScheme | None = None,
    say=lambda msg: None,
    stored: dict[int, QuantScheme] | None = None,
    scheduled_only: bool = False,
) -> tuple[tvm.runtime.Executable, dict, list[dict]]:
    """Run the four phases on the exported graph.

    scheduled_only: stop after phase 3 and return the scheduled IRModule in place of the
        executable (tests run its kernels alone).

    stored: packed-param index -> the scheme a weight is already stored in (GGUF blocks);
        `scheme` quantizes the other linear weights.
    Returns the executable, the KV-cache layout (empty for embedding models) and the weight
    plan: one entry per tensor the library takes, in order ({name, shape, dtype, source, part,
    and scheme for parts}).
    """
    target = preset.target()
    mod = exported.mod
    dump = os.environ.get("RELAXLM_DUMP_IR")

    # 1. graph rewrites
    if exported.task == "embed":  # whole texts at once, no KV cache
        mod = LowerAttentionToCausal()(mod)
        kv_layout = {}
    else:
        mod = LowerAttentionToPagedKV(target, exported.dtype)(mod)
        kv_layout = paged_kv_layout(mod)
    mod = FuseParallelLinear(stored)(mod)
    sources = param_sources(mod, len(exported.param_names))
    stored = {j: stored[s[0]] for j, s in enumerate(sources) if s[0] in (stored or {})}
    if scheme is not None or stored:
        mod = QuantizeWeights(scheme, exported.dtype, stored)(mod)
        mod = FuseDequantizeMatmul(int8_dot=has_int8_dot(target))(mod)
    plan = _weight_plan(exported, sources, param_plan(mod))
    mod = relax.transform.FuseTransposeMatmul()(mod)
    _dump(dump, "1-graph", mod)

    # 2. legalize / fuse
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(cpu_legalizations() if preset.device == "cpu" else None),
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
    if scheduled_only:
        return mod, kv_layout, plan
    say("graph lowered and scheduled; generating code")

    # 4. VM lowering and codegen
    start = time.perf_counter()
    with build_context(preset):  # GPU: target in scope; CUDA: nvcc fatbin for every arch
        executable = relax.build(
            mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline()
        )
    say(f"code generated in {time.perf_counter() - start:.1f} s")
    return executable, kv_layout, plan


def _weight_plan(
    exported: ExportedModel, sources: list[list[int]], quantized: list[dict] | None
) -> list[dict]:
    """Name, shape and dtype of every tensor the library takes, in its parameter order.

    sources: per packed param, the checkpoint tensors whose rows it concatenates (see
    FuseParallelLinear); each plan entry lists their names under "sources".
    """
    members = [[exported.param_names[i] for i in s] for s in sources]
    if quantized is None:
        quantized = []
        for i, names in enumerate(members):
            shapes = [exported.param_shapes[n] for n in names]
            shape = [sum(s[0] for s in shapes), *shapes[0][1:]] if len(names) > 1 else shapes[0]
            entry = {"source": i, "part": "", "shape": list(shape), "dtype": exported.dtype}
            quantized.append(entry)
    plan = []
    for entry in quantized:
        names = members[entry["source"]]
        source = _fused_name(names)
        name = f"{source}.{entry['part']}" if entry["part"] else source
        plan.append({**entry, "source": source, "sources": names, "name": name})
    return plan


def _fused_name(names: list[str]) -> str:
    """a.q_proj.weight + a.k_proj.weight -> a.q_proj+k_proj.weight (the name if alone)."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    head = head[: head.rfind(".") + 1]
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    tail = tail[tail.find(".") :] if "." in tail else ""
    return head + "+".join(n[len(head) : len(n) - len(tail)] for n in names) + tail


def dtype_of(dtype: str):
    """numpy dtype for a weight dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def stored_schemes(
    checkpoint: Checkpoint, exported: ExportedModel, scheme: QuantScheme | None
) -> dict[int, QuantScheme]:
    """Packed-param index -> the scheme its weight is stored in, for weights kept as stored.

    GGUF block types (Q4_K, ...) are always kept: never dequantized and requantized. F16 /
    BF16 tensors are kept as they are unless a quantization scheme was asked for.
    """
    stored = getattr(checkpoint, "stored_types", None) or {}
    out = {}
    for i, name in enumerate(exported.param_names):
        ggml_type = stored.get(name, "F32")
        if ggml_type in GGUF_SCHEMES:
            out[i] = GGUF_SCHEMES[ggml_type]
        elif ggml_type in _CAST_TYPES and scheme is None and exported.dtype == "float32":
            out[i] = SCHEMES[_CAST_TYPES[ggml_type]]
    return out


_CAST_TYPES = {"F16": "float16", "BF16": "bfloat16"}


def _quantization_manifest(checkpoint: Checkpoint, scheme: QuantScheme | None, plan: list[dict]):
    """The requested scheme, and for a GGUF file the formats its weights are kept in."""
    out = scheme.to_manifest() if scheme else {"scheme": "none"}
    stored = getattr(checkpoint, "stored_types", None)
    if stored:
        kept: dict[str, int] = {}
        for entry in plan:
            if entry["part"] in ("", "q"):
                name = entry["scheme"]["name"] if "scheme" in entry else entry["dtype"]
                kept[name] = kept.get(name, 0) + 1
        out = {**out, "source": "gguf", "tensors": kept}
        if scheme is None:
            out["scheme"] = "gguf"
    return out


def _converted_weights(checkpoint: Checkpoint, exported: ExportedModel, plan: list[dict], say):
    """The plan's tensors in order, each checkpoint tensor read and converted once.

    One tensor at a time: peak memory stays near the largest tensor, not the model. Stored
    blocks (GGUF) are copied as they are; a block tensor the graph needs as floats is
    dequantized exactly (numpy reference), never requantized.
    """
    compute = np.dtype(dtype_of(exported.dtype))  # of scales and zero points
    stored = getattr(checkpoint, "stored_types", None) or {}
    sources = list(dict.fromkeys(e["source"] for e in plan))
    entries = iter(plan)
    bar = tqdm(sources, desc="weights", unit="tensor", disable=not say.enabled, file=sys.stderr)
    for _ in bar:
        first = next(entries)
        names = first["sources"]  # fused rows (FuseParallelLinear) share one stored format
        arrays = [checkpoint.read(n) for n in names]
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        kind = stored.get(names[0])
        if first["part"] == "":  # stored as is, in its dtype (a cast scheme's narrower one)
            if kind in GGUF_SCHEMES:
                k = exported.param_shapes[names[0]][-1]
                array = dequantize(GGUF_SCHEMES[kind], [array], k)
            # via float32: numpy cannot cast bfloat16 to float16 directly
            target = dtype_of(first["dtype"])
            yield first["name"], array.astype(np.float32, copy=False).astype(target, copy=False)
            continue
        scheme = QuantScheme(**first["scheme"])
        if scheme.kind == "gguf":  # the file's own blocks, byte for byte
            assert list(array.shape) == first["shape"], (names, array.shape, first["shape"])
            yield first["name"], array
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
