"""CPU schedules: weight matmuls (GEMV in decode, GEMM in prefill), row reductions, element-wise.

Stock dlight CPU rules are a poor fit (see shared/notes/tvm-0.27.md): `cpu.GEMV` vectorizes
the wrong axis and takes minutes to compile, `cpu.Reduction` recomputes norms per element.
`MatmulRows` follows what measured fast here: split K into 16-wide vector lanes (rfactor),
keep 4 output rows of independent accumulators, parallelize over tiles of output rows, and
run the fused epilogue (bias, residual, activation) right after each tile.
"""

import tvm
from tvm.target import Target

from relaxlm.tvm_api import (
    ScheduleRule,
    dlight,
    normalize_prim_func,
    s_tir,
    tirx,
    try_inline_contiguous_spatial,
)

from ..vector_math import widest_lanes

LANES = 16  # one AVX-512 register of float32
ROWS = 4  # output rows computed together: independent accumulators hide FMA latency


class MatmulRows(ScheduleRule):
    """out[m, n] = sum_k a[m, k] * w[n, k] (+ injective epilogue), parallel over n tiles."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or not 1 <= len(infos) <= 2:
            return None
        main = infos[0]
        if main.dom_kind()[-2:] != "SR" or "R" in main.dom_kind()[:-1]:
            return None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        *batch, n, k = sch.get_loops(main.block_rv)
        if not batch:  # add_unit_loop would put m innermost (e.g. a weight's row norms)
            return None
        n_extent, k_extent = _extent(sch, n), _extent(sch, k)
        if not isinstance(n_extent, int) or not isinstance(k_extent, int):
            return None
        if k_extent % LANES or n_extent % ROWS:
            return None
        m = sch.fuse(*batch) if batch else sch.add_unit_loop(main.block_rv)
        block = main.block_rv

        # Partial sums in LANES vector lanes; the original block then sums the lanes. When K
        # allows, k = (ko, j, l) with 8 steps j per 128-wide block: the 4-bit layout's
        # interleaving makes each j one shift of 16 consecutive words (quantization.py).
        steps = 8 if k_extent % (8 * LANES) == 0 else 1
        ko, kj, ki = sch.split(k, [None, steps, LANES])
        partial = sch.rfactor(ki, factor_axis=-1)  # lanes last: contiguous
        m, n, ki = sch.get_loops(block)
        no, ni = sch.split(n, [None, ROWS])
        sch.reorder(no, m, ni, ki)
        sch.parallel(no)
        sch.compute_at(partial, m, preserve_unit_loops=True)
        # partial's loops under (no, m) follow its block iters: ki, unit batch loops, n_i, ko, kj.
        # The lane loop goes outside the reduction loops (vectorize() accepts only loops that
        # contain a reduction whole) and the ROWS rows innermost: one k step then updates
        # ROWS independent LANES-wide vector accumulators.
        p_ki, *units, p_ni, p_ko, p_kj = sch.get_loops(partial)[2:]
        sch.reorder(*units, p_ki, p_ko, p_kj, p_ni)
        # The partial sums keep the default "global" scope: TVM lowers a small constant-size
        # global buffer in a CPU kernel to a stack array, which LLVM keeps in registers; a
        # "local" one goes through TVMBackendAllocWorkspace and is stored to every step
        # (q4 GEMV 4096x768: 0.119 -> 0.091 ms, q8 0.115 -> 0.067 ms, one thread).
        sch.vectorize(p_ki)  # while the block still has its init: a reduction block
        sch.decompose_reduction(partial, p_ko)
        sch.unroll(p_kj)
        sch.unroll(p_ni)
        if len(infos) == 2:
            sch.reverse_compute_at(infos[1].block_rv, m, preserve_unit_loops=True)
        return sch


class RowReduction(ScheduleRule):
    """Norms and other reductions over the last axis: parallel over rows, nothing recomputed."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not any(i.is_reduction() for i in infos):
            return None
        first = sch.get_loops(infos[0].block_rv)
        if len(first) < 2:
            return None
        # Every block shares the leading row loops; fuse them and hang each block under them.
        rows = [b for b in infos if len(sch.get_loops(b.block_rv)) == len(first)]
        if len(rows) != len(infos) or any(
            i.dom_kind()[:-1] != "S" * (len(first) - 1) for i in infos
        ):
            return None
        last = infos[-1].block_rv
        outer = sch.fuse(*sch.get_loops(last)[:-1])
        # Last producer first: compute_at needs each block's consumers already under `outer`
        # (softmax: max -> exp -> sum -> normalize).
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, outer, preserve_unit_loops=True)
        sch.parallel(outer)
        return sch


class Elementwise(ScheduleRule):
    """Injective kernels (SiLU-and-multiply, residual adds, casts): the last axis in vectors.

    Left serial: in decode they are one row, where a parallel launch costs more than the row,
    and in prefill the vector form is already ~1 cycle per element. (On CPU, sigmoid and SiLU
    are legalized with a polynomial exp, `cpu_legalize.py`: LLVM would call scalar libm exp
    once per lane.)
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) != 1 or not infos[0].is_injective():
            return None
        loops = sch.get_loops(infos[0].block_rv)
        if not loops:
            return None
        extent = _extent(sch, loops[-1])
        lanes = widest_lanes(extent, (LANES, 8, 4)) if isinstance(extent, int) else 0
        if not lanes:
            return None
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
        return sch


def _extent(sch: s_tir.Schedule, loop) -> int | tirx.Expr:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else extent


def cpu_schedules() -> tvm.transform.Pass:
    return dlight.ApplyDefaultSchedule(MatmulRows(), RowReduction(), Elementwise())
