"""FewRowsMatmul: decode_batched's weight GEMMs on CUDA tensor cores, in tiles of a few rows.

decode_batched (compiler/batched_decode.py) multiplies a step's sequences, tens of rows, by
each weight. dlight's tensor-core schedule is built for prefill's thousands of tokens: 128x128
output tiles, so 32 sequences fill a quarter of each tile's rows (the tensor cores do 4x the
work) and an 8B model's 4096-wide projections make 32 blocks for a GPU of 132 SMs, which cannot
stream the weights at the memory's rate. Here a block covers ROWS rows (the batch padded to a
multiple of them) and WARPS * 16 columns, one warp per 16 columns, each warp holding all of
the block's rows as ROWS / 16 WMMA accumulators:
- the activations' tile [ROWS, K_STEP] and the weight's [WARPS * 16, K_STEP] are staged in
  shared memory each step, all of the block's threads loading them (a quantized weight is
  dequantized on the way: its dequantize block is inlined into that load), double-buffered by
  TVM's software pipeline;
- each warp multiplies them in 16x16x16 WMMA fragments, accumulating in the kernel's dtype
  (float32 on GPUs: compiler/float32_accumulation.py);
- its tile goes back through shared memory, where the kernel's epilogue (a cast) is applied.
Blocks of one weight tile (the row tiles of a batch beyond ROWS) are launched next to each
other (blockIdx.x), so all but the first read the weight from L2.

Only kernels marked FEW_ROWS are taken (`MarkFewRows` marks decode_batched's GEMMs, copying
those shared with prefill); prefill's keep dlight's 128x128 tiles. With `tensor_cores=False`
the same loop nest is built with its 16x16x16 tiles left as loops, each thread computing its
warp's fragments alone: not a fast schedule, the one a GPU without WMMA can run, so that
tests/test_webgpu_kernels.py checks this schedule's tiling, padding and dequantize numerically
on lavapipe. Tensorize then replaces exactly those loops, after checking that each matches its
WMMA intrinsic.
"""

from tvm.target import Target

from relaxlm.tvm_api import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    dlight,
    get_index_map,
    get_reduction_blocks,
    get_root_block,
    s_tir,
    tirx,
)

FEW_ROWS = "relaxlm.few_rows"  # PrimFunc attribute: its rows are a decode step's sequences

ROWS = 32  # rows per block: two 16-row fragments per warp
WARPS = 4  # warps per block, side by side along the columns, 16 columns each
K_STEP = 64  # reduction elements staged per pipeline step (four 16-deep fragments)
_MMA = 16  # WMMA's m = n = k
_LANES = 32
_VECTOR = 4  # elements per thread and load when staging tiles
_MIN_TENSOR_CORE_ARCH = 70


class FewRowsMatmul(dlight.ScheduleRule):
    """A FEW_ROWS float16 matmul (see the module docstring); None for every other kernel."""

    def __init__(
        self, tensor_cores: bool = True, rows: int = ROWS, warps: int = WARPS, k_step: int = K_STEP
    ):
        """rows, warps, k_step: the tile (multiples of 16 for rows and k_step); other values
        than the defaults are for scripts/gemm_sweep.py, which times them on a GPU."""
        assert rows % _MMA == 0 and k_step % _MMA == 0, (rows, k_step)
        self.tensor_cores = tensor_cores
        self.rows, self.warps, self.k_step = rows, warps, k_step
        # WGSL codegen fails on the dequantize inlined into a vectorized load (a lanes check)
        self.vector = _VECTOR if tensor_cores else 1

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not (func.attrs and FEW_ROWS in func.attrs):
            return None
        if self.tensor_cores and not _has_wmma(target):
            return None
        sch = s_tir.Schedule(func)
        block = _one_matmul(sch)
        if block is None:
            return None
        stmt = sch.get(block)
        if stmt.reads[0].source.dtype != "float16" or stmt.writes[0].source.dtype not in (
            "float16",
            "float32",
        ):
            return None
        try:
            return self._schedule(sch, block)
        except RuntimeError:  # a step TVM refuses for this kernel (ScheduleError and the FFI's)
            return None

    def _schedule(self, sch: s_tir.Schedule, block) -> s_tir.Schedule:
        shared = "shared.dyn" if self.tensor_cores else "shared"
        scopes = (
            ("wmma.matrix_a", "wmma.matrix_b", "wmma.accumulator")
            if self.tensor_cores
            else ("local", "local", "local")
        )
        # C[1, i, j] += A[1, i, k] * B[1, j, k], every extent a multiple of its tile
        _normalize(sch, block)
        sch.pad_einsum(block, [1, self.rows, self.warps * _MMA, self.k_step])
        batch, i, j, k = sch.get_loops(block)
        i, i_mma = sch.split(i, [None, _MMA])
        j, j_mma = sch.split(j, [None, _MMA])
        k, k_mma = sch.split(k, [None, _MMA])
        sch.reorder(i, j, k, i_mma, j_mma, k_mma)
        inner = block
        outer = sch.blockize(i_mma)  # one 16x16x16 fragment product

        row_tile, row_frag = sch.split(i, [None, self.rows // _MMA])
        col_tile, warp = sch.split(j, [None, self.warps])
        k_step, k_frag = sch.split(k, [None, self.k_step // _MMA])
        sch.reorder(col_tile, row_tile, warp, k_step, k_frag, row_frag)
        sch.bind(sch.fuse(batch, col_tile, row_tile), "blockIdx.x")  # batch: extent 1
        sch.bind(warp, "threadIdx.y")
        # TVM's order and stages for this nest: the next step's tiles load while this one's
        # fragments multiply (as in dlight's tensor-core schedule)
        sch.annotate(k_step, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k_step, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k_frag, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k_frag, "software_pipeline_stage", [0, 0, 1])

        for operand in (0, 1):
            staged = sch.cache_read(outer, operand, shared)
            sch.compute_at(staged, k_step)
            fused = sch.fuse(*sch.get_loops(staged)[-2:])
            _, ty, tx, vec = sch.split(fused, [None, self.warps, _LANES, self.vector])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            sch.storage_align(staged, 0, axis=-2, factor=16, offset=8)  # no bank conflicts
            sch.annotate(staged, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(staged, "double_buffer_scope", 0)
            auto_inline_producers(sch, staged)  # the dequantize, the pad
        fragments = [sch.cache_read(outer, operand, scopes[operand]) for operand in (0, 1)]
        for fragment in fragments:
            sch.compute_at(fragment, k_frag)

        # static shared memory: in shared.dyn beside the float16 tiles, TVM 0.27's LowerIntrin
        # refused this float32 tile's pointer (tvm_access_ptr: float32 against float16)
        to_global = sch.cache_write(outer, 0, "shared")
        sch.storage_align(to_global, 0, axis=-2, factor=16, offset=4)
        accumulator = sch.cache_write(outer, 0, scopes[2])
        sch.reverse_compute_at(accumulator, warp)
        sch.reverse_compute_at(to_global, warp)
        init = sch.decompose_reduction(outer, k_step)
        init_inner = sch.get_child_blocks(init)[0]

        for fragment in [*fragments, accumulator]:
            _split_fragments(sch, fragment)
        if self.tensor_cores:
            self._tensorize(sch, fragments, accumulator, init_inner, inner)

        auto_inline_consumer_chain(sch, to_global)
        fused = sch.fuse(*sch.get_loops(to_global)[-2:])
        _, tx, vec = sch.split(fused, [None, _LANES, self.vector])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        return sch

    @staticmethod
    def _tensorize(sch: s_tir.Schedule, fragments, accumulator, init, inner) -> None:
        from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

        out_dtype = sch.get(inner).writes[0].source.dtype
        group = get_wmma_intrin_group(
            load_scope="shared.dyn",
            store_scope="shared",
            in_dtype="float16",
            out_dtype=out_dtype,
            trans_b=True,
        )
        load_a, load_b = fragments
        sch.tensorize(sch.get_loops(load_a)[-2], group["load_a"])
        sch.tensorize(sch.get_loops(load_b)[-2], group["load_b"])
        sch.tensorize(sch.get_loops(init)[-2], group["init"])
        sch.tensorize(sch.get_loops(accumulator)[-2], group["store"])
        sch.tensorize(sch.get_loops(inner)[-3], group["compute"])


def _has_wmma(target: Target) -> bool:
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    return arch.startswith("sm_") and int(arch[3:]) >= _MIN_TENSOR_CORE_ARCH


def _one_matmul(sch: s_tir.Schedule):
    """The kernel's one reduction block, if it is a matmul (dlight's analysis), else None."""
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None or get_index_map(sch.get(reductions[0])) is None:
        return None
    return reductions[0]


def _normalize(sch: s_tir.Schedule, block) -> None:
    """Rewrite the matmul as C[1, i, j] += A[1, i, k] * B[1, j, k] through reindexed copies of
    its operands (inlined again when staged)."""
    a, b = sch.reindex(block, ("read", 0)), sch.reindex(block, ("read", 1))
    c = sch.reindex(block, ("write", 0))
    matmul, a_map, b_map, c_map = get_index_map(sch.get(block))
    sch.transform_layout(a, ("write", 0), a_map)
    sch.transform_layout(b, ("write", 0), b_map)
    sch.transform_layout(c, ("read", 0), c_map)
    sch.transform_block_layout(block, matmul)


def _split_fragments(sch: s_tir.Schedule, block) -> None:
    """A fragment copy's last two loops as (tile, tile, 16, 16), the tiles unrolled."""
    i, j = sch.get_loops(block)[-2:]
    i, i_mma = sch.split(i, [None, _MMA])
    j, j_mma = sch.split(j, [None, _MMA])
    sch.reorder(i, j, i_mma, j_mma)
    sch.unroll(i)
    sch.unroll(j)
