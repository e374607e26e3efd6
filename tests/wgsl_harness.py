"""Run TVM's WebGPU kernels (WGSL) on a real WebGPU implementation: `wgpu` (wgpu-native) on
Vulkan, which on CI is Mesa's lavapipe CPU driver (Debian `mesa-vulkan-drivers`).

TVM's host side for WebGPU is wasm (its web runtime), so this module plays that part for one
scheduled PrimFunc:
- lowering and codegen are `tvm.tirx.build`'s own steps (same passes, same WGSL), split so that
  the host function stays readable as TIR;
- the host function is walked to find each kernel launch (`call_ffi_kernel`) and evaluate its
  arguments: buffers by name, scalar (POD) arguments and launch extents from the symbolic shape
  variables, which are bound from the numpy arrays' shapes;
- each kernel runs as TVM's web runtime launches it (web/src/webgpu.ts): buffer arguments at
  `@binding(i)` in parameter order, scalars then `packGridDimX` (gridDim.x - 1) in one uniform
  `PODArgs` struct after them, the grid from the `blockIdx.*` extents (the workgroup size is
  compiled into the WGSL).
"""

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from relaxlm.tvm_api import codegen_build, split_host_device_mods, tirx

LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
_MAX_GROUPS = 65535  # WebGPU's maxComputeWorkgroupsPerDimension default


class NoAdapter(RuntimeError):
    """No WebGPU adapter: why, and what installs one."""


def webgpu_device():
    """A wgpu device on a Vulkan adapter (lavapipe where it is installed)."""
    if LAVAPIPE_ICD.is_file() and "VK_ICD_FILENAMES" not in os.environ:
        # Only lavapipe: deterministic on machines with other (possibly broken) Vulkan drivers.
        os.environ["VK_ICD_FILENAMES"] = str(LAVAPIPE_ICD)
    os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")  # skip the OpenGL probe and its noise
    try:
        import wgpu
    except ImportError as e:
        raise NoAdapter("the `wgpu` package is missing: pip install -e '.[test]'") from e
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        raise NoAdapter(
            "wgpu found no Vulkan adapter: install Mesa's lavapipe (apt-get install "
            f"mesa-vulkan-drivers; it provides {LAVAPIPE_ICD})"
        )
    # float16 kernels start with `enable f16;`, which needs the feature on the device.
    features = [f for f in ("shader-f16",) if f in adapter.features]
    # The adapter's workgroup memory, not WebGPU's default 16 KB: tests/test_webgpu_kernels.py
    # runs CUDA's few-rows GEMM tiles (31 KB of them) here.
    storage = "max-compute-workgroup-storage-size"
    limits = {storage: adapter.limits[storage]}
    return adapter.request_device_sync(required_features=features, required_limits=limits), (
        adapter.info
    )


@dataclass
class Launch:
    kernel: str
    buffers: list[str]  # the PrimFunc's buffer parameters, in binding order
    pods: list[float | int]  # scalar arguments, in PODArgs order
    grid: tuple[int, int, int]


class WebGPUFunction:
    """One scheduled PrimFunc, compiled for WebGPU and runnable on a wgpu device."""

    def __init__(self, func: tirx.PrimFunc, target: tvm.target.Target, device):
        self.func = func.with_attr("global_symbol", "main")
        self.device = device
        mod = tvm.IRModule({"main": self.func})
        mod = tirx.transform.BindTarget(target.with_host(target.host))(mod)
        pipeline, finalize_host, finalize_device = tirx.get_tir_pipeline("default")
        mod = pipeline(mod)
        host_mod, device_mods = split_host_device_mods(mod)
        ((device_target, device_mod),) = device_mods.items()
        device_mod = finalize_device()(device_mod)
        self.wgsl = codegen_build(device_mod, device_target).inspect_source()
        self.kernel_params = {
            gv.name_hint: list(f.params) for gv, f in device_mod.functions_items()
        }
        self.host = host_mod["main"]
        self.shaders = _split_shaders(self.wgsl)
        self._pipelines: dict[str, tuple] = {}

    def __call__(self, **args) -> dict[str, np.ndarray]:
        """Run with numpy arrays for the buffer parameters and numbers for the scalar ones (by
        parameter name); returns every buffer parameter's contents afterwards."""
        env = self._bind(args)
        launches = self._launches(env)
        buffers = {name: self._upload(args[name]) for name in self._buffer_names()}
        encoder = self.device.create_command_encoder()
        for launch in launches:
            self._encode(encoder, launch, buffers)
        self.device.queue.submit([encoder.finish()])
        out = {}
        for name, (gpu, array) in buffers.items():
            data = self.device.queue.read_buffer(gpu)
            out[name] = np.frombuffer(data, array.dtype, array.size).reshape(array.shape)
        return out

    # -- the host side, evaluated ----------------------------------------------------------

    def _buffer_names(self) -> list[str]:
        return [p.name for p in self.func.params if isinstance(p.ty, tirx.BufferType)]

    def _bind(self, args: dict) -> dict[str, int | float]:
        """Symbolic shapes and offsets from the arrays, and the scalar arguments, by name."""
        env: dict[str, int | float] = {}
        for p in self.func.params:
            if p.name not in args:
                raise KeyError(f"argument {p.name!r} missing")
            if not isinstance(p.ty, tirx.BufferType):
                env[p.name] = args[p.name]
                continue
            array = args[p.name]
            if array.dtype != np.dtype(str(p.ty.dtype)):
                raise TypeError(f"{p.name}: dtype {array.dtype}, the kernel takes {p.ty.dtype}")
            if len(array.shape) != len(p.ty.shape):
                raise ValueError(f"{p.name}: shape {array.shape}, the kernel takes {p.ty.shape}")
            for dim, extent in zip(p.ty.shape, array.shape, strict=True):
                if isinstance(dim, tirx.Var):
                    env[dim.name] = extent
            if isinstance(p.ty.elem_offset, tirx.Var):
                env[p.ty.elem_offset.name] = 0
        for p in self.func.params:  # every extent (B + 1, ...) agrees with the arrays
            if isinstance(p.ty, tirx.BufferType):
                want = [_try_eval(dim, env) for dim in p.ty.shape]
                if any(
                    w is not None and w != e for w, e in zip(want, args[p.name].shape, strict=True)
                ):
                    raise ValueError(f"{p.name}: shape {args[p.name].shape}, kernel takes {want}")
        return env

    def _launches(self, env: dict) -> list[Launch]:
        launches: list[Launch] = []

        def visit(stmt) -> None:
            kind = type(stmt).__name__
            if kind == "Bind" and stmt.var.name not in env:
                value = _try_eval(stmt.value, env)
                if value is not None:
                    env[stmt.var.name] = value
            elif kind == "Evaluate" and _op_name(stmt.value) == "tirx.call_ffi_kernel":
                launches.append(self._launch(stmt.value, env))
            for attr in ("seq", "body", "then_case", "else_case"):
                child = getattr(stmt, attr, None)
                for c in (child if attr == "seq" else [child]) if child is not None else []:
                    visit(c)

        visit(self.host.body)
        if not launches:
            raise ValueError("the host function launches no kernel")
        return launches

    def _launch(self, call, env: dict) -> Launch:
        kernel = str(call.args[0].value)
        params = self.kernel_params[kernel]
        values = list(call.args[1:])
        args, extents = values[: len(params)], values[len(params) :]
        buffers, pods = [], []
        for arg in args:
            if _op_name(arg) == "tirx.buffer_data":  # a buffer: Call(buffer_data, [Var(name)])
                buffers.append(arg.args[0].name)
            else:
                pods.append(_eval(arg, env))
        grid = [1, 1, 1]
        for tag, extent in zip(call.attrs.launch_params, extents, strict=True):
            if str(tag).startswith("blockIdx."):
                grid["xyz".index(str(tag)[-1])] = int(_eval(extent, env))
        return Launch(kernel, buffers, pods, tuple(grid))

    # -- the device side --------------------------------------------------------------------

    def _upload(self, array: np.ndarray):
        import wgpu

        array = np.ascontiguousarray(array)
        data = array.tobytes() + b"\0" * (-array.nbytes % 4 or (4 if not array.nbytes else 0))
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        return self.device.create_buffer_with_data(data=data, usage=usage), array

    def _encode(self, encoder, launch: Launch, buffers: dict) -> None:
        import wgpu

        shader = self.shaders[launch.kernel]
        pipeline, layout = self._pipeline(launch.kernel)
        gx, gy, gz = launch.grid
        assert gz == 1, "TVM's WebGPU kernels use blockIdx.x and .y only"
        dispatch = (gx, gy, 1) if gx <= _MAX_GROUPS else (_MAX_GROUPS, gy, -(-gx // _MAX_GROUPS))
        pod = b"".join(
            struct.pack(f"<{_STRUCT[t]}", v)
            for t, v in zip(shader.pod_types, [*launch.pods, gx - 1], strict=True)
        )
        pod += b"\0" * (-len(pod) % 16)
        uniform = self.device.create_buffer_with_data(data=pod, usage=wgpu.BufferUsage.UNIFORM)
        entries = [
            {"binding": i, "resource": {"buffer": buffers[name][0]}}
            for i, name in enumerate(launch.buffers)
        ]
        entries.append({"binding": len(launch.buffers), "resource": {"buffer": uniform}})
        group = self.device.create_bind_group(layout=layout, entries=entries)
        compute = encoder.begin_compute_pass()
        compute.set_pipeline(pipeline)
        compute.set_bind_group(0, group)
        compute.dispatch_workgroups(*dispatch)
        compute.end()

    def _pipeline(self, kernel: str):
        import wgpu

        if kernel not in self._pipelines:
            shader = self.shaders[kernel]
            module = self.device.create_shader_module(code=shader.code)
            kinds = {
                "storage, read": wgpu.BufferBindingType.read_only_storage,
                "storage, read_write": wgpu.BufferBindingType.storage,
                "uniform": wgpu.BufferBindingType.uniform,
            }
            layout = self.device.create_bind_group_layout(
                entries=[
                    {
                        "binding": b,
                        "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": kinds[kind]},
                    }
                    for b, kind in shader.bindings
                ]
            )
            pipeline = self.device.create_compute_pipeline(
                layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": module, "entry_point": kernel},
            )
            self._pipelines[kernel] = (pipeline, layout)
        return self._pipelines[kernel]


@dataclass
class _Shader:
    code: str
    bindings: list[tuple[int, str]]  # (binding, "storage, read" | "storage, read_write" | ...)
    pod_types: list[str]  # WGSL scalar types of the PODArgs fields, packGridDimX last


_STRUCT = {"i32": "i", "u32": "I", "f32": "f"}


def _split_shaders(source: str) -> dict[str, _Shader]:
    """TVM's WebGPU source holds one standalone shader per kernel, each after a
    `// Function: NAME` header (the web runtime compiles them one by one)."""
    shaders = {}
    parts = re.split(r"^// Function: (\w+)\n//-+\n", source, flags=re.M)
    for name, code in zip(parts[1::2], parts[2::2], strict=True):
        if not code.strip():
            continue  # the header is printed twice
        bindings = [
            (int(b), kind) for b, kind in re.findall(r"@binding\((\d+)\) var<([\w, ]+)>", code)
        ]
        fields = re.search(r"struct PODArgs \{(.*?)\}", code, flags=re.S)
        types = re.findall(r":\s*(\w+)", fields.group(1)) if fields else []
        shaders[name] = _Shader(code, bindings, types)
    return shaders


def _op_name(expr) -> str:
    op = getattr(expr, "op", None)
    return getattr(op, "name", "") if op is not None else ""


def _try_eval(expr, env: dict):
    try:
        return _eval(expr, env)
    except (KeyError, NotImplementedError):
        return None


_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b,
    "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: int(a / b) if isinstance(a, int) else a / b,  # truncating, as C
    "Mod": lambda a, b: a - int(a / b) * b,
    "Min": min,
    "Max": max,
    "EQ": lambda a, b: a == b,
    "NE": lambda a, b: a != b,
    "LT": lambda a, b: a < b,
    "LE": lambda a, b: a <= b,
    "GT": lambda a, b: a > b,
    "GE": lambda a, b: a >= b,
    "And": lambda a, b: a and b,
    "Or": lambda a, b: a or b,
}


def _eval(expr, env: dict):
    """A host-side scalar expression's value; KeyError / NotImplementedError if it reads
    something other than known variables (DLTensor fields, ...)."""
    kind = type(expr).__name__
    if kind in ("IntImm", "FloatImm"):
        return expr.value
    if kind == "Var":
        return env[expr.name]
    if kind in _BINARY:
        return _BINARY[kind](_eval(expr.a, env), _eval(expr.b, env))
    if kind == "Not":
        return not _eval(expr.a, env)
    if kind == "Cast":
        value = _eval(expr.value, env)
        return float(value) if "float" in str(expr.dtype) else int(value)
    if kind == "Select":
        return _eval(expr.true_value if _eval(expr.condition, env) else expr.false_value, env)
    raise NotImplementedError(kind)
