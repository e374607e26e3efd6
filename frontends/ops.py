"""Graph ops that frontends emit and compiler passes recognise.

Attention is one node in the frontend's graph, with no KV cache: a `call_dps_packed` to the
project symbol `relaxlm.attention`. The paged-attention pass in `compiler/` finds these calls
and lowers them onto TVM's paged KV cache, which then owns positions and RoPE. Models that need
token positions themselves (learned position embeddings) ask for them with `query_positions`,
which the same pass answers from the cache.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import tvm
from tvm import relax
from tvm.relax.frontend import nn

ATTENTION_SYMBOL = "relaxlm.attention"
POSITIONS_SYMBOL = "relaxlm.query_positions"


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding applied to q and k before attention (HF rotate-half style)."""

    theta: float = 10000.0
    rotary_dim: int = 0  # 0 = the whole head
    # Linear position scaling (HF rope_type "linear"): positions are divided by this.
    scale: float = 1.0
    # Frequency scaling in TVM's position_embedding terms, e.g. {"rope_type": "llama3", ...};
    # {"rope_type": "longrope", "short_factor", "long_factor", "original_max_position_embeddings",
    # "attention_factor"} for Phi-3's LongRoPE.
    scaling: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "RopeSpec | None":
        fields = json.loads(text)
        return None if fields is None else RopeSpec(**fields)


@dataclass(frozen=True)
class AttentionCall:
    """The attributes of one `relaxlm.attention` call, as a pass reads them back."""

    layer_id: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    rope: RopeSpec | None
    sliding_window: int = 0
    logit_softcap: float = 0.0
    bidirectional: bool = False


def attention(
    qkv: nn.Tensor,
    *,
    layer_id: int,
    num_q_heads: int,
    num_kv_heads: int,
    sm_scale: float,
    rope: RopeSpec | None,
    sliding_window: int = 0,
    logit_softcap: float = 0.0,
    bidirectional: bool = False,
) -> nn.Tensor:
    """Causal self-attention with RoPE over fused qkv.

    qkv: [batch, seq, num_q_heads + 2 * num_kv_heads, head_dim], q heads first, then k, then v.
    rope: None for a model without rotary embeddings (positions enter elsewhere).
    sliding_window: > 0 lets a token see only itself and the `sliding_window - 1` before it.
    logit_softcap: > 0 caps each attention logit as `cap * tanh(logit / cap)` before softmax.
    bidirectional: the call's tokens are one block (Gemma 3's image) that attends to itself
        bidirectionally, and causally to what precedes it; a forward then holds one sequence's
        block only.
    Returns [batch, seq, num_q_heads, head_dim].
    """
    b, s, h, d = qkv.shape
    assert h == num_q_heads + 2 * num_kv_heads, (h, num_q_heads, num_kv_heads)
    assert sliding_window >= 0 and logit_softcap >= 0, (sliding_window, logit_softcap)
    call = relax.call_dps_packed(
        ATTENTION_SYMBOL,
        [
            qkv._expr,
            relax.prim_value(layer_id),
            relax.prim_value(num_q_heads),
            relax.prim_value(num_kv_heads),
            relax.prim_value(float(sm_scale)),
            tvm.ir.StringImm("null" if rope is None else rope.to_json()),
            relax.prim_value(int(sliding_window)),
            relax.prim_value(float(logit_softcap)),
            relax.prim_value(int(bidirectional)),
        ],
        out_ty=relax.TensorType((b, s, num_q_heads, d), qkv.dtype),
    )
    return nn.wrap_nested(call, name=f"attention_{layer_id}")


def query_positions(input_ids: nn.Tensor) -> nn.Tensor:
    """Each token's position in its sequence, [batch, seq] int32, for `input_ids` [batch, seq]."""
    b, s = input_ids.shape
    call = relax.call_dps_packed(
        POSITIONS_SYMBOL, [input_ids._expr], out_ty=relax.TensorType((b, s), "int32")
    )
    return nn.wrap_nested(call, name="positions")


def is_attention_call(expr: relax.Expr) -> bool:
    """Whether `expr` is a `relaxlm.attention` call emitted by `attention`."""
    return _is_call_to(expr, ATTENTION_SYMBOL)


def is_positions_call(expr: relax.Expr) -> bool:
    """Whether `expr` is a `relaxlm.query_positions` call emitted by `query_positions`."""
    return _is_call_to(expr, POSITIONS_SYMBOL)


def read_attention_call(call: relax.Call) -> AttentionCall:
    """The attributes `attention` put on `call` (the qkv tensor is `call.args[1][0]`)."""
    qkv, layer_id, num_q, num_kv, sm_scale, rope, window, softcap, bidirectional = call.args[
        1
    ].fields
    return AttentionCall(
        layer_id=int(_prim(layer_id)),
        num_q_heads=int(_prim(num_q)),
        num_kv_heads=int(_prim(num_kv)),
        head_dim=int(qkv.ty.shape[3]),
        sm_scale=float(_prim(sm_scale)),
        rope=RopeSpec.from_json(str(rope.value)),
        sliding_window=int(_prim(window)),
        logit_softcap=float(_prim(softcap)),
        bidirectional=bool(_prim(bidirectional)),
    )


def _is_call_to(expr: relax.Expr, symbol: str) -> bool:
    return (
        isinstance(expr, relax.Call)
        and expr.op.same_as(tvm.ir.Op.get("relax.call_dps_packed"))
        and isinstance(expr.args[0], relax.ExternFunc)
        and expr.args[0].global_symbol == symbol
    )


def _prim(value: relax.Expr) -> float:
    # 0.27 returns IntImm/FloatImm for prim values; older builds wrapped them in PrimValue.
    v = value.value
    return v if isinstance(v, int | float) else v.value
