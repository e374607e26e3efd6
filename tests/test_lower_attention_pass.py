"""LowerAttentionToPagedKV: before/after IR, and paged-KV runs against a float64 numpy reference."""

import math

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime import ShapeTuple

from relaxlm.compiler.lower_attention_to_paged_kv import (
    CACHE_PARAM,
    CREATE_FUNCTION,
    LowerAttentionToPagedKV,
    paged_kv_layout,
)
from relaxlm.frontends.ops import RopeSpec, attention, is_attention_call

HIDDEN = 32
TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that positions 0..11 already reach the scaled and the smoothed bands.
    "original_max_position_embeddings": 64,
}


class _Layer(nn.Module):
    def __init__(self, layer_id, num_q_heads, num_kv_heads, head_dim, sm_scale, rope):
        self.layer_id, self.hq, self.hkv, self.d = layer_id, num_q_heads, num_kv_heads, head_dim
        self.sm_scale, self.rope = sm_scale, rope
        self.qkv_proj = nn.Linear(HIDDEN, (num_q_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(num_q_heads * head_dim, HIDDEN, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        qkv = nn.op.reshape(self.qkv_proj(x), (b, s, self.hq + 2 * self.hkv, self.d))
        out = attention(
            qkv,
            layer_id=self.layer_id,
            num_q_heads=self.hq,
            num_kv_heads=self.hkv,
            sm_scale=self.sm_scale,
            rope=self.rope,
        )  # [b, s, hq, d]
        return x + self.o_proj(nn.op.reshape(out, (b, s, self.hq * self.d)))


class _TinyModel(nn.Module):
    def __init__(self, layers: list[_Layer]):
        self.layers = nn.ModuleList(layers)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def double(self, x: nn.Tensor) -> nn.Tensor:
        return x * 2.0  # no attention: the pass must leave it alone


def _export(layers: list[_Layer]) -> tuple[tvm.IRModule, list[str]]:
    packed = {"param_mode": "packed", "effect_mode": "none"}
    x = nn.spec.Tensor([1, "num_tokens", HIDDEN], "float32")
    mod, named = _TinyModel(layers).export_tvm(
        spec={"forward": {"x": x, "$": packed}, "double": {"x": x, "$": packed}}
    )
    return mod, [name for name, _ in named]


def _gqa_layers(rope: RopeSpec, sm_scale: float = 0.25) -> list[_Layer]:
    return [_Layer(i, 4, 2, 16, sm_scale, rope) for i in range(2)]


def _attention_calls(func: relax.Function) -> list[relax.Call]:
    found = []

    def visit(expr: relax.Expr) -> None:
        if is_attention_call(expr):
            found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def test_rewrites_signature_and_calls():
    mod, _ = _export(_gqa_layers(RopeSpec()))
    assert len(_attention_calls(mod["forward"])) == 2
    assert int(mod["forward"].attrs["num_input"]) == 1

    after = LowerAttentionToPagedKV(tvm.target.Target(TARGET), "float32")(mod)

    forward = after["forward"]
    assert [p.name for p in forward.params] == ["x", CACHE_PARAM, "packed_params"]
    assert isinstance(forward.params[1].ty, relax.ObjectType)
    assert int(forward.attrs["num_input"]) == 2
    assert not _attention_calls(forward)
    assert "vm.builtin.attention_kv_cache_attention_with_fused_qkv" in forward.script()
    tvm.ir.assert_structural_equal(after["double"], mod["double"])
    assert len(after[CREATE_FUNCTION].params) == 5
    assert paged_kv_layout(after) == {
        "num_layers": 2,
        "num_q_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "sm_scale": 0.25,
        "dtype": "float32",
        "rope": {"theta": 10000.0, "rotary_dim": 0, "scale": 1.0, "scaling": {}},
    }


def test_module_without_attention_is_unchanged():
    mod, _ = _export([])
    after = LowerAttentionToPagedKV(tvm.target.Target(TARGET), "float32")(mod)
    tvm.ir.assert_structural_equal(after, mod)


@pytest.mark.parametrize(
    "layer1, field",
    [
        (_Layer(1, 4, 1, 16, 0.25, RopeSpec()), "num_kv_heads"),
        (_Layer(1, 4, 2, 16, 0.3, RopeSpec()), "sm_scale"),
        (_Layer(1, 4, 2, 16, 0.25, RopeSpec(theta=500000.0)), "rope"),
    ],
)
def test_mismatched_layers_raise(layer1, field):
    mod, _ = _export([_Layer(0, 4, 2, 16, 0.25, RopeSpec()), layer1])
    with pytest.raises(ValueError, match=f"layer 1 .*{field}"):
        LowerAttentionToPagedKV(tvm.target.Target(TARGET), "float32")(mod)


def test_dtype_mismatch_raises():
    mod, _ = _export(_gqa_layers(RopeSpec()))
    with pytest.raises(ValueError, match="layer 0 .*dtype"):
        LowerAttentionToPagedKV(tvm.target.Target(TARGET), "float16")(mod)


def _inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Hugging Face's inverse frequencies (default, linear and llama3 rope types)."""
    rd = rope.rotary_dim or head_dim
    inv_freq = 1.0 / rope.theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    if rope.scaling.get("rope_type") == "llama3":
        s = rope.scaling
        old_len = s["original_max_position_embeddings"]
        low_wavelen = old_len / s["low_freq_factor"]
        high_wavelen = old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq / rope.scale  # linear scaling divides the positions


def _rope(x: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """Rotate-half RoPE on x [seq, heads, head_dim] at positions 0..seq-1."""
    n, _, d = x.shape
    rd = rope.rotary_dim or d
    angles = np.outer(np.arange(n), _inv_freq(rope, d))  # [seq, rd/2]
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]  # [seq, 1, rd]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
    rot, rest = x[..., :rd], x[..., rd:]
    half = np.concatenate([-rot[..., rd // 2 :], rot[..., : rd // 2]], -1)
    return np.concatenate([rot * cos + half * sin, rest], -1)


def _reference(x: np.ndarray, weights: dict[str, np.ndarray], layers: list[_Layer]) -> np.ndarray:
    """The model on x [seq, hidden] in float64: causal GQA attention with RoPE."""
    h = x.astype(np.float64)
    n = len(h)
    causal = np.tril(np.ones((n, n), dtype=bool))
    for i, layer in enumerate(layers):
        hq, hkv, d = layer.hq, layer.hkv, layer.d
        qkv = (h @ weights[f"layers.{i}.qkv_proj.weight"].T).reshape(n, hq + 2 * hkv, d)
        q = _rope(qkv[:, :hq], layer.rope)
        k = _rope(qkv[:, hq : hq + hkv], layer.rope)
        v = qkv[:, hq + hkv :]
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)  # [n, hq, d]
        scores = np.einsum("qhd,khd->hqk", q, k) * layer.sm_scale
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, hq * d)
        h = h + out @ weights[f"layers.{i}.o_proj.weight"].T
    return h


@pytest.mark.parametrize(
    "rope, sm_scale",
    [
        (RopeSpec(theta=10000.0), 0.25),
        (RopeSpec(theta=10000.0, scaling=LLAMA3), 0.25),
        (RopeSpec(theta=10000.0, scale=2.0), 0.25),
        (RopeSpec(theta=1000.0, rotary_dim=8), 0.4),  # partial rotary, non-default scale
    ],
    ids=["default", "llama3", "linear2", "partial-rotary"],
)
def test_paged_kv_matches_numpy(rope, sm_scale):
    layers = _gqa_layers(rope, sm_scale)
    mod, names = _export(layers)
    target = tvm.target.Target(TARGET)
    mod = LowerAttentionToPagedKV(target, "float32")(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())

    rng = np.random.default_rng(0)
    shapes = {name: [int(v) for v in p.shape] for name, p in _TinyModel(layers).named_parameters()}
    # 1/sqrt(fan_in) keeps activations O(1), so float32 rounding stays near 1e-6.
    weights = {n: rng.standard_normal(shapes[n]) / math.sqrt(shapes[n][1]) for n in names}
    params = [tvm.runtime.tensor(weights[name].astype(np.float32), tvm.cpu()) for name in names]
    x = rng.standard_normal((12, HIDDEN)).astype(np.float32)
    expected = _reference(x, weights, layers)

    # max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
    kv = vm[CREATE_FUNCTION](*(ShapeTuple([v]) for v in (1, 64, 16, 16, 0)))
    add_sequence = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
    begin_forward = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end_forward = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    add_sequence(kv, 0)
    start = 0
    # A prefill, three decode steps, then a second chunk on the non-empty cache.
    for length in (5, 1, 1, 1, 4):
        begin_forward(kv, ShapeTuple([0]), ShapeTuple([length]))
        chunk = tvm.runtime.tensor(x[None, start : start + length], tvm.cpu())
        got = vm["forward"](chunk, kv, params).numpy()[0]  # [length, hidden]
        end_forward(kv)
        np.testing.assert_allclose(got, expected[start : start + length], rtol=0, atol=1e-5)
        start += length
