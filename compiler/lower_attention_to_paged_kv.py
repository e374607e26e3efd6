"""Lower the frontends' `relaxlm.attention` calls onto TVM's paged KV cache (TIR kernels).

Before: `f(inputs..., packed_params)` with `relaxlm.attention(qkv, layer_id, ...)` calls.
After:  `f(inputs..., paged_kv_cache, packed_params)` (`num_input` + 1), each call replaced by
`vm.builtin.attention_kv_cache_attention_with_fused_qkv`, plus a `create_paged_kv_cache`
function whose cache applies RoPE itself from its own position bookkeeping.
"""

import json
from dataclasses import asdict

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from relaxlm.frontends.ops import AttentionCall, is_attention_call, read_attention_call

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
_LAYOUT_ATTR = "relaxlm.paged_kv_layout"


@tvm.transform.module_pass(opt_level=0, name="LowerAttentionToPagedKV")
class LowerAttentionToPagedKV:
    """Rewrite `relaxlm.attention` calls onto one paged KV cache passed in as a new parameter."""

    def __init__(self, target: tvm.target.Target, dtype: str):
        self.target = target
        self.dtype = dtype

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _AttentionRewriter(mod)
        calls: list[tuple[str, AttentionCall, str]] = []
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                calls += rewriter.rewrite(gvar, func)
        if not calls:
            return mod
        layout = _check_layers(calls, self.dtype)
        mod = _add_create_function(rewriter.builder_.get(), layout, self.target)
        return mod.with_attr(_LAYOUT_ATTR, json.dumps(layout, sort_keys=True))


def paged_kv_layout(mod: tvm.IRModule) -> dict:
    """The KV-cache layout `LowerAttentionToPagedKV` built, as a plain dict for the manifest.

    Keys: num_layers, num_q_heads, num_kv_heads, head_dim, sm_scale, dtype, rope (RopeSpec fields).
    """
    if mod.attrs is None or _LAYOUT_ATTR not in mod.attrs:
        raise ValueError(
            f"module has no {_LAYOUT_ATTR!r} attribute: run LowerAttentionToPagedKV on a module "
            "with relaxlm.attention calls first"
        )
    return json.loads(str(mod.attrs[_LAYOUT_ATTR]))


@relax.expr_functor.mutator
class _AttentionRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self._cache: relax.Var | None = None
        self._found: list[tuple[AttentionCall, str]] = []

    def rewrite(
        self, gvar: tvm.ir.GlobalVar, func: relax.Function
    ) -> list[tuple[str, AttentionCall, str]]:
        """Rewrite `func` in the builder's module; returns its (function, call, qkv dtype)s."""
        self._cache = relax.Var(CACHE_PARAM, relax.ObjectType())
        self._found = []
        body = self.visit_expr(func.body)
        if not self._found:
            return []
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
        return [(gvar.name_hint, call, dtype) for call, dtype in self._found]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not is_attention_call(call):
            return call
        attn = read_attention_call(call)
        qkv = call.args[1].fields[0]
        self._found.append((attn, qkv.ty.dtype))
        b, s, h, d = qkv.ty.shape
        flat = self.builder_.emit(relax.op.reshape(qkv, (b * s, h, d)))  # [tokens, hq+2hkv, d]
        out = self.builder_.emit(
            relax.call_dps_packed(
                _ATTENTION_BUILTIN,
                [
                    self._cache,
                    relax.prim_value(attn.layer_id),
                    # The kernels take the plain softmax scale and fold in log2(e) themselves.
                    relax.prim_value(attn.sm_scale),
                    flat,
                ],
                out_ty=relax.TensorType((b * s, attn.num_q_heads, d), qkv.ty.dtype),
            )
        )  # [tokens, hq, d]
        return relax.op.reshape(out, (b, s, attn.num_q_heads, d))  # [b, s, hq, d]


def _check_layers(calls: list[tuple[str, AttentionCall, str]], dtype: str) -> dict:
    """The one cache layout every call agrees on; ValueError naming the first disagreement."""
    first_func, first, _ = calls[0]
    fields = ("num_q_heads", "num_kv_heads", "head_dim", "sm_scale", "rope")
    seen: set[tuple[str, int]] = set()
    for func, call, qkv_dtype in calls:
        where = f"layer {call.layer_id} (function {func!r})"
        if (func, call.layer_id) in seen:
            raise ValueError(
                f"{where}: layer_id {call.layer_id} is used by two attention calls; each call "
                "needs its own layer_id, or both would append to the same cache layer"
            )
        seen.add((func, call.layer_id))
        if call.layer_id < 0:
            raise ValueError(f"{where}: layer_id must be >= 0, got {call.layer_id}")
        if qkv_dtype != dtype:
            raise ValueError(
                f"{where}: qkv dtype is {qkv_dtype}, but the KV cache is {dtype}; "
                "pass the model's activation dtype to LowerAttentionToPagedKV"
            )
        for name in fields:
            got, want = getattr(call, name), getattr(first, name)
            if got != want:
                raise ValueError(
                    f"{where}: {name} is {got}, but layer {first.layer_id} (function "
                    f"{first_func!r}) has {want}; one paged KV cache needs the same {name} "
                    "in every layer"
                )
    layout = {name: getattr(first, name) for name in fields}
    layout["rope"] = asdict(first.rope)
    layout["num_layers"] = max(call.layer_id for _, call, _ in calls) + 1
    layout["dtype"] = dtype
    return layout


def _add_create_function(mod: tvm.IRModule, layout: dict, target: tvm.target.Target):
    """`mod` plus `create_paged_kv_cache(5 × ShapeTuple([v]))` and the cache's TIR kernels."""
    rope, head_dim = layout["rope"], layout["head_dim"]
    sizes = {name: tirx.Var(name, "int64") for name in CREATE_ARGS}
    params = [relax.Var(name, relax.ShapeType([v])) for name, v in sizes.items()]
    bb = relax.BlockBuilder(mod)
    with bb.function(CREATE_FUNCTION, params):
        # The constructor emits its kernels into `bb` (BlockBuilder.current()).
        cache = TIRPagedKVCache(
            attn_kind="mha",
            **sizes,
            layer_partition=relax.ShapeExpr([0, layout["num_layers"]]),
            num_hidden_layers=layout["num_layers"],
            num_attention_heads=layout["num_q_heads"],
            num_key_value_heads=layout["num_kv_heads"],
            qk_head_dim=head_dim,
            v_head_dim=head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            # The kernels multiply positions by rope_scale; HF's linear factor divides them.
            rope_scale=1.0 / rope["scale"],
            rope_theta=rope["theta"],
            rope_scaling=dict(rope["scaling"]),
            rope_ext_factors=relax.prim_value(0),  # only "longrope" scaling uses them
            rotary_dim=rope["rotary_dim"] or head_dim,
            enable_disaggregation=False,
            dtype=layout["dtype"],
            target=target,
        )
        bb.emit_func_output(bb.emit(cache._expr))
    new_mod = bb.get()
    return new_mod.with_attrs(mod.attrs) if mod.attrs else new_mod
