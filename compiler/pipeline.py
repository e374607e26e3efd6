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

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import tvm
from tvm import relax

from relaxlm._version import __version__
from relaxlm.artifacts import MANIFEST, ArtifactWriter, Manifest
from relaxlm.artifacts.device_map import GPU_KINDS, Stage, resolve_stages
from relaxlm.errors import RelaxlmError
from relaxlm.frontends import (
    ARCHITECTURES,
    DTYPES,
    ExportedModel,
    SplitModel,
    export,
    load_checkpoint,
    split,
)
from relaxlm.frontends.lora import merge_lora
from relaxlm.frontends.lora_slots import LoraSlotsSpec, with_slot_weights
from relaxlm.frontends.tensor_parallel import shard

from . import schedules
from .batched_decode import MarkFewRows, RowsAsTokens, add_batched_decode
from .cpu_legalize import legalize_and_fuse
from .cuda_graph import mark_for_capture
from .float32_accumulation import AccumulateInFloat32
from .fuse_dequantize_matmul import FuseDequantizeMatmul
from .fuse_parallel_linear import fuse_parallel_linear
from .int8_dot import has_int8_dot, int8_dot_flavour
from .kv_quant import check_kv_cache_dtype
from .launch_limits import check_launch_limits
from .library_gemm import LibraryGemm, check_library_gemm
from .lower_attention_to_causal import LowerAttentionToCausal
from .lower_attention_to_paged_kv import KVCachePlan, lower_attention_to_paged_kv
from .quantization import (
    A8_REPACKS,
    GGUF_A8,
    QuantScheme,
    resolve_scheme,
    row_tiled,
    tied_table_scheme,
)
from .quantize_weights import quantize_weights
from .sampling_kernels import add_sampling_functions
from .targets import TargetPreset, build_context, resolve_target, resolve_targets
from .weights import (
    PlannedWeight,
    converted_weights,
    dtype_of,
    quantization_manifest,
    requantized_types,
    stored_schemes,
    weight_plan,
)

DEFAULT_PREFILL_CHUNK = 1024
PAGE_SIZE = 16


def compile_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str | list[str] = "cpu",
    quant: str = "none",
    dtype: str = "float32",
    progress: bool = True,
    add: bool = False,
    lora: list[str | os.PathLike] = (),
    device_map: str | None = None,
    gpu_layers: int | None = None,
    lora_slots: int = 0,
    lora_max_rank: int = 16,
    lora_targets: list[str] | None = None,
    tensor_parallel: int = 1,
    kv_cache_dtype: str = "auto",
    cuda_graph: bool = False,
    sampling_kernels: bool | None = None,
    gemm: str = "tir",
    batched_decode: bool | None = None,
) -> Path:
    """Compile a checkpoint into an artifact folder at `output`; returns its path.

    target: a preset, several (`cuda:sm_80,sm_90,metal`, or a list): one library per target
        over one set of weights.
    add: keep the libraries of the artifact at `output` and add these (it must have been
        compiled from the same checkpoint with the same options: same weights).
    lora: PEFT LoRA adapter folders merged into the checkpoint's weights, in order, before
        anything else sees them (so quantization applies to the merged weights).
    device_map: decoder layers per device (`cuda:0:0-23,cpu:24-31`, artifacts/device_map.py):
        one library per stage, each stage built for the `target` preset of its device kind
        (else that kind's default preset). gpu_layers: the last N layers on the GPU that
        `target` names (CUDA by default), the others on the CPU, as llama.cpp's `-ngl`.
    lora_slots: serve that many LoRA adapters at once, unmerged (frontends/lora_slots.py),
        each of rank <= lora_max_rank, on the linear layers lora_targets names (PEFT's
        target_modules; None: all but the logits head); adapters load at run time.
    tensor_parallel: split the model into that many shards run side by side (TVM Disco,
        runtime/tensor_parallel.py): one library, each shard's weights, the shard plan in the
        manifest (frontends/tensor_parallel.py). Llama, Mistral and Qwen2 checkpoint folders.
    kv_cache_dtype: what the KV cache's pages hold: auto (the model's dtype), float16, or
        int8 / fp8 codes with a float16 scale per token per kv head (CPU targets;
        compiler/kv_quant.py). The manifest's `kv_cache` records it.
    cuda_graph: capture decode's kernels in CUDA graphs on CUDA targets (compiler/cuda_graph.py);
        each CUDA library's manifest entry says `cuda_graph: true`.
    sampling_kernels: build the sampling kernels (compiler/sampling_kernels.py) into the
        libraries; None: for GPU targets (CPU runtimes sample in numpy, the faster there).
    gemm: who multiplies prefill's weight matmuls: "tir" (TVM's kernels) or "library"
        (cuBLAS on CUDA, numpy's BLAS on CPUs; compiler/library_gemm.py). Each library's
        manifest entry records it.
    batched_decode: also build `decode_batched`, decode for many sequences through GEMMs that
        read each weight once (compiler/batched_decode.py): the library's with gemm "library"
        (float weights only), TIR's tensor-core GEMM with "tir". None: on CUDA, with "tir" in
        float16 (dlight's WMMA). CPU builds leave it out (the library's ran slower than
        decode's kernels at 8 sequences there); tests build it.
    """
    say = _Reporter(progress)
    presets = resolve_targets(target)
    check_kv_cache_dtype(kv_cache_dtype)
    _check_gemm(gemm, presets, dtype, tensor_parallel, device_map, gpu_layers)
    if cuda_graph:
        _check_cuda_graph(presets, tensor_parallel, device_map, gpu_layers)
    if tensor_parallel != 1:
        others = {
            "--device-map / --gpu-layers": device_map is not None or gpu_layers is not None,
            "--lora-slots": bool(lora_slots),
            "--lora": bool(lora),
            "--add": add,
            f"--quant {GGUF_A8}": quant == GGUF_A8,
        }
        if clash := [name for name, given in others.items() if given]:
            raise RelaxlmError(
                f"--tensor-parallel {tensor_parallel} cannot be combined with "
                f"{', '.join(clash)} yet; compile the sharded model without it"
            )
        return _compile_sharded(
            model, output, tensor_parallel, presets, quant, dtype, kv_cache_dtype, say
        )
    slots = None
    if lora_slots:
        targets = tuple(lora_targets) if lora_targets is not None else None
        slots = LoraSlotsSpec(lora_slots, lora_max_rank, targets)
    if device_map is not None or gpu_layers is not None:
        if kv_cache_dtype != "auto":
            raise RelaxlmError(
                f"--kv-cache-dtype {kv_cache_dtype} is not built for models split across devices "
                "(each stage has its own cache); drop device_map / gpu_layers or use auto"
            )
        if slots is not None:
            raise RelaxlmError(
                "LoRA slots cannot be compiled into a model split across devices yet; drop "
                "device_map / gpu_layers, or merge the adapters (--lora)"
            )
        if add:
            raise RelaxlmError(
                "--add keeps another artifact's libraries, which a device map replaces by one "
                "library per stage; compile the split model into a new folder"
            )
        checkpoint = merge_lora(load_checkpoint(model), lora)
        gpu = next((p.device for p in presets if p.device in GPU_KINDS), "cuda")
        parts = split(checkpoint, dtype)
        stages = resolve_stages(device_map, gpu_layers, parts.num_layers, gpu)
        # One stage too (all layers on one GPU): the manifest then says which device runs it.
        return _compile_stages(parts, output, stages, presets, quant, say)
    base = Path(output) if add else None
    repack = quant == GGUF_A8  # GGUF blocks kept, computed with int8 activations
    scheme = None if repack else scheme_for_targets(resolve_scheme(quant), presets, dtype, base)
    checkpoint = merge_lora(load_checkpoint(model), lora)
    if repack:
        _check_repack(checkpoint, presets, dtype)
    names = ", ".join(p.name for p in presets)
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) for {names}")
    for adapter in checkpoint.adapters:
        say(f"merging LoRA adapter {adapter.path} as its weights are read")
    exported = export(checkpoint, dtype, slots)
    if slots is not None:  # the slot weights start as zeros: every slot empty
        checkpoint = with_slot_weights(checkpoint, exported.param_shapes)
        say(
            f"{slots.slots} LoRA slots of rank {slots.max_rank} on "
            f"{len(exported.lora_slots['targets'])} linear layers"
        )
    say("graph exported")
    stored = stored_schemes(checkpoint, exported, scheme, repack)
    if repack:
        say(
            f"GGUF blocks repacked for int8 dot products ({', '.join(A8_REPACKS)}: their codes "
            "and scales as they are), activations rounded to int8 per 32 as llama.cpp does"
        )
    if scheme is not None and (blocks := requantized_types(checkpoint)):
        kinds = ", ".join(f"{n} {t}" for t, n in blocks.items())
        say(
            f"requantizing the GGUF file's blocks ({kinds}) to {scheme.name}: "
            "dequantized exactly, then quantized again"
        )
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        if add:
            writer.keep_libraries(output)
        kv_cache, plan = _add_libraries(
            writer,
            Path(scratch),
            exported,
            presets,
            scheme,
            say,
            stored,
            kv_cache_dtype,
            cuda_graph,
            sampling_kernels,
            gemm,
            batched_decode,
        )
        layout = [(w.name, w.shape, dtype_of(w.dtype)) for w in plan]
        weights = converted_weights(checkpoint, exported, plan, say.enabled, repack)
        writer.write_weights(layout, weights)
        say("weights written")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        # Per-layer sliding windows cap the tokens one sequence may add per forward.
        chunk_limit = kv_cache.max_prefill_chunk if kv_cache else None
        manifest = _manifest(
            checkpoint,
            exported,
            writer,
            dtype=dtype,
            quantization=quantization_manifest(checkpoint, scheme, plan, repack),
            kv_cache={**kv_cache.to_manifest(), "page_size": PAGE_SIZE} if kv_cache else {},
            chunk_limits=[chunk_limit] if chunk_limit else [],
            targets=writer.targets,
            task=exported.task,
            embedding=exported.embedding,
            vision=exported.vision,
            speech=exported.speech,
            lora=[adapter.to_manifest() for adapter in checkpoint.adapters],
            lora_slots=exported.lora_slots,
        )
        out = writer.commit(manifest)
    say(f"artifact written to {out}")
    return out


def _check_cuda_graph(presets, tensor_parallel: int, device_map, gpu_layers) -> None:
    """CUDA graphs are built for one whole model on a CUDA target."""
    if not any(p.device == "cuda" for p in presets):
        names = ", ".join(p.name for p in presets)
        raise RelaxlmError(
            f"--cuda-graph captures CUDA kernels, and target {names} is not CUDA; "
            "add a cuda target or drop --cuda-graph"
        )
    if tensor_parallel != 1 or device_map is not None or gpu_layers is not None:
        raise RelaxlmError(
            "--cuda-graph is built for a model on one device; drop --tensor-parallel / "
            "--device-map / --gpu-layers, or --cuda-graph"
        )


def _check_gemm(gemm: str, presets, dtype: str, tensor_parallel: int, device_map, gpu_layers):
    """`--gemm library` is built for a model on one device whose library takes its dtype."""
    if gemm not in ("tir", "library"):
        raise RelaxlmError(f"--gemm {gemm!r} is not a choice: tir or library")
    if gemm == "tir":
        return
    if tensor_parallel != 1 or device_map is not None or gpu_layers is not None:
        raise RelaxlmError(
            "--gemm library is built for a model on one device; drop --tensor-parallel / "
            "--device-map / --gpu-layers, or --gemm library"
        )
    for preset in presets:
        check_library_gemm(preset.device, dtype)


def _check_repack(checkpoint, presets: list[TargetPreset], dtype: str) -> None:
    """`--quant gguf-a8` needs a GGUF file with blocks it repacks, float32 and CPUs with an int8
    dot product (the kernels that round activations to int8 are int8_dot.py's)."""
    if not set(checkpoint.stored_types.values()) & set(A8_REPACKS):
        raise RelaxlmError(
            f"--quant {GGUF_A8} repacks a GGUF file's {', '.join(A8_REPACKS)} blocks, and "
            f"{checkpoint.path} has none; use --quant none (or a scheme such as q4-a8)"
        )
    slow = [p.name for p in presets if not has_int8_dot(p.target())]
    if slow or dtype != "float32":
        why = f"target {', '.join(slow)} has none" if slow else f"--dtype is {dtype}"
        raise RelaxlmError(
            f"--quant {GGUF_A8} runs on x86 CPUs with AVX2 or later (int8 dot products: "
            f"AVX-512 VNNI, AVX-VNNI, or AVX2's) in float32 ({why}); use --quant none there, "
            "which keeps the file's blocks"
        )


def _stage_preset(stage: Stage, presets: list[TargetPreset]) -> TargetPreset:
    """The preset a stage is built for: the one asked for its device kind, else the kind's
    default (`cpu`, `cuda` for sm_80 and sm_90, ...)."""
    return next((p for p in presets if p.device == stage.kind), None) or resolve_target(stage.kind)


def _compile_stages(
    model: SplitModel,
    output: str | os.PathLike,
    stages: list[Stage],
    presets: list[TargetPreset],
    quant: str,
    say,
) -> Path:
    """compile_model for a model split across devices: one library per stage (its layers'
    `prefill` / `decode` and its own paged KV cache), over one set of weights."""
    checkpoint, dtype = model.checkpoint, model.dtype
    if quant == GGUF_A8:
        raise RelaxlmError(
            f"--quant {GGUF_A8} is not built for models split across devices yet; use --quant "
            "none (the file's blocks) or a scheme such as q8 with --device-map"
        )
    stage_presets = [_stage_preset(stage, presets) for stage in stages]
    scheme = scheme_for_targets(resolve_scheme(quant), stage_presets, dtype, None)
    plan_text = ", ".join(f"{s} ({p.name})" for s, p in zip(stages, stage_presets, strict=True))
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) as stages {plan_text}")
    exports = [model.export(stage.first, stage.end) for stage in stages]
    plans, caches = [], []
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        for k, (stage, preset, exported) in enumerate(
            zip(stages, stage_presets, exports, strict=True)
        ):
            stored = stored_schemes(checkpoint, exported, scheme) | _shared_schemes(
                exports, k, scheme
            )
            executable, kv_cache, plan = build_library(exported, preset, scheme, say, stored)
            library = Path(scratch) / f"stage{k}{preset.library_suffix}"
            executable.export_library(str(library))
            say(f"stage {k} ({stage}) linked for {preset.name}")
            writer.add_stage(
                preset.name,
                library,
                preset.tvm_target,
                **{key: v for key, v in preset.extra_manifest.items() if key != "device"},
                device=stage.device,
                layers=[stage.first, stage.end],
                params=[w.name for w in plan],
                kv_cache={**kv_cache.to_manifest(), "page_size": PAGE_SIZE},
            )
            plans.append(plan)
            caches.append(kv_cache)
        plan = _merged_plan(plans)
        layout = [(w.name, w.shape, dtype_of(w.dtype)) for w in plan]
        # Every stage's weights, converted as one model's (a tied table may be in two stages).
        shapes = {n: s for e in exports for n, s in e.param_shapes.items()}
        whole = dataclasses.replace(exports[0], param_shapes=shapes)
        writer.write_weights(layout, converted_weights(checkpoint, whole, plan, say.enabled))
        say("weights written")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        limits = [c.max_prefill_chunk for c in caches if c.max_prefill_chunk]
        kv_cache = {
            **caches[0].to_manifest(),
            "num_layers": stages[-1].end,
            "sliding_windows": [w for c in caches for w in c.windows],
            "max_prefill_chunk": min(limits) if limits else None,
            "page_size": PAGE_SIZE,
        }
        manifest = _manifest(
            checkpoint,
            exports[0],
            writer,
            dtype=dtype,
            quantization=quantization_manifest(checkpoint, scheme, plan),
            kv_cache=kv_cache,
            chunk_limits=limits,
            targets={},
            stages=writer.stages,
            lora=[adapter.to_manifest() for adapter in checkpoint.adapters],
        )
        out = writer.commit(manifest)
    say(f"artifact written to {out}")
    return out


def _compile_sharded(
    model: str | os.PathLike,
    output: str | os.PathLike,
    shards: int,
    presets: list[TargetPreset],
    quant: str,
    dtype: str,
    kv_cache_dtype: str,
    say,
) -> Path:
    """compile_model for tensor parallelism: one library every shard runs (its 1/N of the heads
    and MLP columns, an all-reduce after o_proj and down_proj, its own heads' KV pages in
    `kv_cache_dtype`), and each shard's weights; the manifest's `tensor_parallel` names each
    worker's weights in the library's order."""
    checkpoint = load_checkpoint(model)
    if dtype not in DTYPES:
        raise RelaxlmError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    sharded = shard(checkpoint, dtype, shards, ARCHITECTURES)
    if gpus := [p.name for p in presets if p.is_gpu]:
        say(
            f"note: {', '.join(gpus)} needs a TVM with NCCL to run the all-reduce; this "
            "relaxlm runs sharded models on CPUs (README, 'Tensor parallelism')"
        )
    exported = sharded.exported
    scheme = scheme_for_targets(resolve_scheme(quant), presets, dtype, None)
    say(f"compiling {checkpoint.path} ({checkpoint.architecture}, {dtype}) in {shards} shards")
    stored = stored_schemes(checkpoint, exported, scheme)
    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory() as scratch:
        # no decode_batched: runtime/disco.py's shards run prefill and decode only
        kv_cache, plan = _add_libraries(
            writer,
            Path(scratch),
            exported,
            presets,
            scheme,
            say,
            stored,
            kv_cache_dtype,
            batched_decode=False,
        )
        # Weights read whole by every shard are stored once, split ones once per shard.
        is_split = [any(n in sharded.split for n in w.sources) for w in plan]
        workers = [
            [f"{w.name}.tp{k}" if s else w.name for w, s in zip(plan, is_split, strict=True)]
            for k in range(shards)
        ]
        layout, parts = [], []
        for k in range(shards):
            mine = [w for w, s in zip(plan, is_split, strict=True) if s or k == 0]
            names = {w.name: n for w, n in zip(plan, workers[k], strict=True)}
            layout += [(names[w.name], w.shape, dtype_of(w.dtype)) for w in mine]
            parts.append((sharded.checkpoint(k), mine, names))

        def weights():
            for shard_checkpoint, mine, names in parts:
                converted = converted_weights(shard_checkpoint, exported, mine, say.enabled)
                for name, array in converted:
                    yield names[name], array

        writer.write_weights(layout, weights())
        say(f"weights written ({shards} shards)")
        writer.add_tokenizer(checkpoint.tokenizer_files)
        chunk_limit = kv_cache.max_prefill_chunk
        manifest = _manifest(
            checkpoint,
            exported,
            writer,
            dtype=dtype,
            quantization=quantization_manifest(checkpoint, scheme, plan),
            kv_cache={**kv_cache.to_manifest(), "page_size": PAGE_SIZE},
            chunk_limits=[chunk_limit] if chunk_limit else [],
            targets=writer.targets,
            tensor_parallel={**sharded.to_manifest(), "workers": workers},
        )
        out = writer.commit(manifest)
    say(f"artifact written to {out}")
    return out


def _add_libraries(
    writer: ArtifactWriter,
    scratch: Path,
    exported: ExportedModel,
    presets: list[TargetPreset],
    scheme,
    say,
    stored,
    kv_cache_dtype: str,
    cuda_graph: bool = False,
    sampling_kernels: bool | None = None,
    gemm: str = "tir",
    batched_decode: bool | None = None,
) -> tuple[KVCachePlan | None, list[PlannedWeight]]:
    """Build and link `exported` for each preset into `writer`; the KV-cache plan and weight
    plan (the graph, weight plan and KV cache do not depend on the target)."""
    for preset in presets:
        graphs = cuda_graph and preset.device == "cuda"
        executable, kv_cache, plan = build_library(
            exported,
            preset,
            scheme,
            say,
            stored,
            kv_cache_dtype=kv_cache_dtype,
            sampling_kernels=sampling_kernels,
            cuda_graph=graphs,
            gemm=gemm,
            batched_decode=batched_decode,
        )
        library = scratch / f"{preset.name}{preset.library_suffix}"
        executable.export_library(str(library))
        say(f"{preset.name} library linked")
        extra = {**preset.extra_manifest, **({"cuda_graph": True} if graphs else {})}
        if gemm != "tir":
            extra["gemm"] = gemm
        writer.add_library(preset.name, library, preset.tvm_target, **extra)
    return kv_cache, plan


def _manifest(
    checkpoint,
    exported: ExportedModel,
    writer: ArtifactWriter,
    *,
    dtype: str,
    quantization: dict,
    kv_cache: dict,
    chunk_limits: list[int],
    **fields,
) -> Manifest:
    """The manifest every compile writes alike (versions, the model as exported, what the
    writer stored), plus the fields of its kind (`targets`, `stages`, `tensor_parallel`, ...).
    chunk_limits: caps on the tokens one sequence may add per forward (sliding windows)."""
    return Manifest(
        relaxlm_version=__version__,
        tvm_version=tvm.__version__,
        architecture=exported.architecture,
        model_config=exported.config,
        dtype=dtype,
        quantization=quantization,
        context_window=exported.context_window,
        prefill_chunk_size=min(DEFAULT_PREFILL_CHUNK, exported.context_window, *chunk_limits),
        vocab_size=exported.vocab_size,
        kv_cache=kv_cache,
        params=writer.params,
        shards=writer.shards,
        tokenizer={"files": writer.tokenizer_files},
        source={"path": str(checkpoint.path)},
        **fields,
    )


def _shared_schemes(
    exports: list[ExportedModel], k: int, scheme: QuantScheme | None
) -> dict[int, QuantScheme]:
    """Packed index -> scheme, in stage k, of the weights another stage reads too: a tied
    embedding table, gathered by the first stage and the logits head of the last, is packed in
    both as the whole model packs it (`tied_table_scheme`), so both read one tensor and the
    split model computes what the whole one does."""
    if scheme is None:
        return {}
    elsewhere = {n for j, e in enumerate(exports) if j != k for n in e.param_names}
    names = exports[k].param_names
    return {i: tied_table_scheme(scheme) for i, n in enumerate(names) if n in elsewhere}


def _merged_plan(plans: list[list[PlannedWeight]]) -> list[PlannedWeight]:
    """The stages' weights as one list, each name once (a tied embedding table read as a table
    by the first stage and as the logits head by the last is one tensor where both read it
    alike)."""
    merged: dict[str, PlannedWeight] = {}
    for plan in plans:
        for weight in plan:
            seen = merged.setdefault(weight.name, weight)
            assert seen == weight, f"two stages plan {weight.name} differently"
    return list(merged.values())


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
    fused_only: bool = False,
    device_binaries: bool = True,
    kv_cache_dtype: str = "auto",
    cuda_graph: bool = False,
    sampling_kernels: bool | None = None,
    gemm: str = "tir",
    batched_decode: bool | None = None,
) -> tuple[tvm.runtime.Executable, KVCachePlan | None, list[PlannedWeight]]:
    """Run the four phases on the exported graph.

    scheduled_only: stop after phase 3 and return the scheduled IRModule in place of the
        executable (tests run its kernels alone); fused_only: after phase 2, unscheduled (to
        schedule its kernels other ways: tests, scripts/gemm_sweep.py).
    device_binaries: False keeps CUDA kernels as CUDA source, no nvcc (see `build_context`).
    kv_cache_dtype: what the KV cache's pages hold (see `compile_model`).
    cuda_graph: a CUDA preset's decode kernels captured in CUDA graphs (compiler/cuda_graph.py).
    sampling_kernels: build the sampling kernels in (see `compile_model`).
    gemm: "library" hands the weight matmuls of every function but decode to the device's
        GEMM library (compiler/library_gemm.py), before their dequantize is fused in;
        batched_decode: see `compile_model`.

    stored: packed-param index -> the scheme a weight is already stored in (GGUF blocks);
        `scheme` quantizes the other linear weights.
    Returns the executable, the paged KV cache it creates (None for embedding models) and the
    weight plan: one entry per tensor the library takes, in order.
    """
    target = preset.target()
    mod = exported.mod
    dump = os.environ.get("RELAXLM_DUMP_IR")

    # 1. graph rewrites
    # What a refusal names: the model, its dtype and the target (with its CUDA archs).
    model = f"{exported.architecture} in {exported.dtype}"
    where = f"target {preset.name!r}" + (f" ({', '.join(preset.archs)})" if preset.archs else "")
    if exported.task == "embed":  # whole texts at once, no KV cache
        mod, kv_cache = LowerAttentionToCausal()(mod), None
    else:
        try:
            first_layer = exported.layers[0] if exported.layers else 0  # a pipeline stage's
            mod, kv_cache = lower_attention_to_paged_kv(
                mod, target, exported.dtype, first_layer, kv_cache_dtype
            )
        except RelaxlmError as e:
            raise RelaxlmError(f"{model} cannot be compiled for {where}: {e}") from None
    mod, sources = fuse_parallel_linear(mod, stored)
    stored = {j: stored[s[0]] for j, s in enumerate(sources) if s[0] in (stored or {})}
    fields = None
    quantized = scheme is not None or bool(stored)
    if quantized:
        mod, fields = quantize_weights(mod, scheme, exported.dtype, stored)
    if exported.task == "generate" and _batched_decode(
        preset, exported.dtype, gemm, quantized, batched_decode
    ):
        mod = add_batched_decode(mod)
        if gemm == "tir":
            mod = RowsAsTokens()(mod)
    if gemm == "library":  # before the fusion: the library's matmuls keep their dequantize unfused
        check_library_gemm(preset.device, exported.dtype)
        mod = LibraryGemm(preset.device)(mod)
    if preset.is_gpu:  # 16-bit linears sum in float32 (the library's already do)
        mod = AccumulateInFloat32()(mod)
    if quantized:
        mod = FuseDequantizeMatmul(int8_dot=int8_dot_flavour(target), gpu=preset.is_gpu)(mod)
    plan = weight_plan(exported, sources, fields)
    mod = relax.transform.FuseTransposeMatmul()(mod)
    if exported.task == "generate" and (
        preset.is_gpu if sampling_kernels is None else sampling_kernels
    ):
        # Sampling where the logits are: only chosen ids come back to the host. (About 1 s of
        # build per CPU library, where numpy samples anyway: CPU builds leave them out.)
        mod = add_sampling_functions(mod, target)
    _dump(dump, "1-graph", mod)
    say("graph rewritten (attention on the paged KV cache, fused and quantized linears)")

    # 2. legalize / fuse
    mod = legalize_and_fuse(mod, preset.device)
    if preset.is_gpu and gemm == "tir":
        mod = MarkFewRows()(mod)  # decode_batched's GEMMs: tiles of a few rows
    _dump(dump, "2-fused", mod)
    if fused_only:
        return mod, kv_cache, plan
    say("operators legalized and fused; scheduling kernels")

    # 3. schedules
    with target:
        mod = schedules.for_target(preset)(mod)
    _dump(dump, "3-scheduled", mod)
    if preset.is_gpu:  # a block too large for the device fails only at launch: refuse it here
        check_launch_limits(mod, target, model, where)
    if scheduled_only:
        return mod, kv_cache, plan
    say("graph lowered and scheduled; generating code")

    # 4. VM lowering and codegen
    start = time.perf_counter()
    if cuda_graph:  # memory planned for the runtime's largest batch (at most one prefill chunk)
        mod = mark_for_capture(mod, DEFAULT_PREFILL_CHUNK)
    # GPU: target in scope; CUDA: nvcc fatbin for every arch
    with build_context(preset, device_binaries, cuda_graph):
        executable = relax.build(
            mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline()
        )
    say(f"code generated in {time.perf_counter() - start:.1f} s")
    return executable, kv_cache, plan


def _batched_decode(
    preset: TargetPreset, dtype: str, gemm: str, quantized: bool, asked: bool | None
) -> bool:
    """Whether to build `decode_batched` (see `compile_model`)."""
    if gemm == "library" and quantized:  # the library would dequantize every weight every step
        return False
    if asked is not None:
        return asked
    return preset.device == "cuda" and (gemm == "library" or dtype == "float16")


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
