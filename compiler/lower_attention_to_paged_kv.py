"""Lower the frontends' `relaxlm.attention` calls onto TVM's paged KV cache (TIR kernels).

Before: `f(inputs..., packed_params)` with `relaxlm.attention(qkv, layer_id, ...)` calls (and
`relaxlm.query_positions` calls, for models with learned positions).
After:  `f(inputs..., paged_kv_cache, packed_params)` (`num_input` + 1), each attention call
replaced by `vm.builtin.attention_kv_cache_attention_with_fused_qkv`, each positions call by
the cache's query positions, plus a `create_paged_kv_cache` function.

One cache serves every layer, so the layers must agree on heads, head size, softmax scale and
soft-cap. Where they differ in what TVM's cache can only do once, the pass takes another route:
- RoPE: applied by the cache (`RopeMode.NORMAL`) when all layers share one; otherwise (per-layer
  bases, LongRoPE, none at all) rotated in the graph at the cache's positions (`compiler/rope.py`)
  and the cache applies none.
- Sliding windows and logit soft-capping: TVM 0.27's CPU kernels have neither, and its GPU
  kernels cannot cap (see `compiler/attention_kernels.py`), so the cache gets relaxlm's kernels.
  One window on every layer is masked in every kernel. Windows on some layers only (Gemma) use
  the cache's per-layer `mha_sliding` kind; the kernel for attention among a forward's own
  tokens is shared by all layers and masks no window, so a sequence may then add at most
  `window` tokens per forward (`max_prefill_chunk` in the layout; the CPU kernel raises past it).
- Bidirectional blocks (Gemma 3's image tokens, `bidirectional` calls): TVM's C++ hands the
  kernel for attention among a forward's own tokens causal=1 always, and TVM 0.27's
  `cross_attention` builtin takes sliding-window layers for MLA ones. The one value the graph
  passes through to the kernels is the softmax scale, so a bidirectional call passes it
  negated, and relaxlm's kernels (then used on every target) read a negative scale as "no
  causal mask among this forward's tokens". The runtime runs each block as a forward of its own.
"""

import contextlib
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass

import tvm
from tvm import relax
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from relaxlm.errors import RelaxlmError
from relaxlm.frontends.ops import (
    AttentionCall,
    RopeSpec,
    is_attention_call,
    is_positions_call,
    read_attention_call,
)
from relaxlm.tvm_api import s_tir, tirx

from . import attention_kernels, kv_quant
from .kv_quant import KV_QUANTS, KVQuant, QuantLayout
from .launch_limits import fits, kernel_launches
from .rope import longrope_factors, rope_te, split_rotary_cpu

CACHE_PARAM = "paged_kv_cache"
CREATE_FUNCTION = "create_paged_kv_cache"
# The five int arguments of `create_paged_kv_cache`; each arrives as `ShapeTuple([v])`.
CREATE_ARGS = (
    "max_batch_size",
    "max_total_seq_len",
    "prefill_chunk_size",
    "page_size",
    "support_sliding_window",
)

_ATTENTION_BUILTIN = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
_POSITIONS_BUILTIN = "vm.builtin.attention_kv_cache_get_query_positions"


def lower_attention_to_paged_kv(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    dtype: str,
    first_layer: int = 0,
    kv_cache_dtype: str = "auto",
) -> tuple[tvm.IRModule, "KVCachePlan | None"]:
    """Rewrite `relaxlm.attention` calls onto one paged KV cache passed in as a new parameter.

    first_layer: the lowest layer id the module's calls may have (a pipeline stage's first
        layer); the cache holds layers first_layer.. only, as its layers 0..
    kv_cache_dtype: what the pages hold: "auto" (the model's dtype), "float16" (q, k, v cast
        to it around the cache), "int8" or "fp8" (packed rows, compiler/kv_quant.py; not WebGPU).
    Returns the rewritten module and the cache it builds (None, and the module as it was, when
    there is no attention call).
    """
    calls, wants_positions = _collect(mod)
    if not calls:
        if wants_positions:
            raise ValueError(
                "relaxlm.query_positions reads the KV cache's positions, but the module has "
                "no relaxlm.attention call to build a cache for"
            )
        return mod, None
    kv_quant.check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype in KV_QUANTS:
        _check_byte_pages(target, kv_cache_dtype)
    plan = _plan(calls, dtype, target, first_layer, kv_cache_dtype)
    rewriter = _AttentionRewriter(mod, plan, first_layer, gpu=target.kind.name != "llvm")
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.rewrite(gvar, func)
    return _add_create_function(rewriter.builder_.get(), plan, target), plan


def _check_byte_pages(target: tvm.target.Target, kv_cache_dtype: str) -> None:
    """RelaxlmError unless `target`'s kernels can hold int8 buffers (a quantized cache's pages,
    which TVM's own append and copy kernels move too)."""
    kind = target.kind.name
    if kind == "webgpu":
        raise RelaxlmError(
            f"--kv-cache-dtype {kv_cache_dtype} cannot be built for WebGPU: its pages are int8 "
            "buffers, WGSL has no 8-bit type, and TVM 0.27's WebGPU codegen declares them as "
            "`array<i8>`, which no WebGPU implementation accepts (every kernel of the cache "
            "touches them); compile for WebGPU with --kv-cache-dtype auto or float16"
        )
    if kind == "vulkan" and not target.attrs.get("supports_8bit_buffer"):
        raise RelaxlmError(
            f"--kv-cache-dtype {kv_cache_dtype} needs 8-bit storage buffers, which this Vulkan "
            "target does not declare: compile for a target with supports_8bit_buffer and "
            "supports_int8 set (VK_KHR_8bit_storage), or with --kv-cache-dtype auto"
        )


@dataclass(frozen=True)
class KVCachePlan:
    """How the attention calls map onto one paged KV cache."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    dtype: str
    cache_rope: RopeSpec | None  # applied by the cache; None: in the graph, or no RoPE at all
    rope_in_graph: bool
    windows: tuple[int, ...]  # per layer, 0 = full attention
    softcap: float
    # Some entry's forwards are one bidirectional block each (Gemma 3's images).
    bidirectional: bool = False
    page_dtype: str = ""  # what the pages hold: `dtype` (if left empty), float16, or int8 bytes
    quant: KVQuant | None = None  # how those int8 bytes hold K and V

    def __post_init__(self):
        if not self.page_dtype:
            object.__setattr__(self, "page_dtype", self.dtype)

    @property
    def layout(self) -> QuantLayout | None:
        """The packed byte rows of a quantized cache (None: pages of `page_dtype` values)."""
        if self.quant is None:
            return None
        return QuantLayout(
            self.quant, self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype
        )

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V) in one kv head."""
        if self.layout is not None:
            return self.layout.row_bytes
        return self.head_dim * {"float32": 4}.get(self.page_dtype, 2)

    @property
    def bytes_per_token(self) -> int:
        """Page bytes one token takes, all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.row_bytes

    @property
    def window(self) -> int:
        """The one sliding-window size of the model (0 if none)."""
        return max(self.windows)

    @property
    def per_layer_windows(self) -> bool:
        """Windows on some layers only: the cache's `mha_sliding` layer kind."""
        return self.window > 0 and min(self.windows) == 0

    @property
    def relaxlm_kernels(self) -> bool:
        return self.window > 0 or self.softcap > 0 or self.quant is not None or self.bidirectional

    @property
    def max_prefill_chunk(self) -> int | None:
        """Most tokens one sequence may add per forward; None: no limit beyond the cache's."""
        return self.window if self.per_layer_windows else None

    def to_manifest(self) -> dict:
        """The layout the manifest records (`kv_cache`, less the page size).

        Keys: num_layers, num_q_heads, num_kv_heads, head_dim, sm_scale, dtype, rope (RopeSpec
        fields when the cache applies RoPE, else None), rope_in_graph, sliding_windows (per
        layer, 0 = none), logit_softcap (0 = none), max_prefill_chunk, page_dtype, quant
        (None, or the codes, the scale scheme and the bytes of a K/V row), bytes_per_token
        (page bytes per token, all layers).
        """
        return {
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "sm_scale": self.sm_scale,
            "dtype": self.dtype,
            "rope": None if self.cache_rope is None else asdict(self.cache_rope),
            "rope_in_graph": self.rope_in_graph,
            "sliding_windows": list(self.windows),
            "logit_softcap": self.softcap,
            "max_prefill_chunk": self.max_prefill_chunk,
            "page_dtype": self.page_dtype,
            "quant": None
            if self.quant is None
            else {
                "name": self.quant.name,
                "codes": self.quant.codes,
                "scale": "float16 per token per kv head",
                "row_bytes": self.row_bytes,
            },
            "bytes_per_token": self.bytes_per_token,
        }


def _collect(mod: tvm.IRModule) -> tuple[list[tuple[str, AttentionCall, str]], bool]:
    """Every attention call as (function, call, qkv dtype); whether any positions call exists."""
    calls: list[tuple[str, AttentionCall, str]] = []
    positions = False
    for gvar, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue

        def visit(expr: relax.Expr, name: str = gvar.name_hint) -> None:
            nonlocal positions
            if is_attention_call(expr):
                calls.append((name, read_attention_call(expr), expr.args[1].fields[0].ty.dtype))
            positions = positions or is_positions_call(expr)

        relax.analysis.post_order_visit(func.body, visit)
    return calls, positions


def _plan(
    calls: list[tuple[str, AttentionCall, str]],
    dtype: str,
    target,
    first_layer: int = 0,
    kv_cache_dtype: str = "auto",
) -> KVCachePlan:
    """The one cache every call fits; ValueError naming the first call that does not."""
    first_func, first, _ = calls[0]
    uniform = ("num_q_heads", "num_kv_heads", "head_dim", "sm_scale", "logit_softcap")
    seen: set[tuple[str, int]] = set()
    for func, call, qkv_dtype in calls:
        where = f"layer {call.layer_id} (function {func!r})"
        if (func, call.layer_id) in seen:
            raise ValueError(
                f"{where}: layer_id {call.layer_id} is used by two attention calls; each call "
                "needs its own layer_id, or both would append to the same cache layer"
            )
        seen.add((func, call.layer_id))
        if call.layer_id < first_layer:
            raise ValueError(f"{where}: layer_id must be >= {first_layer}, got {call.layer_id}")
        if qkv_dtype != dtype:
            raise ValueError(
                f"{where}: qkv dtype is {qkv_dtype}, but the KV cache is {dtype}; "
                "pass the model's activation dtype to lower_attention_to_paged_kv"
            )
        for name in uniform:
            got, want = getattr(call, name), getattr(first, name)
            if got != want:
                raise ValueError(
                    f"{where}: {name} is {got}, but layer {first.layer_id} (function "
                    f"{first_func!r}) has {want}; one paged KV cache needs the same {name} "
                    "in every layer"
                )
    num_layers = max(call.layer_id for _, call, _ in calls) + 1 - first_layer
    windows = [0] * num_layers
    for func, call, _ in calls:
        at = call.layer_id - first_layer
        if windows[at] and windows[at] != call.sliding_window:
            raise ValueError(
                f"layer {call.layer_id} (function {func!r}) has sliding window "
                f"{call.sliding_window} in one function and {windows[at]} in another"
            )
        windows[at] = call.sliding_window
    if len(set(windows) - {0}) > 1:
        raise RelaxlmError(
            f"layers have different sliding windows {sorted(set(windows) - {0})}; relaxlm's "
            "paged KV cache supports one window size per model"
        )
    ropes = {"null" if call.rope is None else call.rope.to_json() for _, call, _ in calls}
    shared = RopeSpec.from_json(ropes.pop()) if len(ropes) == 1 else None
    # TVM's LongRoPE picks its table by the number of tokens in a forward, not by position.
    cache_rope = shared if shared and shared.scaling.get("rope_type") != "longrope" else None
    quant = KV_QUANTS.get(kv_cache_dtype)
    if quant is not None:
        cache_rope = None  # the cache would rotate packed bytes: the graph rotates q and k
    page_dtype = {"auto": dtype, "float16": "float16"}.get(kv_cache_dtype, "int8")
    plan = KVCachePlan(
        num_layers=num_layers,
        num_q_heads=first.num_q_heads,
        num_kv_heads=first.num_kv_heads,
        head_dim=first.head_dim,
        sm_scale=first.sm_scale,
        dtype=dtype,
        cache_rope=cache_rope,
        rope_in_graph=cache_rope is None and any(call.rope for _, call, _ in calls),
        windows=tuple(windows),
        softcap=first.logit_softcap,
        page_dtype=page_dtype,
        quant=quant,
        bidirectional=any(call.bidirectional for _, call, _ in calls),
    )
    return plan


def _is_longrope(rope: RopeSpec | None) -> bool:
    return rope is not None and rope.scaling.get("rope_type") == "longrope"


@relax.expr_functor.mutator
class _AttentionRewriter(relax.PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, plan: KVCachePlan, first_layer: int = 0, gpu: bool = False
    ):
        super().__init__(mod)
        self._plan = plan
        self._gpu = gpu  # the packing kernels' schedule
        self._first_layer = first_layer
        self._cache: relax.Var | None = None
        self._found = False
        self._packing: dict[str, tvm.ir.GlobalVar] = {}

    def rewrite(self, gvar: tvm.ir.GlobalVar, func: relax.Function) -> None:
        """Rewrite `func` in the builder's module if it holds relaxlm attention or positions."""
        self._cache = relax.Var(CACHE_PARAM, relax.ObjectType())
        self._found = False
        body = self.visit_expr(func.body)
        if not self._found:
            return
        params = list(func.params)
        num_input = func.attrs["num_input"] if func.attrs and "num_input" in func.attrs else None
        # The cache goes after the runtime inputs so `num_input` still splits off the weights;
        # without `num_input` every parameter is a runtime input and it goes last.
        at = len(params) if num_input is None else int(num_input)
        params.insert(at, self._cache)
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        if num_input is not None:
            new_func = new_func.with_attr("num_input", at + 1)
        self.builder_.update_func(gvar, new_func)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if is_positions_call(call):
            self._found = True
            b, s = call.args[1].fields[0].ty.shape
            return relax.op.reshape(self._positions(b * s), (b, s))  # [b, s]
        if not is_attention_call(call):
            return call
        self._found = True
        attn = read_attention_call(call)
        qkv = call.args[1].fields[0]
        b, s, h, d = qkv.ty.shape
        flat = self.builder_.emit(relax.op.reshape(qkv, (b * s, h, d)))  # [tokens, hq+2hkv, d]
        dtype, page_dtype, layout = qkv.ty.dtype, self._plan.page_dtype, self._plan.layout
        # A quantized cache's packing kernel rotates q and k as the cache's own kernel would
        # (cos/sin once per token); LongRoPE is rotated in the graph first.
        pack_rope = attn.rope if layout is not None and not _is_longrope(attn.rope) else None
        if self._plan.rope_in_graph and attn.rope is not None and pack_rope is None:
            flat = self._rotate(flat, attn)
        out_ty = relax.TensorType((b * s, attn.num_q_heads, d), page_dtype)
        if layout is not None:
            pack, unpack = self._packing_functions(layout, pack_rope)
            packed_ty = relax.TensorType((b * s, layout.packed_rows, layout.row_bytes), "int8")
            positions = self._positions(b * s)
            flat = self.builder_.emit(relax.call_tir(pack, [flat, positions], packed_ty))
            out_ty = relax.TensorType((b * s, layout.q_rows, layout.row_bytes), "int8")
        elif page_dtype != dtype:
            flat = self.builder_.emit(relax.op.astype(flat, page_dtype))
        out = self.builder_.emit(
            relax.call_dps_packed(
                _ATTENTION_BUILTIN,
                [
                    self._cache,
                    relax.prim_value(attn.layer_id - self._first_layer),
                    # The kernels take the plain softmax scale and fold in log2(e) themselves;
                    # its sign tells relaxlm's kernels a forward is one bidirectional block.
                    relax.prim_value(-attn.sm_scale if attn.bidirectional else attn.sm_scale),
                    flat,
                ],
                out_ty=out_ty,
            )
        )  # [tokens, hq, d]
        if layout is not None:
            hq_ty = relax.TensorType((b * s, attn.num_q_heads, d), dtype)
            out = self.builder_.emit(relax.call_tir(unpack, [out], hq_ty))
        elif page_dtype != dtype:
            out = self.builder_.emit(relax.op.astype(out, dtype))
        return relax.op.reshape(out, (b, s, attn.num_q_heads, d))  # [b, s, hq, d]

    def _packing_functions(self, layout: QuantLayout, rope: RopeSpec | None):
        """The GlobalVars of kv_quant's pack (for this RoPE) and unpack kernels, each added to
        the module once."""
        # Without their own global symbol the module names them (a model with two RoPEs,
        # Gemma 3, has two packing kernels).
        key = "null" if rope is None else rope.to_json()
        if key not in self._packing:
            pack = kv_quant.pack_qkv(layout, rope, gpu=self._gpu)
            self._packing[key] = self.builder_.add_func(
                pack.without_attr("global_symbol"), "relaxlm_kv_pack"
            )
        if "unpack" not in self._packing:
            unpack = kv_quant.unpack_output(layout, gpu=self._gpu)
            self._packing["unpack"] = self.builder_.add_func(
                unpack.without_attr("global_symbol"), "relaxlm_kv_unpack"
            )
        return self._packing[key], self._packing["unpack"]

    def _positions(self, num_tokens) -> relax.Expr:
        """Each token's position in its sequence, [tokens] int32, from the cache."""
        return self.builder_.emit(
            relax.call_pure_packed(
                _POSITIONS_BUILTIN, self._cache, ty_args=relax.TensorType((num_tokens,), "int32")
            )
        )

    def _rotate(self, flat: relax.Expr, attn: AttentionCall) -> relax.Expr:
        """RoPE on the q and k heads of `flat` [tokens, heads, d] at the cache's positions."""
        inputs = [flat, self._positions(flat.ty.shape[0])]
        if attn.rope.scaling.get("rope_type") == "longrope":
            inputs.append(relax.const(longrope_factors(attn.rope), "float32"))  # [2, rd / 2]
        rotate = functools.partial(
            rope_te, spec=attn.rope, num_rotated_heads=attn.num_q_heads + attn.num_kv_heads
        )
        return self.builder_.emit_te(
            rotate, *inputs, primfunc_name_hint=f"rope_layer{attn.layer_id}"
        )


def _add_create_function(mod: tvm.IRModule, plan: KVCachePlan, target: tvm.target.Target):
    """`mod` plus `create_paged_kv_cache(5 × ShapeTuple([v]))` and the cache's TIR kernels."""
    cache_mod = _cache_functions(plan, target)
    clash = {g.name_hint for g in cache_mod.get_global_vars()} & {
        g.name_hint for g in mod.get_global_vars()
    }
    assert not clash, f"the KV cache's functions {sorted(clash)} clash with the model's"
    new_mod = mod.clone()
    new_mod.update(cache_mod)
    return new_mod


# Building the cache's kernels parses ~15 TVMScript functions (~6 s on 2 cores); they depend on
# the plan and the target only, so compiles that share both (another quantization of the same
# model, the tests' many compiles) build them once per process. IRModules are immutable.
_CACHE_FUNCTIONS: dict[str, tvm.IRModule] = {}
_CACHE_FUNCTIONS_KEPT = 8


def _cache_functions(plan: KVCachePlan, target: tvm.target.Target) -> tvm.IRModule:
    """`create_paged_kv_cache` and its kernels alone, in a module of their own (memoized)."""
    key = json.dumps([asdict(plan), str(target)], sort_keys=True, default=str)
    if key not in _CACHE_FUNCTIONS:
        if len(_CACHE_FUNCTIONS) >= _CACHE_FUNCTIONS_KEPT:
            del _CACHE_FUNCTIONS[next(iter(_CACHE_FUNCTIONS))]
        _CACHE_FUNCTIONS[key] = _build_cache_functions(plan, target)
    return _CACHE_FUNCTIONS[key]


def _build_cache_functions(plan: KVCachePlan, target: tvm.target.Target) -> tvm.IRModule:
    rope, head_dim = plan.cache_rope, plan.head_dim
    # A quantized cache's heads are byte rows (kv_quant.py): q rows of them, then K and V.
    layout = plan.layout
    q_heads = plan.num_q_heads if layout is None else layout.q_rows
    row = head_dim if layout is None else layout.row_bytes
    sizes = {name: tirx.Var(name, "int64") for name in CREATE_ARGS}
    params = [relax.Var(name, relax.ShapeType([v])) for name, v in sizes.items()]
    cache_args = dict(sizes)
    if plan.relaxlm_kernels:
        # Windows are compiled in; the cache's own per-sequence sliding (attention sinks, pages
        # recycled, RoPE moved into the kernels) would break the kernels' absolute positions.
        cache_args["support_sliding_window"] = 0
    bb = relax.BlockBuilder(tvm.IRModule())
    # TVM's kernels for int8 pages (those relaxlm replaces, and tree attention, unused) each
    # warn that storing float into int8 may lose precision, from C++ straight to stderr.
    quiet = _stderr_silenced() if layout is not None else contextlib.nullcontext()
    with quiet, bb.function(CREATE_FUNCTION, params):
        # The constructor emits its kernels into `bb` (BlockBuilder.current()).
        cache = TIRPagedKVCache(
            attn_kind=[
                "mha_sliding" if plan.per_layer_windows and w else "mha" for w in plan.windows
            ],
            **cache_args,
            layer_partition=relax.ShapeExpr([0, plan.num_layers]),
            num_hidden_layers=plan.num_layers,
            num_attention_heads=q_heads,
            num_key_value_heads=plan.num_kv_heads,
            qk_head_dim=row,
            v_head_dim=row,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if rope is None else RopeMode.NORMAL,
            # The kernels multiply positions by rope_scale; HF's linear factor divides them.
            rope_scale=1.0 if rope is None else 1.0 / rope.scale,
            rope_theta=10000.0 if rope is None else rope.theta,
            rope_scaling={} if rope is None else dict(rope.scaling),
            rope_ext_factors=relax.prim_value(0),  # only TVM's LongRoPE uses them
            rotary_dim=row if rope is None else rope.rotary_dim or head_dim,
            enable_disaggregation=False,
            dtype=plan.page_dtype,
            target=target,
            layer_sliding_window_size=plan.window if plan.per_layer_windows else 1024,
        )
        bb.emit_func_output(bb.emit(cache._expr))
    new_mod = bb.get()
    # On CPU always: TVM's CPU decode kernel runs every head of every sequence one after another,
    # each dot product a serial strict-float sum; relaxlm's runs heads in parallel, in vectors.
    # On GPUs only where TVM's tiled kernels cannot mask or cap the scores, or cannot launch.
    gpu = target.kind.name != "llvm"
    if plan.relaxlm_kernels or not gpu or not _tvm_kernels_launch(new_mod, target):
        new_mod = _use_relaxlm_kernels(new_mod, plan, gpu)
    return new_mod


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tvm_kernels_launch(mod: tvm.IRModule, target: tvm.target.Target) -> bool:
    """Whether the target can launch the blocks of TVM's GPU attention kernels. (Its decode
    kernel sizes blocks from head_dim: at 24 it asks for 6x1x85 threads, and CUDA allows a z
    of 64 at most.)"""
    attention = tvm.IRModule(
        {gv: func for gv, func in mod.functions_items() if gv.name_hint in _GPU_ATTENTION}
    )
    return all(fits(launch, target) for launch in kernel_launches(attention))


_GPU_ATTENTION = (
    "tir_attention_prefill_ragged",
    "tir_attention_prefill",
    "tir_attention_decode",
    "tir_attention_prefill_sliding_window",
    "tir_attention_decode_sliding_window",
)


def _use_relaxlm_kernels(mod: tvm.IRModule, plan: KVCachePlan, gpu: bool) -> tvm.IRModule:
    """Swap the cache's attention kernels for relaxlm's (same signatures, same names)."""
    # Kernels of a quantized cache see q and the output in the model's dtype (kv_quant.py).
    dtype = plan.page_dtype if plan.layout is None else plan.dtype
    shape = (plan.num_kv_heads, plan.num_q_heads, plan.head_dim, dtype)
    # With one window on every layer, every kernel masks it; with per-layer windows only the
    # sliding-window kernels do, and the shared ragged kernel limits the tokens per forward.
    everywhere = 0 if plan.per_layer_windows else plan.window
    common = {"softcap": plan.softcap, "gpu": gpu, "layout": plan.layout}
    cpu = "" if gpu else "_cpu"  # TVM names its CPU kernels apart
    kernels = {
        f"tir_attention_prefill_ragged{cpu}": attention_kernels.ragged_prefill(
            *shape,
            window=everywhere,
            max_chunk=plan.window if plan.per_layer_windows else 0,
            **common,
        ),
        f"tir_attention_prefill{cpu}": attention_kernels.paged_prefill(
            *shape, window=everywhere, sliding_table=False, **common
        ),
        f"tir_attention_decode{cpu}": attention_kernels.paged_decode(
            *shape, window=everywhere, sliding_table=False, **common
        ),
        f"tir_attention_prefill{cpu}_sliding_window": attention_kernels.paged_prefill(
            *shape, window=plan.window, sliding_table=True, **common
        ),
        f"tir_attention_decode{cpu}_sliding_window": attention_kernels.paged_decode(
            *shape, window=plan.window, sliding_table=True, **common
        ),
    }
    if plan.layout is not None:
        # TVM's merge reads outputs of q_rows heads of R int8 "values"; these are the bytes of
        # hq heads of the model's dtype. (Its other kernels only move bytes: the GPU split with
        # no RoPE selects each element as it is, append and the page copies copy.)
        kernels[f"tir_attention_merge_state{cpu}"] = kv_quant.merge_state(plan.layout, gpu)
    if not gpu:
        # TVM's CPU RoPE evaluates pow/cos/sin per element, serially; relaxlm's supports the
        # scalings the cache is given (default, linear, llama3; LongRoPE is rotated in the graph).
        heads = (plan.num_q_heads, plan.head_dim)
        if plan.layout is not None:  # the packed rows are split as they are (no RoPE)
            heads = (plan.layout.q_rows, plan.layout.row_bytes)
        kernels["tir_split_rotary"] = split_rotary_cpu(
            plan.cache_rope, heads[0], plan.num_kv_heads, heads[1], plan.page_dtype
        )
    names = {gvar.name_hint: gvar for gvar in mod.get_global_vars()}
    if plan.layout is not None and gpu:
        # TVM's tree-attention kernels (speculative token trees, which relaxlm never builds)
        # fail CUDA codegen on int8 pages (a `boolx8` vector): each becomes a function of the
        # same signature that raises if called.
        for name in _TREE_ATTENTION:
            kernels[name] = _refusing(
                mod[names[name]],
                f"relaxlm: {name} is not built for "
                "a quantized KV cache (relaxlm does not build token trees)",
            )
    for name, kernel in kernels.items():
        assert name in names, f"TVM's paged KV cache no longer adds a kernel named {name!r}"
        old = mod[names[name]]
        mod[names[name]] = kernel.with_attr("global_symbol", old.attrs["global_symbol"])
    return mod


_TREE_ATTENTION = (
    "tir_attention_prefill_with_tree_mask",
    "tir_attention_prefill_with_tree_mask_with_paged_kv_cache",
)


def _refusing(func: tirx.PrimFunc, message: str) -> tirx.PrimFunc:
    """A host function with `func`'s parameters whose only statement fails with `message`."""
    # TVM 0.27's Python AssertStmt names its first two parameters (kind, condition) but hands
    # them on in that order to a constructor that takes (condition, kind).
    fail = tirx.AssertStmt(
        tvm.tirx.const(False, "bool"), tvm.ir.StringImm("RuntimeError"), [tvm.ir.StringImm(message)]
    )
    # in a root block, as every scheduled function has (launch_limits reads from there)
    root = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", fail))
    return func.with_body(root).with_attr("tirx.is_scheduled", True)
