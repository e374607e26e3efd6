"""Quantization: the numpy reference, the two passes on a small hand-made graph, and whole
models whose logits must equal a float model built from the dequantized weights."""

import json
import shutil

import numpy as np
import pytest
import tvm
from safetensors.numpy import load_file, save_file
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime.vm import VirtualMachine

import relaxlm
from relaxlm.compiler import schedules
from relaxlm.compiler.fuse_dequantize_matmul import FuseDequantizeMatmul
from relaxlm.compiler.quantization import SCHEMES, dequantize, quantize
from relaxlm.compiler.quantize_weights import QuantizeWeights, param_plan
from relaxlm.compiler.targets import resolve_target

INT_SCHEMES = ["q8", "q4", "q4-asym"]
ALL_SCHEMES = [*INT_SCHEMES, "float16", "bfloat16"]


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_pack_unpack_within_the_scheme_bound(name):
    scheme = SCHEMES[name]
    rng = np.random.default_rng(0)
    for n, k in [(3, 32), (5, 100), (2, 129), (7, 300), (1, 1)]:  # K not a multiple of the group
        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 10)).astype(np.float32)
        parts = quantize(scheme, w, np.float32)
        assert [p.shape for p in parts] == list(scheme.part_shapes(n, k).values())
        back = dequantize(scheme, parts, k)
        assert back.shape == w.shape
        if scheme.kind == "cast":
            np.testing.assert_allclose(back, w, rtol=2**-7, atol=0)
            continue
        # Rounding to the nearest level: at most half a step (the group's scale) off.
        scale = np.abs(np.repeat(parts[1].astype(np.float32), scheme.group_size, axis=1)[:, :k])
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
    quantized = QuantizeWeights(scheme, "float32")(mod)
    plan = param_plan(quantized)
    # The embedding (read by take) and the bias stay; both linear weights become parts.
    sources = {names[e["source"]] for e in plan if e["part"] not in ("",) or scheme.kind == "cast"}
    assert {"up.weight", "down.weight"} <= {
        names[e["source"]] for e in plan if e["dtype"] != "float32" or e["part"]
    }
    assert all(
        names[e["source"]] in ("embed.weight", "up.bias")
        for e in plan
        if e["part"] == "" and e["dtype"] == "float32"
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
        source = names[entry["source"]]
        if entry["part"] == "" and scheme.kind != "cast" or entry["dtype"] == "float32":
            packed.append(weights[source])
            continue
        parts = quantize(scheme, weights[source], np.float32)
        for _ in parts[1:]:
            next(entries)
        packed += parts
        deq[source] = dequantize(scheme, parts, shapes[source][1])
    preset = resolve_target("cpu")
    lowered = tvm.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(fused)
    with preset.target():
        lowered = schedules.for_target(preset)(lowered)
    ex = relax.build(
        lowered, target=preset.target(), relax_pipeline=relax.pipeline.default_build_pipeline()
    )
    vm = VirtualMachine(ex, tvm.cpu())
    ids = np.array([[3, 17, 42, 7, 0]], dtype="int32")
    out = vm["forward"](
        tvm.runtime.tensor(ids), [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in packed]
    ).numpy()
    h = deq["embed.weight"][ids[0]]
    h = h @ deq["up.weight"].T + deq["up.bias"]
    ref = (h / (1 + np.exp(-h))) @ deq["down.weight"].T
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _dequantized_checkpoint(src, dst, scheme_name):
    """A float32 copy of `src` whose linear weights are replaced by their dequantized values."""
    scheme = SCHEMES[scheme_name]
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name and "norm" not in name:
            weights[name] = dequantize(scheme, quantize(scheme, w, np.float32), w.shape[1])
    save_file(weights, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_quantized_model_equals_float_model_with_dequantized_weights(name, checkpoints, tmp_path):
    src = checkpoints("llama_gqa")
    quantized = relaxlm.LLM(str(src), quant=name)
    manifest = quantized.manifest.quantization
    assert manifest["scheme"] == name
    reference = relaxlm.LLM(str(_dequantized_checkpoint(src, tmp_path / "deq", name)))
    ids = [1] + np.random.default_rng(3).integers(5, 400, 23).tolist()
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
    # gate and up read the same input: FuseParallelLinear stores their rows as one weight
    assert "model.layers.0.mlp.gate_proj+up_proj.weight.q" in names
    assert "model.embed_tokens.weight" in names  # the embedding table is read by take: kept


def test_unknown_scheme_is_refused(checkpoints, tmp_path):
    with pytest.raises(relaxlm.RelaxlmError, match="q3"):
        relaxlm.compile(str(checkpoints("llama_gqa")), output=tmp_path / "a", quant="q3")
