"""Quantization: the numpy reference, the two passes on a small hand-made graph, and whole
models whose logits must equal a float model built from the dequantized weights."""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from safetensors.numpy import load_file, save_file
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime.vm import VirtualMachine

import relaxlm
from relaxlm.compiler import schedules
from relaxlm.compiler.fuse_dequantize_matmul import FuseDequantizeMatmul
from relaxlm.compiler.int8_dot import PIECES, has_int8_dot, int8_dot_flavour
from relaxlm.compiler.pipeline import scheme_for_targets
from relaxlm.compiler.quantization import (
    A8_REPACKS,
    GGUF_SCHEMES,
    SCHEMES,
    dequantize,
    dequantize_gguf,
    flat_scales,
    group_scales,
    quantize,
    repack_gguf,
    row_tiled,
    tied_table_scheme,
)
from relaxlm.compiler.quantize_weights import quantize_weights
from relaxlm.compiler.targets import resolve_target, resolve_targets

INT_SCHEMES = ["q8", "q4", "q4-a8", "q4-asym"]
ALL_SCHEMES = [*INT_SCHEMES, "float16", "bfloat16"]
# Weight-only schemes: exact against their dequantized weights on every target.
WEIGHT_ONLY = [s for s in ALL_SCHEMES if not SCHEMES[s].activations]
INT8_DOT = has_int8_dot(resolve_target("cpu").target())  # x86 with AVX2 or later


# q4 and q8 as stored for CPUs with an int8 dot product (row tiles)
TILED = {f"{name}-tiled": row_tiled(SCHEMES[name]) for name in ("q4", "q8")}
# GGUF's Q6_K repacked with its scales multiplied out: int8 codes, a float32 scale per 16
# (quantize() packs floats so too; the repack keeps int8 scales and a float16 d per 256)
Q6_K_A8 = flat_scales(A8_REPACKS["Q6_K"])


@pytest.mark.parametrize("name", [*ALL_SCHEMES, *TILED, Q6_K_A8.name])
def test_pack_unpack_within_the_scheme_bound(name):
    scheme = SCHEMES.get(name) or TILED.get(name) or Q6_K_A8
    rng = np.random.default_rng(0)
    # K not a multiple of the group; N a multiple of q4-a8's row tile (16) or not
    for n, k in [(3, 32), (5, 100), (2, 129), (7, 300), (1, 1), (16, 100), (48, 64)]:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 10)).astype(np.float32)
        parts = quantize(scheme, w, np.float32)
        assert [p.shape for p in parts] == list(scheme.part_shapes(n, k).values())
        back = dequantize(scheme, parts, k)
        assert back.shape == w.shape
        if scheme.kind == "cast":
            np.testing.assert_allclose(back, w, rtol=2**-7, atol=0)
            continue
        # Rounding to the nearest level: at most half a step (the group's scale) off.
        scales = group_scales(scheme, parts).astype(np.float32)
        scale = np.abs(np.repeat(scales, scheme.group_size, axis=1)[:, :k])
        assert np.all(np.abs(back - w) <= scale / 2 + 1e-6)


class _TwoLinears(nn.Module):
    """Not a frontend model: an embedding, two linears with a bias between, any K."""

    def __init__(self):
        self.embed = nn.Embedding(50, 96)
        self.up = nn.Linear(96, 70, bias=True)
        self.down = nn.Linear(70, 40, bias=False)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return self.down(nn.op.silu(self.up(self.embed(ids))))


def _export():
    spec = {
        "forward": {
            "ids": nn.spec.Tensor([1, "n"], "int32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, params = _TwoLinears().export_tvm(spec)
    return mod, [name for name, _ in params], {name: p.shape for name, p in params}


def _calls(mod, prefix: str) -> int:
    text = mod.script(show_meta=False)
    return text.count(f"cls.{prefix}")


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_passes_on_a_graph_from_no_frontend(name):
    scheme = SCHEMES[name]
    mod, names, shapes = _export()
    quantized, plan = quantize_weights(mod, scheme, "float32")
    # The embedding (read by take) and the bias stay; both linear weights become parts.
    sources = {names[e.source] for e in plan if e.part not in ("",) or scheme.kind == "cast"}
    assert {"up.weight", "down.weight"} <= {
        names[e.source] for e in plan if e.dtype != "float32" or e.part
    }
    assert all(
        names[e.source] in ("embed.weight", "up.bias")
        for e in plan
        if e.part == "" and e.dtype == "float32"
    )
    assert sources
    assert _calls(quantized, "dequantize") == 2
    fused = FuseDequantizeMatmul()(quantized)
    assert (
        _calls(fused, "dequantize_" + name.replace("-", "_") + "(") == 0
    )  # no bare dequantize left
    assert "NT_matmul" in fused.script(show_meta=False)

    # Numerics: the fused kernels equal numpy with the dequantized weights.
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    packed, deq = [], dict(weights)
    entries = iter(plan)
    for entry in entries:
        source = names[entry.source]
        if entry.part == "" and scheme.kind != "cast" or entry.dtype == "float32":
            packed.append(weights[source])
            continue
        parts = quantize(scheme, weights[source], np.float32)
        for _ in parts[1:]:
            next(entries)
        packed += parts
        deq[source] = dequantize(scheme, parts, shapes[source][1])
    vm = _cpu_vm(fused)
    ids = np.array([[3, 17, 42, 7, 0]], dtype="int32")
    out = vm["forward"](
        tvm.runtime.tensor(ids), [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in packed]
    ).numpy()
    h = deq["embed.weight"][ids[0]]
    h = h @ deq["up.weight"].T + deq["up.bias"]
    ref = (h / (1 + np.exp(-h))) @ deq["down.weight"].T
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _cpu_vm(mod: tvm.IRModule, target: str = "cpu") -> VirtualMachine:
    """`mod` after the quantization passes, lowered, scheduled and built for `target` (a CPU
    this one can run the code of)."""
    return VirtualMachine(_cpu_build(mod, target), tvm.cpu())


def _cpu_build(mod: tvm.IRModule, target: str) -> tvm.runtime.Executable:
    preset = resolve_target(target)
    lowered = tvm.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(mod)
    with preset.target():
        lowered = schedules.for_target(preset)(lowered)
    ex = relax.build(
        lowered, target=preset.target(), relax_pipeline=relax.pipeline.default_build_pipeline()
    )
    return ex


def _dequantized_checkpoint(src, dst, scheme_name):
    """A float32 copy of `src` whose linear weights are replaced by their dequantized values
    (the embedding table too where it is the lm_head's: quantize_weights packs a tied table)."""
    scheme = SCHEMES[scheme_name]
    shutil.copytree(src, dst)
    tied = json.loads((dst / "config.json").read_text()).get("tie_word_embeddings", False)
    weights = load_file(dst / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2 and (tied or "embed" not in name) and "norm" not in name:
            table = scheme if "embed" not in name else tied_table_scheme(scheme)
            weights[name] = dequantize(table, quantize(table, w, np.float32), w.shape[1])
    save_file(weights, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_quantized_model_equals_float_model_with_dequantized_weights(name, checkpoints, tmp_path):
    src = checkpoints("llama_gqa")
    quantized = relaxlm.LLM(str(src), quant=name)
    manifest = quantized.manifest.quantization
    assert manifest["scheme"] == name
    if name in ("q4", "q8") and INT8_DOT:  # the int8 dot kernels, integer activations
        assert manifest["activations"] == row_tiled(SCHEMES[name]).activations
        assert manifest["row_tile"] == 16
    reference = relaxlm.LLM(str(_dequantized_checkpoint(src, tmp_path / "deq", name)))
    ids = [1] + np.random.default_rng(3).integers(5, 400, 23).tolist()
    ours = quantized.score(ids, prefill=12)
    ref = reference.score(ids, prefill=12)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"relative error {rel}"


def test_tied_lm_head_is_packed_and_equals_float_model_with_dequantized_table(
    checkpoints, tmp_path
):
    """A table read both by the embedding gather and by the tied lm_head's matmul is stored
    in the scheme (it was once kept float32: the largest matmul of a small model's decode
    step), and both reads equal a float model whose table is the dequantized one."""
    src = checkpoints("llama_tied_llama3_rope")
    quantized = relaxlm.LLM(str(src), quant="q4")
    params = {p["name"]: p for p in quantized.manifest.params}
    vocab, hidden = quantized.manifest.vocab_size, quantized.manifest.model_config["hidden_size"]
    assert "model.embed_tokens.weight" not in params and "lm_head.weight.q" not in params
    # in 8 bits where the scheme has 4, as llama.cpp keeps it (tied_table_scheme)
    table = quantized.manifest.quantization["tied_table"]
    assert table["weight"] == "model.embed_tokens.weight" and table["bits"] == 8
    assert params["model.embed_tokens.weight.q"]["shape"] == [vocab, hidden]  # int8 codes
    assert params["model.embed_tokens.weight.scale"]["shape"] == [vocab, hidden // 32]
    reference = relaxlm.LLM(str(_dequantized_checkpoint(src, tmp_path / "deq", "q4")))
    ids = [1] + np.random.default_rng(6).integers(5, 400, 23).tolist()
    ours = quantized.score(ids, prefill=12)
    ref = reference.score(ids, prefill=12)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"relative error {rel}"


def test_q8_logits_close_to_float32(compiled, checkpoints):
    ids = [1] + np.random.default_rng(4).integers(5, 400, 23).tolist()
    ref = compiled("llama_gqa").score(ids, prefill=12)
    ours = relaxlm.LLM(str(checkpoints("llama_gqa")), quant="q8").score(ids, prefill=12)
    # Over all 13 rows of logits together; the fixture's weights double activations at every
    # linear layer (to expose kernel bugs), which amplifies rounding more than trained weights.
    cos = float((ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert cos >= 0.999, cos
    rows = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert rows.min() >= 0.998, rows


def test_manifest_records_the_scheme(checkpoints, tmp_path):
    out = relaxlm.compile(
        str(checkpoints("llama_gqa")), output=tmp_path / "a", quant="q4", progress=False
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["group_size"] == 32 and manifest["quantization"]["bits"] == 4
    names = [p["name"] for p in manifest["params"]]
    assert (
        "model.layers.0.mlp.down_proj.weight.q" in names
        and "model.layers.0.mlp.down_proj.weight.scale" in names
    )
    # gate and up read the same input: fuse_parallel_linear stores their rows as one weight
    assert "model.layers.0.mlp.gate_proj+up_proj.weight.q" in names
    assert "model.embed_tokens.weight" in names  # the embedding table is read by take: kept


def test_q4_layout_follows_the_targets(checkpoints, tmp_path):
    """q4 is stored in row tiles (int8 dot kernels) only where every target is a CPU that has
    them; GPUs keep the interleaved layout; `--add` keeps the layout of the artifact."""
    q4, cpu, cuda = SCHEMES["q4"], resolve_targets("cpu"), resolve_targets("cuda")
    tiled = row_tiled(q4)
    assert tiled.row_tile == 16 and tiled.activations == "int22"
    assert scheme_for_targets(q4, cpu, "float32", None) == (tiled if INT8_DOT else q4)
    assert scheme_for_targets(q4, cpu + cuda, "float32", None) == q4
    assert scheme_for_targets(q4, cpu, "float16", None) == q4  # the kernels take float32 x
    assert scheme_for_targets(SCHEMES["q8"], cpu, "float32", None) == (
        TILED["q8-tiled"] if INT8_DOT else SCHEMES["q8"]
    )
    assert scheme_for_targets(SCHEMES["q4-asym"], cpu, "float32", None) == SCHEMES["q4-asym"]
    assert scheme_for_targets(None, cpu, "float32", None) is None
    out = relaxlm.compile(
        str(checkpoints("llama_gqa")), output=tmp_path / "a", quant="q4", progress=False
    )
    assert scheme_for_targets(q4, cuda, "float32", out) == (tiled if INT8_DOT else q4)


def test_unknown_scheme_is_refused(checkpoints, tmp_path):
    with pytest.raises(relaxlm.RelaxlmError, match="q3"):
        relaxlm.compile(str(checkpoints("llama_gqa")), output=tmp_path / "a", quant="q3")


def _int_activations(x: np.ndarray, levels: int = 127) -> np.ndarray:
    """x with each group of 32 along the last axis rounded to integer codes of scale
    max|x| / levels (zero-padded to whole groups), as int8_dot.py computes them; numpy,
    float32."""
    k = x.shape[-1]
    padded = np.pad(x.astype(np.float32), [(0, 0)] * (x.ndim - 1) + [(0, -k % 32)])
    groups = padded.reshape(*x.shape[:-1], -1, 32)
    scale = np.abs(groups).max(-1, keepdims=True) / np.float32(levels)
    codes = np.rint(groups / np.where(scale > 0, scale, 1))
    return (codes * scale).reshape(padded.shape)[..., :k]


def _linear_vm(n: int, k: int, scheme, target: str = "cpu"):
    """y = x @ W.T for x [1, m, k] through quantize_weights and FuseDequantizeMatmul with the
    int8 dot product of CPU `target`, built for it; and the fused module's script."""
    fused = _linear_module(n, k, scheme, target)
    return _cpu_vm(fused, target)["forward"], fused.script(show_meta=False)


def _linear_module(n: int, k: int, scheme, target: str) -> tvm.IRModule:

    class Linear(nn.Module):
        def __init__(self):
            self.proj = nn.Linear(k, n, bias=False)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.proj(x)

    spec = {
        "forward": {
            "x": nn.spec.Tensor([1, "m", k], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, _ = Linear().export_tvm(spec)
    flavour = int8_dot_flavour(resolve_target(target).target())
    return FuseDequantizeMatmul(flavour)(quantize_weights(mod, scheme, "float32")[0])


@pytest.mark.skipif(not INT8_DOT, reason="the int8 dot kernels need an x86 CPU with AVX2")
@pytest.mark.parametrize(
    "scheme",
    [SCHEMES["q4-a8"], tied_table_scheme(SCHEMES["q4-a8"]), *TILED.values(), Q6_K_A8],
    ids=["q4-a8", "q8-a8", *TILED, Q6_K_A8.name],
)
@pytest.mark.parametrize("n,k", [(64, 128), (48, 70), (128, 300), (256, 1000), (40, 70)])
def test_int8_dot_equals_integer_activations_times_dequantized_weights(scheme, n, k):
    """Weights in row tiles take the int8 kernel (q4-a8: activations rounded to int8; q4 and q8:
    to 22-bit integers, which leaves them exact against float activations; q6_k-a8: int8, two
    weight scales per group of 32 activations); others (N not a multiple of 16) compute with
    float activations times the dequantized weights."""
    forward, script = _linear_vm(n, k, scheme)
    tiled = scheme.tiled(n)
    assert (f"q{scheme.bits}_{scheme.activations}_linear" in script) == tiled
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)
    parts = quantize(scheme, w, np.float32)
    weights = dequantize(scheme, parts, k)
    levels = PIECES[scheme.activations][1]
    for m in (1, 5, 33):
        x = (rng.standard_normal((1, m, k)) * rng.uniform(0.1, 10, (1, m, 1))).astype(np.float32)
        x[0, 0, : min(k, 40)] = 0  # an all-zero group: scale 0, codes 0
        got = forward(tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in parts]).numpy()
        ref = (_int_activations(x, levels) if tiled else x) @ weights.T
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
        if scheme.activations != "int8":  # a few of the codes' steps (max|x| / levels) off
            exact = x @ weights.T
            np.testing.assert_allclose(got, exact, rtol=0, atol=8 / levels * np.abs(exact).max())


@pytest.mark.skipif(not INT8_DOT, reason="the int8 dot kernels need an x86 CPU with AVX2")
@pytest.mark.parametrize("ggml_type", sorted(A8_REPACKS))
@pytest.mark.parametrize("n,k", [(64, 256), (48, 512), (40, 256), (128, 768)])
def test_gguf_blocks_repacked_exactly_for_int8_dot(ggml_type, n, k):
    """`--quant gguf-a8`: GGUF blocks (written by gguf-py's quantizer, llama.cpp's reference)
    repacked into row tiles hold exactly the file's dequantized weights, and the int8 kernel
    (with mins for Q4_1 / Q4_K / Q5_1 / Q5_K, two scales per 32 for Q6_K) equals int8-rounded
    activations times them; N not a multiple of 16 (40) takes the float kernel over the same
    parts."""
    import gguf

    scheme = A8_REPACKS[ggml_type]
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)
    if ggml_type.endswith("_K"):  # gguf-py makes no K-quants
        raw = _random_k_blocks(rng, ggml_type, n, k)
    else:
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
    parts = repack_gguf(scheme, ggml_type, raw, k)
    weights = dequantize(scheme, parts, k)
    np.testing.assert_array_equal(weights, dequantize_gguf(GGUF_SCHEMES[ggml_type], raw, k))
    forward, script = _linear_vm(n, k, scheme)
    tiled = scheme.tiled(n)
    assert ("_int8_linear" in script) == tiled
    for m in (1, 5, 33):
        x = (rng.standard_normal((1, m, k)) * rng.uniform(0.1, 10, (1, m, 1))).astype(np.float32)
        x[0, 0, :40] = 0  # an all-zero group: scale 0, codes 0
        got = forward(tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in parts]).numpy()
        ref = (_int_activations(x) if tiled else x) @ weights.T
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def _random_k_blocks(rng, ggml_type: str, n: int, k: int) -> np.ndarray:
    """Rows [n, k / 256 * bytes] of K-quant blocks: random bytes, finite fp16 d (and dmin)."""
    raw = rng.integers(0, 256, (n, k // 256, GGUF_SCHEMES[ggml_type].block_bytes), np.uint8)
    for offset in {"Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}.get(ggml_type, (0, 2)):
        scale = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[..., offset : offset + 2] = scale[..., None].view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.skipif(not INT8_DOT, reason="the int8 dot kernels need an x86 CPU with AVX2")
@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("n,k", [(48, 256), (128, 1024), (40, 512)])
def test_gguf_a8_packed_codes_equal_the_byte_layout(ggml_type, n, k):
    """K-quants repacked with their integer scales (and mins) per sub-block, fp16 d (and dmin)
    per 256, and 5- / 6-bit codes (K-quants, Q5_0, Q5_1) in nibbles and planes give the same
    outputs, bit for bit, as gguf-a8's layout before (`flat_scales`: K-quant scales multiplied
    out into float32, codes of more than 4 bits in int8): the kernel forms the same float32
    scales and integer sums. Parts hold 4.625 bits a weight for Q4_K (the file: 4.5), 5.625
    for Q5_K (5.5), 6.5625 for Q6_K (6.5625), 4.5625 for Q3_K (3.4375: codes q + 8 in
    nibbles), 5.5 for Q5_0 (5.5) and 6 for Q5_1 (6); flat, 6, 10, 10, 6, 8.5 and 9. N = 40
    takes the float kernel."""
    import gguf

    rng = np.random.default_rng(n + k)
    if ggml_type.endswith("_K"):  # gguf-py makes no K-quants
        raw = _random_k_blocks(rng, ggml_type, n, k)
    else:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
    packed, flat = A8_REPACKS[ggml_type], flat_scales(A8_REPACKS[ggml_type])
    parts, flat_parts = repack_gguf(packed, ggml_type, raw, k), repack_gguf(flat, ggml_type, raw, k)
    bits = sum(p.nbytes for p in parts) * 8 / (n * k)
    expected = {"Q4_K": 4.625, "Q5_K": 5.625, "Q6_K": 6.5625, "Q3_K": 4.5625, "Q5_0": 5.5}
    assert bits == {**expected, "Q5_1": 6}[ggml_type]
    assert [p.shape for p in parts] == list(packed.part_shapes(n, k).values())
    np.testing.assert_array_equal(dequantize(packed, parts, k), dequantize(flat, flat_parts, k))
    forward, script = _linear_vm(n, k, packed)
    mins = "" if packed.symmetric else "_min"
    kernel = "_s256" if packed.super_group else f"q5{mins}_int8_linear"  # the kernel reading them
    assert (kernel in script) == packed.tiled(n)
    flat_forward, _ = _linear_vm(n, k, flat)
    for m in (1, 5, 33):
        x = (rng.standard_normal((1, m, k)) * rng.uniform(0.1, 10, (1, m, 1))).astype(np.float32)
        got = forward(tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in parts]).numpy()
        was = flat_forward(tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in flat_parts])
        np.testing.assert_array_equal(got, was.numpy())


# CPUs whose int8 dot products are emulated or narrower (int8_dot.Int8Dot), built here for each
# and run on this CPU, which must have the feature (/proc/cpuinfo's name) of each
FLAVOUR_CPUS = {
    "cpu:haswell": "avx2",
    "cpu:skylake-avx512": "avx512bw",
    "cpu:alderlake": "avx_vnni",
}
_CPUINFO = Path("/proc/cpuinfo")
_CPU_FLAGS = set(_CPUINFO.read_text().split()) if _CPUINFO.exists() else set()
# the schemes the kernel reads differently: codes of 4, 6 (K-quant planes) and 8 bits (int8
# weights w + 128, the byte range the emulation splits into nibbles), activations int8 and
# int22 (byte pieces), a min per group (Q4_K), two scales per 32 (Q6_K in int8)
FLAVOUR_SCHEMES = {
    "q4-a8": (SCHEMES["q4-a8"], 70),
    "q8-a8": (tied_table_scheme(SCHEMES["q4-a8"]), 70),
    **{name: (scheme, 300) for name, scheme in TILED.items()},
    "q4_k-a8": (A8_REPACKS["Q4_K"], 512),
    "q6_k-a8": (A8_REPACKS["Q6_K"], 256),
    "q6_k-a8-int8": (Q6_K_A8, 256),
}


def _extreme_parts(name: str, n: int, k: int, rng) -> list[np.ndarray]:
    """Weights at both ends of their codes (int8: -127 and 127, stored 1 and 255: an int16 pair
    sum of 255 * 127 * 2 saturates); K-quants from random blocks."""
    scheme = FLAVOUR_SCHEMES[name][0]
    ggml_type = {"q4_k-a8": "Q4_K", "q6_k-a8": "Q6_K", "q6_k-a8-int8": "Q6_K"}.get(name)
    if ggml_type:
        return repack_gguf(scheme, ggml_type, _random_k_blocks(rng, ggml_type, n, k), k)
    w = rng.choice([-1.0, 1.0], (n, k)) * rng.uniform(0.5, 2, (n, 1))
    return quantize(scheme, w.astype(np.float32), np.float32)


@functools.cache
def _flavour_linear(name: str, target: str):
    scheme, k = FLAVOUR_SCHEMES[name]
    return _linear_vm(48, k, scheme, target)[0]


@pytest.mark.parametrize("target", sorted(FLAVOUR_CPUS))
@pytest.mark.parametrize("name", list(FLAVOUR_SCHEMES))
def test_int8_dot_flavours_equal_the_vnni_kernel_bit_for_bit(target, name):
    """Each target's int8 dot product (AVX2 and AVX-512BW: vpmaddubsw + vpmaddwd, exact; AVX-VNNI:
    256-bit vpdpbusd) gives the AVX-512 VNNI kernel's outputs bit for bit, in decode (1 row) and
    prefill (5, 33 rows; K padded), with activation codes near +-127 (INT22: random byte pieces)
    against weights at both ends: a pair sum that saturated int16 would be off by ~40."""
    if FLAVOUR_CPUS[target] not in _CPU_FLAGS or "avx512_vnni" not in _CPU_FLAGS:
        pytest.skip(f"this CPU runs no {target} code or no VNNI reference")
    scheme, k = FLAVOUR_SCHEMES[name]
    rng = np.random.default_rng(k)
    parts = _extreme_parts(name, 48, k, rng)
    weights = dequantize(scheme, parts, k)
    forward, vnni = _flavour_linear(name, target), _flavour_linear(name, "cpu")
    for m in (1, 5, 33):
        x = rng.choice([-1.0, 1.0], (1, m, k)) * rng.uniform(0.5, 1, (1, m, k))
        x = x.astype(np.float32)
        args = [tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in parts]]
        got = forward(*args).numpy()
        np.testing.assert_array_equal(got, vnni(*args).numpy())
        ref = _int_activations(x, PIECES[scheme.activations][1]) @ weights.T
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize(
    "target,has,lacks",
    [
        ("cpu:haswell", ("vpmaddubsw", "vpmaddwd"), ("zmm", "vpdpbusd")),
        ("cpu:skylake-avx512", ("vpmaddubsw", "zmm"), ("vpdpbusd",)),
        ("cpu:alderlake", ("{vex}\tvpdpbusd",), ("zmm", "vpmaddubsw")),
        ("cpu", ("vpdpbusd", "zmm"), ("vpmaddubsw", "{vex}")),
    ],
)
def test_int8_dot_flavours_emit_their_instructions(target, has, lacks):
    """The assembly of each target's int8 kernel: AVX2 code has no 512-bit registers (a Haswell
    would fault on them) and no vpdpbusd; AVX-VNNI's vpdpbusd is the VEX-encoded one."""
    if target == "cpu" and int8_dot_flavour(resolve_target("cpu").target()) != "avx512vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    module = _linear_module(48, 70, SCHEMES["q4-a8"], target)
    assembly = _cpu_build(module, target).mod.imports[0].inspect_source("s")
    assert all(text in assembly for text in has), has
    assert not any(text in assembly for text in lacks), lacks


def _quantized_linears(manifest) -> set[str]:
    """Module names of the linears stored quantized ("a.q_proj+k_proj.weight.q" -> both)."""
    names = set()
    for p in manifest.params:
        if p["name"].endswith(".weight.q"):
            prefix, _, fused = p["name"].removesuffix(".weight.q").rpartition(".")
            names |= {f"{prefix}.{part}".lstrip(".") for part in fused.split("+")}
    return names


@pytest.mark.skipif(not INT8_DOT, reason="the int8 dot kernels need an x86 CPU with AVX2")
@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied_llama3_rope"])
def test_q4_a8_model_equals_transformers_with_int8_activations(case, checkpoints, tmp_path):
    """The whole model against transformers on the dequantized weights, every quantized
    linear's input rounded to int8 the same way: prefill and decode. A tied lm_head takes the
    int8 kernel too (its table packed; the gathered embeddings its dequantized rows)."""
    from hf_models import hf_logits

    src = checkpoints(case)
    llm = relaxlm.LLM(str(src), quant="q4-a8")
    assert llm.manifest.quantization["activations"] == "int8"
    quantized = _quantized_linears(llm.manifest)
    if llm.manifest.model_config["tie_word_embeddings"]:
        assert "model.embed_tokens" in quantized
        quantized.add("lm_head")  # transformers' name for the matmul by the tied table
    assert "lm_head" in quantized and "model.layers.1.mlp.down_proj" in quantized

    def int8_inputs(name, x):
        if name not in quantized:
            return x
        return torch.from_numpy(_int_activations(x.numpy()))

    ids = [1] + np.random.default_rng(5).integers(5, 400, 23).tolist()
    ours = llm.score(ids, prefill=12)
    deq = _dequantized_checkpoint(src, tmp_path / "deq", "q4-a8")
    ref = hf_logits(deq, ids, 12, linear_input=int8_inputs)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"relative error {rel}"
