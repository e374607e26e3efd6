"""DecodeGEMV: the decode step's weight matmuls on GPUs, reading each weight once.

A decode matmul is `y[b, 0, n] = sum_k x[b, 0, k] * w(n, k)` over a symbolic batch `b` of
sequences, one token each (prefill's kernels are separate PrimFuncs whose rows are
`[1, num_tokens]`, and keep their own schedules); `w` is a float weight `W[n, k]` or the
4-bit interleaved one (quantization.py: word 16 * blk + l holds k = 128 * blk + 16 * j + l in
nibble j). The schedule:
- a workgroup of ROWS warps, one output row per warp; its lanes split K so that a warp reads
  one contiguous stretch of the row per step, each lane one vector of VECTOR_BYTES (4 words
  of 4-bit weights: 32 weights in one load; 4 or 8 float16s), held in registers;
- for 4-bit weights the 8 nibbles of those words are unpacked in registers, so a lane walks
  k = 128 * blk + 16 * j + 4 * lo + (0..3) for j = 0..7 over one load;
- BATCH sequences per workgroup, innermost in each lane: every weight a lane loads is used for
  each of them; more sequences take more workgroups, the tiles of one row group launched one
  after another (along x, rows along y), so the others find its weights in L2;
- per-lane partial sums, then one cross-lane sum bound to threadIdx.x (shuffles on CUDA);
  an injective epilogue (residual add, cast) runs on the sums where they are.
The activations are loaded as vectors into registers next to the weights (from L1/L2: a few
KB that every workgroup reads), not staged in shared memory.
"""

import tvm
from tvm import sym
from tvm.target import Target

from relaxlm.tvm_api import dlight, normalize_prim_func, s_tir, tirx

from ..quantization import INTERLEAVE

ROWS = 4  # warps (output rows) per workgroup
LANES = 32  # lanes per row
BATCH = 4  # sequences per workgroup
VECTOR_BYTES = 16  # one 128-bit load per lane and step
MAX_GRID_Y = 65535  # workgroups along y: CUDA's gridDim.y, WebGPU's and Vulkan's default
MAX_VECTOR_LANES = {"webgpu": 4, "metal": 4, "vulkan": 4}  # WGSL, MSL, SPIR-V (no Vector16)
_WORD_LANES = 16  # 4-bit layout: consecutive words per nibble plane (INTERLEAVE / 8)


class DecodeGEMV(dlight.ScheduleRule):
    """The decode matmuls (see the module docstring); None for every other kernel."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name == "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not infos[0].is_reduction() or infos[0].dom_kind() != "SSR":
            return None
        if any(info.is_reduction() for info in infos[1:]):
            return None
        block = infos[0].block_rv
        weight = _weight_layout(sch.get(block)) if _is_decode(sch, block) else None
        if weight is None:
            return None
        epilogue = _one_epilogue(sch, [info.block_rv for info in infos[1:]])
        if epilogue is None:
            return None
        index, packed = weight
        return _schedule(sch, block, epilogue, index, packed, target)


def _is_decode(sch: s_tir.Schedule, block) -> bool:
    """Whether the block writes [batch, 1, n] (decode: a symbolic batch of one token each;
    prefill writes [1, tokens, n]) over loops (batch, n, k), n and k static."""
    shape = sch.get(block).writes[0].source.shape
    if len(shape) != 3 or isinstance(shape[0], tirx.IntImm) or not _one(shape[1]):
        return False
    loops = [sch.get(loop).extent for loop in sch.get_loops(block)]
    return len(loops) == 3 and all(isinstance(e, tirx.IntImm) for e in loops[1:])


def _one_epilogue(sch: s_tir.Schedule, blocks: list) -> list | None:
    """The injective blocks after the reduction as one (SiLU-and-multiply is three: sigmoid,
    product, product): all but the last inlined into it. [] for none; None where one cannot be
    inlined (its intermediate would stay in global memory, which a GPU kernel cannot allocate).
    """
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except s_tir.ScheduleError:
            return None
    return blocks[-1:]


def _one(dim) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _weight_layout(block) -> tuple[int, bool] | None:
    """(read index, packed) of the block's one weight: a 2-D buffer read at row n; packed for
    4-bit words in the interleaved layout (word k // 128 * 16 + k % 16), else a float weight
    read at [n, k]. None for any other layout (row-tiled words, GGUF blocks) or several."""
    _, n_iter, k_iter = block.iter_vars
    n_var, k_var, k_extent = n_iter.var, k_iter.var, int(k_iter.dom.extent)
    analyzer = sym.Analyzer()
    found = []
    for i, region in enumerate(block.reads):
        if len(region.region) != 2 or not region.region[0].min.same_as(n_var):
            continue
        column, dtype = region.region[1].min, str(region.source.dtype)
        if dtype == "uint32" and _interleaved(column, k_var, k_extent):
            found.append((i, True))
        elif dtype.startswith(("float", "bfloat")) and analyzer.can_prove_equal(column, k_var):
            found.append((i, False))
        elif not dtype.startswith(("float", "bfloat")):
            return None  # words or bytes of another layout
    return found[0] if len(found) == 1 else None


def _interleaved(column, k_var, k_extent: int) -> bool:
    """Whether column(k) is the 4-bit interleaved word index, checked over the first two
    blocks of k (TVM simplifies the index for k's range: `k // 128` is gone where K <= 128)."""
    for k in range(min(k_extent, 2 * INTERLEAVE)):
        at_k = sym.Analyzer()  # a fresh one per k: a binding cannot be overridden
        at_k.bind(k_var, tirx.const(k, k_var.ty.dtype))
        value = at_k.simplify(column)
        want = k // INTERLEAVE * _WORD_LANES + k % _WORD_LANES
        if not isinstance(value, tirx.IntImm) or int(value) != want:
            return False
    return True


def _schedule(sch, block, epilogues: list, weight_index: int, packed: bool, target: Target):
    weight_dtype = sch.get(block).reads[weight_index].source.dtype
    vector = min(VECTOR_BYTES * 8 // tvm.DataType(weight_dtype).bits, _max_lanes(target))
    rf, step, per_load = _partial_sums(sch, block, packed, vector)
    _load_in_registers(sch, rf, step, per_load, weight_index)
    _sum_lanes(sch, block, sch.get_loops(rf)[2], epilogues)
    return sch


def _partial_sums(sch, block, packed: bool, vector: int):
    """Split K over the lanes, bind the threads, and rfactor each lane's partial sums into
    BATCH registers. Returns that block, its step loop (one weight load) and the loop inside
    the step over which one load's weights go (with the weight words: its nibbles)."""
    b, n, k = sch.get_loops(block)
    if packed:
        # k = 128 * (LANES / 4 * ko + kt) + 16 * j + 4 * lo + li: lanes (kt, lo), 4 words a load
        per_block = _WORD_LANES // vector
        ko, kt, j, lo, li = sch.split(k, [None, LANES // per_block, 8, per_block, vector])
        sch.reorder(kt, lo, ko, j, li)
        tx, inner = sch.fuse(kt, lo), [ko, j, li]
    else:
        ko, tx, li = sch.split(k, [None, LANES, vector])
        inner = [ko, li]
    bo, bi = sch.split(b, [None, BATCH])
    no, ny = sch.split(n, [None, ROWS])
    sch.reorder(no, bo, ny, tx, *inner, bi)
    rf = sch.rfactor(tx, factor_axis=0)
    no, bo, ny, tx, ko, *rest = sch.get_loops(rf)
    # The batch tiles of a row group are consecutive workgroups (blockIdx.x varies fastest in
    # launch order), so they read the group's weights at about the same time: from DRAM once,
    # then from L2, for any number of sequences. Beyond MAX_GRID_Y row groups the grid cannot
    # take them along y, and they go along x (each tile then streams the weights anew).
    rows_axis, tiles_axis = ("blockIdx.y", "blockIdx.x")
    if int(sch.get(no).extent) > MAX_GRID_Y:
        rows_axis, tiles_axis = tiles_axis, rows_axis
    for loop, thread in ((no, rows_axis), (bo, tiles_axis), (ny, "threadIdx.y")):
        sch.bind(loop, thread)
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    _by_batch_tile(sch, rf)
    return rf, ko, rest[-3] if packed else ko


def _load_in_registers(sch, rf, step, per_load, weight_index: int) -> None:
    """Each lane's weight vector, one load per step, and the activations it meets (for each
    sequence of the tile): vector loads into registers. The step's loops are unrolled, so
    nibble shifts and register indices are constants."""
    words = sch.cache_read(rf, weight_index, "local")
    sch.compute_at(words, step)
    sch.vectorize(sch.get_loops(words)[-1])
    inputs = sch.cache_read(rf, _activation_index(sch.get(rf)), "local")
    sch.compute_at(inputs, per_load)
    sch.vectorize(sch.get_loops(inputs)[-1])
    _by_batch_tile(sch, inputs)
    sch.annotate(step, "pragma_auto_unroll_max_step", 1024)
    sch.annotate(step, "pragma_unroll_explicit", 1)


def _sum_lanes(sch, block, rows_loop, epilogues: list) -> None:
    """The cross-lane sums (one per sequence of the tile), then the epilogue on them, in the
    loop over the workgroup's rows (threadIdx.y)."""
    sch.reverse_compute_at(block, rows_loop)
    lanes, sequences = sch.get_loops(block)[3:]
    sch.reorder(sequences, lanes)  # TVM's cross-thread sum wants the lanes' loop innermost
    sch.bind(lanes, "threadIdx.x")
    if epilogues:
        sch.set_scope(block, 0, "local")
        _by_batch_tile(sch, block)
    for epilogue in epilogues:
        sch.reverse_compute_at(epilogue, rows_loop)


def _activation_index(block) -> int:
    """The read of x[b, 0, k]: the one 3-D buffer besides the block's own output."""
    (index,) = [
        i
        for i, region in enumerate(block.reads)
        if len(region.region) == 3 and not region.source.same_as(block.writes[0].source)
    ]
    return index


def _by_batch_tile(sch: s_tir.Schedule, block) -> None:
    """Index the block's local output by (batch tile, row in tile) in place of the batch row.

    By the flat row a thread's BATCH sums span a symbolic extent once TVM compacts the buffer
    (it does not bound the region through the tile's `row < batch_size` predicate), and CUDA
    cannot allocate that; by the tile they are BATCH registers. The map pads the last tile,
    whose rows past the batch no block reads or writes (the predicate): so the padding check
    is skipped."""
    sch.transform_layout(
        block,
        ("write", 0),
        lambda *i: (*i[:-3], i[-3] // BATCH, i[-3] % BATCH, *i[-2:]),
        assume_injective_transform=True,
    )


def _max_lanes(target: Target) -> int:
    return MAX_VECTOR_LANES.get(target.kind.name, 8)
