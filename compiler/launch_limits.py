"""Compile-time launch limits: every GPU kernel's block against what the target can launch.

A kernel whose block has more threads, or a larger dimension, than the device allows compiles
fine and fails only when launched (CUDA_ERROR_INVALID_VALUE on a GPU), so the scheduled TIR is
checked here, on the build machine, before any code is generated.
"""

from dataclasses import dataclass

import tvm
from tvm.target import Target

from relaxlm.errors import RelaxlmError
from relaxlm.tvm_api import s_tir, tirx

# Largest blockDim (x, y, z) per target kind: CUDA's for every compute capability, WebGPU's
# default maxComputeWorkgroupSize{X,Y,Z}, Metal's maxThreadsPerThreadgroup. A kind not listed
# is held to its threads-per-block limit in each dimension.
BLOCK_DIMS = {"cuda": (1024, 1024, 64), "webgpu": (256, 256, 64), "metal": (1024, 1024, 1024)}
_AXES = ("threadIdx.x", "threadIdx.y", "threadIdx.z")


@dataclass(frozen=True)
class Launch:
    """One kernel's block: its thread extents along x, y, z."""

    kernel: str
    block: tuple[int, int, int]

    @property
    def threads(self) -> int:
        x, y, z = self.block
        return x * y * z


def thread_limits(target: Target) -> tuple[int, tuple[int, int, int]]:
    """(max threads per block, max block dims) of `target`."""
    threads = max(
        int(target.attrs[k])
        for k in ("max_num_threads", "max_threads_per_block")
        if k in target.attrs
    )
    dims = BLOCK_DIMS.get(target.kind.name, (threads,) * 3)
    return threads, tuple(min(d, threads) for d in dims)


def kernel_launches(mod: tvm.IRModule) -> list[Launch]:
    """The block of every kernel in the scheduled module's TIR functions (constant extents)."""
    launches = []
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            blocks = _kernel_blocks(s_tir.Schedule(func))
            for i, block in enumerate(blocks):
                name = gvar.name_hint if len(blocks) == 1 else f"{gvar.name_hint} (kernel {i})"
                launches.append(Launch(name, block))
    return launches


def fits(launch: Launch, target: Target) -> bool:
    """Whether `target` can launch the block of `launch`."""
    threads, dims = thread_limits(target)
    return launch.threads <= threads and all(
        b <= d for b, d in zip(launch.block, dims, strict=True)
    )


def check_launch_limits(mod: tvm.IRModule, target: Target, model: str, where: str) -> None:
    """RelaxlmError naming the first kernel whose block the target cannot launch.

    model, where: what the message names, e.g. "LlamaForCausalLM in float16" and
    "target 'cuda' (sm_80, sm_90)".
    """
    threads, dims = thread_limits(target)
    for launch in kernel_launches(mod):
        if not fits(launch, target):
            raise RelaxlmError(
                f"{model}: kernel {launch.kernel} would launch blocks of "
                f"{'x'.join(map(str, launch.block))} = {launch.threads} threads on {where}, "
                f"which allows at most {threads} threads per block and "
                f"{'x'.join(map(str, dims))} (x, y, z); its schedule does not fit this target"
            )


def _kernel_blocks(sch: s_tir.Schedule) -> list[tuple[int, int, int]]:
    """Per kernel (an outermost thread-bound loop), the largest extent bound to each threadIdx
    axis. `get_loops` stops at a block's parent block, so the loops above are carried down."""
    kernels: list[tuple[tirx.For, dict[str, int]]] = []
    stack = [(sch.get_sblock("root"), [])]
    while stack:
        parent, above = stack.pop()
        for block in sch.get_child_blocks(parent):
            loops = [sch.get(lp) for lp in sch.get_loops(block)]
            bound = above + [lp for lp in loops if lp.kind == tirx.ForKind.THREAD_BINDING]
            stack.append((block, bound))
            if not bound:
                continue
            extents = next((e for root, e in kernels if root.same_as(bound[0])), None)
            if extents is None:
                extents = {}
                kernels.append((bound[0], extents))
            for lp in bound:
                tag = lp.thread_binding.thread_tag
                if tag in _AXES and isinstance(lp.extent, tirx.IntImm):
                    extents[tag] = max(extents.get(tag, 1), int(lp.extent))
    return [tuple(e.get(axis, 1) for axis in _AXES) for _, e in kernels]
