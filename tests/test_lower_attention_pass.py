"""lower_attention_to_paged_kv: before/after IR, and paged-KV runs against a float64 numpy
reference."""

import math

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime import ShapeTuple

from relaxlm.compiler import attention_kernels as ak
from relaxlm.compiler.lower_attention_to_paged_kv import (
    CACHE_PARAM,
    CREATE_FUNCTION,
    lower_attention_to_paged_kv,
)
from relaxlm.errors import RelaxlmError
from relaxlm.frontends.ops import RopeSpec, attention, is_attention_call, query_positions

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
# Phi-3 LongRoPE over a rotary dim of 8: positions >= 8 switch to the long table.
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.2, 1.5, 2.0],
    "long_factor": [1.5, 2.5, 4.0, 8.0],
    "original_max_position_embeddings": 8,
    "attention_factor": 1.2,
}


class _Layer(nn.Module):
    def __init__(
        self, layer_id, num_q_heads, num_kv_heads, head_dim, sm_scale, rope, window=0, softcap=0.0
    ):
        self.layer_id, self.hq, self.hkv, self.d = layer_id, num_q_heads, num_kv_heads, head_dim
        self.sm_scale, self.rope, self.window, self.softcap = sm_scale, rope, window, softcap
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
            sliding_window=self.window,
            logit_softcap=self.softcap,
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

    after, cache = lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float32")

    forward = after["forward"]
    assert [p.name for p in forward.params] == ["x", CACHE_PARAM, "packed_params"]
    assert isinstance(forward.params[1].ty, relax.ObjectType)
    assert int(forward.attrs["num_input"]) == 2
    assert not _attention_calls(forward)
    assert "vm.builtin.attention_kv_cache_attention_with_fused_qkv" in forward.script()
    tvm.ir.assert_structural_equal(after["double"], mod["double"])
    assert len(after[CREATE_FUNCTION].params) == 5
    assert cache.to_manifest() == {
        "num_layers": 2,
        "num_q_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "sm_scale": 0.25,
        "dtype": "float32",
        "rope": {"theta": 10000.0, "rotary_dim": 0, "scale": 1.0, "scaling": {}},
        "rope_in_graph": False,
        "sliding_windows": [0, 0],
        "logit_softcap": 0.0,
        "max_prefill_chunk": None,
        "page_dtype": "float32",
        "quant": None,
        "bytes_per_token": 2 * 2 * 2 * 16 * 4,  # layers x (K, V) x kv heads x head_dim x 4 bytes
    }


def test_module_without_attention_is_unchanged():
    mod, _ = _export([])
    after, _ = lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float32")
    tvm.ir.assert_structural_equal(after, mod)


@pytest.mark.parametrize(
    "layer1, field",
    [
        (_Layer(1, 4, 1, 16, 0.25, RopeSpec()), "num_kv_heads"),
        (_Layer(1, 4, 2, 16, 0.3, RopeSpec()), "sm_scale"),
        (_Layer(1, 4, 2, 16, 0.25, RopeSpec(), softcap=30.0), "logit_softcap"),
    ],
)
def test_mismatched_layers_raise(layer1, field):
    mod, _ = _export([_Layer(0, 4, 2, 16, 0.25, RopeSpec()), layer1])
    with pytest.raises(ValueError, match=f"layer 1 .*{field}"):
        lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float32")


def test_two_window_sizes_raise():
    mod, _ = _export([_Layer(i, 4, 2, 16, 0.25, RopeSpec(), window=4 + i) for i in range(2)])
    with pytest.raises(RelaxlmError, match=r"sliding windows \[4, 5\]"):
        lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float32")


@pytest.mark.parametrize("window, softcap", [(4, 0.0), (0, 30.0)], ids=["window", "softcap"])
def test_windows_and_softcap_on_a_gpu_target_get_relaxlm_gpu_kernels(window, softcap):
    """TVM's GPU kernels can neither cap scores nor mask a window outside the paged prefill:
    on CUDA the cache's attention kernels are relaxlm's GPU ones (tests/test_attention_kernels.py
    runs them on WebGPU), not a refusal."""
    layers = [_Layer(i, 4, 2, 16, 0.25, RopeSpec(), window=window, softcap=softcap) for i in (0, 1)]
    mod, _ = _export(layers)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    lowered, _ = lower_attention_to_paged_kv(mod, target, "float32")
    funcs = {gv.name_hint: lowered[gv] for gv in lowered.get_global_vars()}
    shape, masks = (2, 4, 16, "float32"), {"window": window, "softcap": softcap, "gpu": True}
    expected = {
        "tir_attention_prefill_ragged": ak.ragged_prefill(*shape, **masks),
        "tir_attention_prefill": ak.paged_prefill(*shape, sliding_table=False, **masks),
        "tir_attention_decode": ak.paged_decode(*shape, sliding_table=False, **masks),
    }
    for name, kernel in expected.items():
        got = funcs[name]
        kernel = kernel.with_attr("global_symbol", got.attrs["global_symbol"])
        tvm.ir.assert_structural_equal(got, kernel)


def test_layout_records_per_layer_features():
    layers = [
        _Layer(0, 4, 2, 16, 0.25, RopeSpec(theta=10000.0), window=4, softcap=5.0),
        _Layer(1, 4, 2, 16, 0.25, RopeSpec(theta=1e6), softcap=5.0),
    ]
    mod, _ = _export(layers)
    _, cache = lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float32")
    layout = cache.to_manifest()
    assert layout["rope"] is None and layout["rope_in_graph"]
    assert layout["sliding_windows"] == [4, 0]
    assert layout["logit_softcap"] == 5.0
    assert layout["max_prefill_chunk"] == 4


def test_dtype_mismatch_raises():
    mod, _ = _export(_gqa_layers(RopeSpec()))
    with pytest.raises(ValueError, match="layer 0 .*dtype"):
        lower_attention_to_paged_kv(mod, tvm.target.Target(TARGET), "float16")


def _inv_freq(rope: RopeSpec, head_dim: int, position: int) -> np.ndarray:
    """Hugging Face's inverse frequencies (default, linear, llama3 and longrope types)."""
    rd = rope.rotary_dim or head_dim
    exponents = np.arange(0, rd, 2, dtype=np.float64) / rd
    if rope.scaling.get("rope_type") == "longrope":
        s = rope.scaling
        # relaxlm's per-token table choice (transformers: per forward call; equal token by token)
        long = position + 1 > s["original_max_position_embeddings"]
        factors = np.array(s["long_factor"] if long else s["short_factor"])
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / rope.theta**exponents
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


def _rope(x: np.ndarray, rope: RopeSpec | None) -> np.ndarray:
    """Rotate-half RoPE on x [seq, heads, head_dim] at positions 0..seq-1."""
    if rope is None:
        return x
    n, _, d = x.shape
    rd = rope.rotary_dim or d
    angles = np.stack([p * _inv_freq(rope, d, p) for p in range(n)])  # [seq, rd/2]
    factor = rope.scaling.get("attention_factor", 1.0)
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :] * factor  # [seq, 1, rd]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :] * factor
    rot, rest = x[..., :rd], x[..., rd:]
    half = np.concatenate([-rot[..., rd // 2 :], rot[..., : rd // 2]], -1)
    return np.concatenate([rot * cos + half * sin, rest], -1)


def _reference(x: np.ndarray, weights: dict[str, np.ndarray], layers: list[_Layer]) -> np.ndarray:
    """The model on one sequence x [seq, hidden] in float64: causal GQA attention with RoPE."""
    h = x.astype(np.float64)
    n = len(h)
    rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
    for i, layer in enumerate(layers):
        visible = (cols <= rows) & ((cols > rows - layer.window) if layer.window else True)
        hq, hkv, d = layer.hq, layer.hkv, layer.d
        qkv = (h @ weights[f"layers.{i}.qkv_proj.weight"].T).reshape(n, hq + 2 * hkv, d)
        q = _rope(qkv[:, :hq], layer.rope)
        k = _rope(qkv[:, hq : hq + hkv], layer.rope)
        v = qkv[:, hq + hkv :]
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)  # [n, hq, d]
        scores = np.einsum("qhd,khd->hqk", q, k) * layer.sm_scale
        if layer.softcap:
            scores = layer.softcap * np.tanh(scores / layer.softcap)
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, hq * d)
        h = h + out @ weights[f"layers.{i}.o_proj.weight"].T
    return h


_kv = {
    name: tvm.get_global_func(f"vm.builtin.{name}")
    for name in ("kv_state_add_sequence", "kv_state_begin_forward", "kv_state_end_forward")
}


def _compile(model: nn.Module, spec: dict) -> tuple[relax.VirtualMachine, list]:
    """The paged-KV-lowered model's VM and random weights (1/sqrt(fan_in) keeps them O(1))."""
    mod, named = model.export_tvm(spec=spec)
    target = tvm.target.Target(TARGET)
    mod, _ = lower_attention_to_paged_kv(mod, target, "float32")
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(p.shape) / math.sqrt(int(p.shape[1])) for name, p in named}
    return vm, weights


def _run(vm, steps, inputs, forward):
    """Run `steps` (each a list of (sequence, new tokens)) over one cache.

    Returns each sequence's outputs in token order. `inputs[seq]` holds the sequence's tokens;
    `forward(chunk [1, n, ...])` maps a step's tokens to outputs [n, ...].
    """
    # max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
    kv = vm[CREATE_FUNCTION](*(ShapeTuple([v]) for v in (4, 256, 32, 16, 0)))
    for seq in inputs:
        _kv["kv_state_add_sequence"](kv, seq)
    done = {seq: 0 for seq in inputs}
    outputs = {seq: [] for seq in inputs}
    for step in steps:
        ids, lengths = [seq for seq, _ in step], [n for _, n in step]
        chunk = np.concatenate([inputs[seq][done[seq] : done[seq] + n] for seq, n in step])
        _kv["kv_state_begin_forward"](kv, ShapeTuple(ids), ShapeTuple(lengths))
        got = forward(kv, tvm.runtime.tensor(chunk[None], tvm.cpu()))
        _kv["kv_state_end_forward"](kv)
        start = 0
        for seq, n in step:
            outputs[seq].append(got[start : start + n])
            done[seq] += n
            start += n
    return {seq: np.concatenate(out) for seq, out in outputs.items()}


# Two sequences: prefills, batched decode steps across a page boundary, a second chunk, and a
# step that mixes a chunk with a decode. No sequence adds more than 4 tokens in one step.
STEPS = [[(0, 4)], [(1, 3)], *[[(0, 1), (1, 1)]] * 12, [(0, 4)], [(1, 2), (0, 1)]]


@pytest.mark.parametrize(
    "layers",
    [
        [_Layer(i, 4, 2, 16, 0.25, RopeSpec(theta=10000.0)) for i in range(2)],
        [_Layer(i, 4, 2, 16, 0.25, RopeSpec(theta=10000.0, scaling=LLAMA3)) for i in range(2)],
        [_Layer(i, 4, 2, 16, 0.25, RopeSpec(theta=10000.0, scale=2.0)) for i in range(2)],
        # partial rotary, non-default scale
        [_Layer(i, 4, 2, 16, 0.4, RopeSpec(theta=1000.0, rotary_dim=8)) for i in range(2)],
        # per-layer bases (Gemma 3): RoPE in the graph
        [
            _Layer(0, 4, 2, 16, 0.25, RopeSpec(theta=10000.0)),
            _Layer(1, 4, 2, 16, 0.25, RopeSpec(theta=1e6, scale=4.0)),
        ],
        [_Layer(i, 4, 2, 16, 0.25, None) for i in range(2)],  # no RoPE (GPT-2)
        [
            _Layer(i, 4, 2, 16, 0.25, RopeSpec(theta=100.0, rotary_dim=8, scaling=LONGROPE))
            for i in range(2)
        ],
        [_Layer(i, 4, 2, 16, 0.25, RopeSpec(), window=5) for i in range(2)],  # Mistral
        [_Layer(i, 4, 2, 16, 0.25, RopeSpec(), softcap=1.0) for i in range(2)],
        # Gemma 2/3: windows on alternate layers, soft-capping, per-layer RoPE
        [
            _Layer(0, 4, 2, 16, 0.25, RopeSpec(theta=10000.0), window=4, softcap=2.0),
            _Layer(1, 4, 2, 16, 0.25, RopeSpec(theta=1e6), softcap=2.0),
            _Layer(2, 4, 2, 16, 0.25, RopeSpec(theta=10000.0), window=4, softcap=2.0),
        ],
    ],
    ids=[
        "default",
        "llama3",
        "linear2",
        "partial-rotary",
        "per-layer-rope",
        "no-rope",
        "longrope",
        "window-all-layers",
        "softcap",
        "window-some-layers",
    ],
)
def test_paged_kv_matches_numpy(layers):
    x = nn.spec.Tensor([1, "num_tokens", HIDDEN], "float32")
    packed = {"param_mode": "packed", "effect_mode": "none"}
    vm, weights = _compile(_TinyModel(layers), {"forward": {"x": x, "$": packed}})
    params = [tvm.runtime.tensor(w.astype(np.float32), tvm.cpu()) for w in weights.values()]
    rng = np.random.default_rng(1)
    inputs = {seq: rng.standard_normal((24, HIDDEN)).astype(np.float32) for seq in (0, 1)}
    got = _run(vm, STEPS, inputs, lambda kv, c: vm["forward"](c, kv, params).numpy()[0])
    for seq, out in got.items():
        expected = _reference(inputs[seq][: len(out)], weights, layers)
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5, err_msg=f"sequence {seq}")


def test_chunk_longer_than_a_per_layer_window_raises():
    layers = [
        _Layer(0, 4, 2, 16, 0.25, RopeSpec(), window=4),
        _Layer(1, 4, 2, 16, 0.25, RopeSpec()),
    ]
    x = nn.spec.Tensor([1, "num_tokens", HIDDEN], "float32")
    packed = {"param_mode": "packed", "effect_mode": "none"}
    vm, weights = _compile(_TinyModel(layers), {"forward": {"x": x, "$": packed}})
    params = [tvm.runtime.tensor(w.astype(np.float32), tvm.cpu()) for w in weights.values()]
    inputs = {0: np.zeros((5, HIDDEN), np.float32)}
    with pytest.raises(RuntimeError, match="new tokens in one forward than its sliding window"):
        _run(vm, [[(0, 5)]], inputs, lambda kv, c: vm["forward"](c, kv, params).numpy()[0])


class _PositionsModel(nn.Module):
    def __init__(self):
        self.layer = _Layer(0, 4, 2, 16, 0.25, RopeSpec())

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        ids = nn.op.zeros((b, s), "int32")
        positions = query_positions(ids).astype("float32")  # [b, s]
        return self.layer(x) * 0.0 + nn.op.unsqueeze(positions, -1)


def test_query_positions_come_from_the_cache():
    x = nn.spec.Tensor([1, "num_tokens", HIDDEN], "float32")
    packed = {"param_mode": "packed", "effect_mode": "none"}
    vm, weights = _compile(_PositionsModel(), {"forward": {"x": x, "$": packed}})
    params = [tvm.runtime.tensor(w.astype(np.float32), tvm.cpu()) for w in weights.values()]
    inputs = {seq: np.zeros((8, HIDDEN), np.float32) for seq in (0, 1)}
    steps = [[(0, 3)], [(1, 2), (0, 1)], [(0, 1), (1, 1)]]
    got = _run(vm, steps, inputs, lambda kv, c: vm["forward"](c, kv, params).numpy()[0])
    assert got[0][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert got[1][:, 0].tolist() == [0, 1, 2]
