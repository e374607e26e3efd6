"""GPU schedules: dlight GPU rules, one set for every GPU target (CUDA, Metal, WebGPU, Vulkan).

Rules are tried in order; the first that schedules a kernel wins. What takes what in a Llama
(the WebGPU kernel tests run these same rules on the kernels the pipeline builds):
- `FewRowsMatmul` (few_rows.py): decode_batched's float16 weight GEMMs on CUDA tensor cores,
  in tiles a few rows tall (a step's sequences); elsewhere they fall to `Matmul`.
- `DecodeGEMV` (decode_gemv.py): the decode step's weight matmuls, float and 4-bit
  interleaved, with their epilogues (residual add, cast): rows `[batch, 1, n]` only, so
  prefill's kernels (rows `[1, tokens, n]`) fall through to the rules below.
- `Matmul`: the weight matmuls of prefill, float and quantized (a quantized one is a dequantize
  block feeding the matmul: fuse_dequantize_matmul.py), and of decode where `DecodeGEMV`
  declines. It comes before `LowBatchGEMV`, which also takes prefill GEMMs.
- `GEMV`, `LowBatchGEMV`: GEMVs with static rows (kept in MLC-LLM's order; none in a Llama).
- `RMSNorm`: the norms (its rsqrt pattern, `x * w` after it); `Reduction`, `GeneralReduction`:
  softmax, Gemma's `x * (1 + w)` norms, and a packed-weight reduction fused with a residual add
  where `DecodeGEMV` declines one.
- `SingleReduction`: the other packed-weight reductions `DecodeGEMV` declines (its docstring).
- `Fallback`: the injective kernels (reshapes, SiLU-and-multiply, casts).
The paged KV cache's kernels (attention, rotary, append) come scheduled from TVM.

Tensor cores: dlight's `Matmul` tensorizes float16 matmuls for CUDA sm_70+ whose fixed
dimensions all exceed 64 (`MatmulTensorization`: WMMA 16x16x16 tiles, 128x128 per block, staged
through shared memory, float32 accumulators: GPU linears sum in float32,
float32_accumulation.py), with the kernel's producers inlined into its shared-memory loads
and its cast back to float16 into its stores: a prefill dequantize-matmul
(fuse_dequantize_matmul.py) reads packed weights into shared memory as float16 tiles. (With the
TVM 0.27 wheel this needs apache-tvm-ffi 0.1.14: under 0.1.15 `Schedule.tensorize`, which copies
its intrinsic through `save_json`, segfaulted, and these kernels were kept off tensor cores.)
bfloat16 has no WMMA intrinsic in dlight and takes the generic tiled schedule. Metal's
`MetalMatmul` (simdgroups) is not taken: its kernels are planned for a target with Metal's
thread limits that is not Metal (unverified on a Mac).
"""

import tvm
from tvm.target import Target

from relaxlm.tvm_api import dlight, identify_cast_or_load_block, normalize_prim_func, s_tir, tirx

from .decode_gemv import MAX_VECTOR_LANES, DecodeGEMV
from .few_rows import FewRowsMatmul


class Matmul(dlight.gpu.Matmul):
    """dlight's GPU matmul: tensor cores on CUDA (see above), the generic tiled schedule
    elsewhere."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if target.kind.name == "metal":
            target = _without_metal_matmul(target)
        return super().apply(func, target, tunable)


def _without_metal_matmul(target: Target) -> Target:
    """A target with `target`'s thread and memory limits whose kind takes dlight's generic
    matmul path (Vulkan: no kind-specific branch in `Matmul.apply` or its configs)."""
    limits = ("max_num_threads", "max_threads_per_block", "max_shared_memory_per_block")
    attrs = {k: int(target.attrs[k]) for k in limits if k in target.attrs}
    return Target({"kind": "vulkan", **attrs, "thread_warp_size": 1})


class RMSNorm(dlight.gpu.RMSNorm):
    """dlight's RMSNorm, declining the kernels it cannot take. It expects exactly four blocks
    besides casts and loads (square, sum, rsqrt, scale) and unpacks them without checking, so
    Gemma's norm, whose `(1 + w)` is one block more, raised a ValueError out of the build, and so
    did FLUX's per-head q/k norm in float16, whose trailing cast dlight cannot inline. It also
    fuses every loop but the last of its rows, so a norm over a 2-D [rows, hidden] tensor (the
    Qwen2.5-VL tower's, whose patches have no batch axis) left it nothing to fuse."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if isinstance(func, tirx.PrimFunc):
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            if len(sch.get_loops(blocks[-1])) < 3:
                return None
            if len([b for b in blocks if not identify_cast_or_load_block(sch.get(b))]) != 4:
                return None
            if not _six_blocks_after_dlight_prepares(func):
                return None
        return super().apply(func, target, tunable)


def _six_blocks_after_dlight_prepares(func: tirx.PrimFunc) -> bool:
    """dlight RMSNorm's own first steps on a scratch schedule (cache the input and output,
    inline casts and loads): it then unpacks exactly six blocks."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not sch.get(blocks[0]).reads:  # a first block that reads nothing (a constant fill)
        return False
    sch.cache_read(block=blocks[0], read_buffer_index=0, storage_scope="local")
    sch.cache_write(block=blocks[-1], write_buffer_index=0, storage_scope="local")
    for block in blocks:
        if identify_cast_or_load_block(sch.get(block)):
            sch.compute_inline(block)
    return len(sch.get_child_blocks(root)) == 6


class CapVectorLanes(dlight.ScheduleRule):
    """`rule`, with vectorized loops wider than the target's widest vector split in two.

    WGSL and MSL have vectors of 2 to 4 lanes only, and TVM's codegens reject wider ones; dlight's
    RMSNorm (and some GEMV configs) vectorize by 8. Splitting such a loop into (n/4, 4) keeps
    the schedule's thread layout, so WebGPU runs the same schedule the other targets do.
    """

    def __init__(self, rule: dlight.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        try:
            sch = self.rule.apply(func, target, tunable)
        except AssertionError:
            # dlight's GEMV analysis asserts where a reduction keeps no spatial loop (VITS's
            # weight-norm row norms): the rule does not apply, and the next one (the fallback)
            # schedules the function.
            return None
        if any(
            _sized_by_a_variable(s)
            for s in (sch if isinstance(sch, list) else [sch] if sch else [])
        ):
            # dlight's reductions over a depthwise conv of dynamic length (VITS) keep per-thread
            # buffers as long as the sequence, which CUDA cannot allocate on the stack: the
            # next rule takes the function
            return None
        lanes = MAX_VECTOR_LANES.get(target.kind.name)
        if sch is None or lanes is None:
            return sch
        for s in sch if isinstance(sch, list) else [sch]:
            _split_wide_vectors(s, lanes)
        return sch


def _sized_by_a_variable(sch: s_tir.Schedule) -> bool:
    """Whether a schedule leaves a thread-local buffer of a symbolic size once its buffers are
    compacted to what each thread touches, as the build does: no GPU codegen can build it."""
    passes = s_tir.transform
    mod = tvm.transform.Sequential(
        [
            passes.LowerInitBlock(),
            passes.PlanAndUpdateBufferAllocationLocation(),
            passes.ConvertBlocksToOpaque(),
            passes.CompactBufferAllocation(),
        ]
    )(sch.mod)
    return any(
        buf.scope() in ("local", "shared")
        and any(not isinstance(d, tirx.IntImm) for d in buf.shape)
        for _, func in mod.functions_items()
        for buf in s_tir.analysis.detect_buffer_access_lca(func)
    )


def _split_wide_vectors(sch: s_tir.Schedule, lanes: int) -> None:
    blocks, stack = [], [sch.get_sblock("root")]
    while stack:
        children = sch.get_child_blocks(stack.pop())
        blocks += children
        stack += children
    for block in blocks:
        for loop in sch.get_loops(block):
            stmt = sch.get(loop)
            extent = stmt.extent
            if stmt.kind != tirx.ForKind.VECTORIZED or not isinstance(extent, tirx.IntImm):
                continue
            if int(extent) > lanes and int(extent) % lanes == 0:
                _, inner = sch.split(loop, [None, lanes])
                sch.vectorize(inner)


class SingleReduction(dlight.ScheduleRule):
    """A kernel that is one reduction over its last axis and nothing else, which dlight's
    matmul and GEMV rules do not recognise: a one-row-per-sequence int4 dequantize-matmul that
    DecodeGEMV declines, whose packed weights are read through the interleaved nibble index
    (quantization.py), so no weight access is affine in k. (Over many rows these kernels come as
    a dequantize block and a matmul, which `Matmul` takes.)

    dlight's `GeneralReduction` schedules exactly this when an injective epilogue follows the
    reduction (one workgroup per output, its threads splitting K, a cross-thread sum); the
    reduction is given one here (its result staged in a local buffer, then stored), and that
    rule does the rest.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name == "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) != 1 or not infos[0].is_reduction():
            return None
        kind = infos[0].dom_kind()
        if kind[-1] != "R" or "R" in kind[:-1]:
            return None
        sch.cache_write(infos[0].block_rv, 0, "local")
        return dlight.gpu.GeneralReduction().apply(sch.mod["main"], target, tunable)


def gpu_rules() -> list[dlight.ScheduleRule]:
    """The rule list, in the order it is tried."""
    rules = [
        FewRowsMatmul(),
        DecodeGEMV(),
        Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.LowBatchGEMV(),
        RMSNorm(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        SingleReduction(),
        dlight.gpu.Fallback(),
    ]
    return [CapVectorLanes(rule) for rule in rules]


def gpu_schedules() -> tvm.transform.Pass:
    return dlight.ApplyDefaultSchedule(*gpu_rules())
