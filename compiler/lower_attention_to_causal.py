"""Lower the frontends' `relaxlm.attention` calls to plain causal attention, with no KV cache.

For graphs that run whole sequences at once (embedding models). Each call on qkv
[b, s, hq + 2 * hkv, d] becomes RoPE on q and k at positions 0 .. s-1 of every row
(`compiler/rope.py`, as the paged-attention pass rotates in the graph), then
softmax(cap(q k^T * sm_scale) + causal mask) v, the softmax in float32, the mask keeping only
the last `sliding_window` keys where the layer has one, k and v heads repeated for grouped-query
attention. `relaxlm.query_positions` calls become the same row positions. Rows must be
right-padded: causal attention then never lets a real token see padding, so no padding mask is
needed.
"""

import functools

import numpy as np
import tvm
from tvm import relax, te

from relaxlm.frontends.ops import (
    AttentionCall,
    is_attention_call,
    is_positions_call,
    read_attention_call,
)
from relaxlm.tvm_api import tirx

from .rope import longrope_factors, rope_te


@tvm.transform.module_pass(opt_level=0, name="LowerAttentionToCausal")
class LowerAttentionToCausal:
    """Rewrite every `relaxlm.attention` call as RoPE plus masked softmax attention."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if is_positions_call(call):  # [b, s] ids -> [b, s] positions
            ids = call.args[1].fields[0]
            return self.builder_.emit_te(_positions, *ids.ty.shape, primfunc_name_hint="positions")
        if not is_attention_call(call):
            return call
        attn = read_attention_call(call)
        qkv = call.args[1].fields[0]
        b, s, h, d = qkv.ty.shape
        dtype = qkv.ty.dtype
        hq, hkv = attn.num_q_heads, attn.num_kv_heads
        bb = self.builder_

        if attn.rope is not None:
            flat = bb.emit(relax.op.reshape(qkv, (b * s, h, d)))  # [tokens, hq + 2 hkv, d]
            positions = bb.emit(relax.op.reshape(bb.emit_te(_positions, b, s), (b * s,)))
            extra = []
            if attn.rope.scaling.get("rope_type") == "longrope":
                extra = [relax.const(np.array(longrope_factors(attn.rope), "float32"))]
            rope = functools.partial(rope_te, spec=attn.rope, num_rotated_heads=hq + hkv)
            flat = bb.emit_te(rope, flat, positions, *extra, primfunc_name_hint="rope")
            qkv = bb.emit(relax.op.reshape(flat, (b, s, h, d)))
        heads = bb.emit(relax.op.permute_dims(qkv, [0, 2, 1, 3]))  # [b, hq + 2 hkv, s, d]
        parts = bb.emit(relax.op.split(heads, [hq, hq + hkv], axis=1))
        q, k, v = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
        if hq != hkv:  # query head i reads key/value head i // (hq / hkv)
            k = bb.emit(relax.op.repeat(k, hq // hkv, axis=1))
            v = bb.emit(relax.op.repeat(v, hq // hkv, axis=1))
        scores = bb.emit(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])))
        mask = functools.partial(_masked_scores, attn=attn)
        scores = bb.emit_te(mask, scores, primfunc_name_hint="causal_scores")
        probs = bb.emit(relax.op.astype(relax.op.nn.softmax(scores, axis=-1), dtype))
        out = bb.emit(relax.op.matmul(probs, v))  # [b, hq, s, d]
        return relax.op.permute_dims(out, [0, 2, 1, 3])  # [b, s, hq, d]


def _positions(b: tirx.Expr, s: tirx.Expr) -> te.Tensor:
    """[b, s] int32: each token's position within its row."""
    return te.compute((b, s), lambda _, j: j.astype("int32"), name="positions")


def _masked_scores(scores: te.Tensor, attn: AttentionCall) -> te.Tensor:
    """float32 logits: scaled, soft-capped, and the lowest float where key j is hidden from
    query i (j > i, or j at least `sliding_window` before i)."""
    lowest = tirx.min_value("float32")
    cap = attn.logit_softcap

    def logit(b, h, i, j):
        x = scores[b, h, i, j].astype("float32") * attn.sm_scale
        if cap > 0:
            x = tirx.tanh(x / cap) * cap
        # A bidirectional block (Gemma 3's image) sees all of itself; here it has no cache.
        visible = tirx.const(True) if attn.bidirectional else j <= i
        if attn.sliding_window > 0:
            visible = tirx.all(visible, i - j < attn.sliding_window)
        return tirx.Select(visible, x, lowest)

    return te.compute(scores.shape, logit, name="causal_scores")
