"""AWQ and GPTQ checkpoints keep their 4-bit weights: tiny random checkpoints written in each
format dequantize to the format's reference weights exactly, and the compiled model's logits
equal transformers running those dequantized weights.

The writers below pack as AutoGPTQ / optimum (GPTQ, `checkpoint_format` "gptq": zero points
stored minus one) and AutoAWQ's GEMM layout do; the reference dequantization is the formats'
own formula, W[n, k] = scale[g(k), n] * (q[k, n] - zero[g(k), n]), computed here apart from
relaxlm's reader (which unpacks the words instead of using the codes the writer started from).
"""

import json
import shutil

import numpy as np
import pytest
from hf_models import hf_logits
from safetensors.numpy import load_file, save_file
from test_cli import assert_clean_error, relaxlm_cli

import relaxlm
from relaxlm.artifacts import Manifest, weight_index
from relaxlm.artifacts.safetensors_io import read
from relaxlm.compiler.quantization import asym_int4, dequantize
from relaxlm.frontends.checkpoint import TOKENIZER_FILES

GROUP = 32  # the tiny model's K is 64 or 128: groups of 32 (real checkpoints: mostly 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PREFILL = 12
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest 4-bit codes of a float weight [N, K] as GPTQ / AWQ store them:
    q [K, N] in 0..15, zero [G, N] in 1..15, float16 scale [G, N]; a few zero points moved
    so that every zero value occurs."""
    n, k = weight.shape
    groups = weight.T.reshape(k // GROUP, GROUP, n)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    scale = ((hi - lo) / 15).astype(np.float16)
    # GPTQ's original format stores zero - 1 in a nibble: a zero point of 0 cannot be written
    zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 1, 15)
    zero[0, : min(n, 15)] = np.arange(1, min(n, 15) + 1)
    q = np.clip(np.rint(groups / scale.astype(np.float32)[:, None] + zero[:, None]), 0, 15)
    return q.reshape(k, n).astype(np.uint32), zero.astype(np.uint32), scale


def _words(nibbles: np.ndarray, axis: int, order=range(8)) -> np.ndarray:
    """Pack 8 nibbles per int32 along `axis` (0: rows, 1: columns), nibble j <- element
    8w + order[j]."""
    a = np.moveaxis(nibbles, axis, -1)
    a = a.reshape(*a.shape[:-1], -1, 8)[..., list(order)]
    words = np.bitwise_or.reduce(a << (np.arange(8, dtype=np.uint32) * 4), axis=-1)
    return np.moveaxis(words, -1, axis).astype(np.uint32).view(np.int32)


def _dequantized(q, zero, scale) -> np.ndarray:
    """The reference weight [N, K] of codes q [K, N], zero and scale [G, N]."""
    g = np.arange(q.shape[0]) // GROUP
    return (scale.astype(np.float32)[g] * (q.astype(np.float32) - zero[g])).T


def _write(base, out, method: str, act_order: bool = False):
    """`base` quantized in `method`'s layout into `out`, and the same dequantized into
    `out`-float; returns both folders and the reference weights."""
    rng = np.random.default_rng(0)
    tensors = load_file(base / "model.safetensors")
    packed, floats, reference = {}, dict(tensors), {}
    for name, weight in tensors.items():
        layer = name.removesuffix(".weight")
        if not layer.endswith(LINEARS):
            packed[name] = weight
            continue
        q, zero, scale = _quantize(weight)
        reference[name] = floats[name] = _dequantized(q, zero, scale).astype(weight.dtype)
        if method == "gptq":
            packed[f"{layer}.qweight"] = _words(q, 0)
            packed[f"{layer}.qzeros"] = _words(zero - 1, 1)
            g_idx = np.arange(q.shape[0]) // GROUP
            if act_order:
                g_idx = g_idx[rng.permutation(q.shape[0])]
            packed[f"{layer}.g_idx"] = g_idx.astype(np.int32)
        else:
            packed[f"{layer}.qweight"] = _words(q, 1, AWQ_ORDER)
            packed[f"{layer}.qzeros"] = _words(zero, 1, AWQ_ORDER)
        packed[f"{layer}.scales"] = scale
    config = json.loads((base / "config.json").read_text())
    folders = {}
    for kind, data in (("packed", packed), ("float", floats)):
        folder = out / kind
        folder.mkdir(parents=True)
        # contiguous: safetensors' numpy writer takes an array's buffer as it lies in memory
        save_file(
            {n: np.ascontiguousarray(a) for n, a in data.items()}, folder / "model.safetensors"
        )
        for file in TOKENIZER_FILES:
            if (base / file).is_file():
                shutil.copyfile(base / file, folder / file)
        folders[kind] = folder
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order}
        qc |= {"sym": False, "checkpoint_format": "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"}
        qc |= {"zero_point": True}
    (folders["packed"] / "config.json").write_text(
        json.dumps({**config, "quantization_config": qc})
    )
    (folders["float"] / "config.json").write_text(json.dumps(config))
    return folders["packed"], folders["float"], reference


@pytest.fixture(scope="module", params=["gptq", "awq"])
def prequantized(request, checkpoints, tmp_path_factory):
    base = checkpoints("llama_gqa")
    packed, floats, reference = _write(base, tmp_path_factory.mktemp(request.param), request.param)
    artifact = relaxlm.compile(packed, output=tmp_path_factory.mktemp("out") / "a", progress=False)
    return request.param, packed, floats, reference, artifact


def test_the_4bit_layers_are_kept_and_dequantize_exactly(prequantized):
    method, _, _, reference, artifact = prequantized
    manifest = Manifest.read(artifact)
    scheme = asym_int4(GROUP)
    assert manifest.quantization["source"] == method and manifest.quantization["scheme"] == method
    # q, k and v (and gate and up) are fused: 2 layers x 4 fused linears, no float weight of them
    assert manifest.quantization["tensors"][scheme.name] == 8
    index = weight_index(artifact, manifest)
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        parts = [read(index[f"{name}.{p}"]) for p in ("q", "scale", "zero")]
        assert parts[0].dtype == np.uint32
        ours = dequantize(scheme, parts, reference[name].shape[1])
        np.testing.assert_array_equal(ours, reference[name])  # bit for bit: nothing re-rounded


def test_logits_equal_transformers_on_the_dequantized_weights(prequantized):
    _, _, floats, _, artifact = prequantized
    ids = [1] + np.random.default_rng(3).integers(5, 400, 19).tolist()
    ours = relaxlm.LLM(artifact).score(ids, prefill=PREFILL)
    ref = hf_logits(floats, ids, PREFILL)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), f"max abs error {err}, max |logit| {np.abs(ref).max()}"


def test_a_requested_scheme_requantizes_the_4bit_layers(checkpoints, tmp_path):
    packed, _, _ = _write(checkpoints("llama_gqa"), tmp_path, "gptq")
    artifact = relaxlm.compile(packed, output=tmp_path / "q8", quant="q8", progress=False)
    quantization = Manifest.read(artifact).quantization
    assert quantization["scheme"] == "q8"
    assert quantization["requantized_from"] == {f"INT4_G{GROUP}": 14}


def test_act_order_gptq_is_one_clear_error(checkpoints, tmp_path):
    packed, _, _ = _write(checkpoints("llama_gqa"), tmp_path, "gptq", act_order=True)
    result = relaxlm_cli("compile", str(packed), "-o", str(tmp_path / "out"))
    assert_clean_error(result, "act-order")
