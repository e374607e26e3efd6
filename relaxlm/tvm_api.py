"""TVM's compiler-side names that move between releases, in one place.

TVM 0.27 renamed `tir` to `tirx` (TVMScript: `tvm.script.tirx`) and moved schedules and dlight
under `s_tir`. The compiler, the frontends and the tests import those names from here, so a
TVM upgrade that moves them again changes this file only. (The runtime uses `tvm.runtime`
alone, which these moves left alone.)
"""

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.s_tir.dlight.gpu.rmsnorm import identify_cast_or_load_block
from tvm.script import tirx as T
from tvm.tirx.build import codegen_build, split_host_device_mods

__all__ = [
    "T",
    "ScheduleRule",
    "auto_inline_consumer_chain",
    "auto_inline_producers",
    "codegen_build",
    "dlight",
    "get_index_map",
    "get_reduction_blocks",
    "get_root_block",
    "identify_cast_or_load_block",
    "normalize_prim_func",
    "s_tir",
    "split_host_device_mods",
    "tirx",
    "try_inline_contiguous_spatial",
]
