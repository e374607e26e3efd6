"""LoRA adapters merged at compile time, against PEFT's own merge (merge_and_unload)."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_models import hf_logits
from safetensors.numpy import load_file, save_file
from test_cli import assert_clean_error, relaxlm_cli

import relaxlm
from relaxlm.artifacts import Manifest
from relaxlm.cache import content_key
from relaxlm.compiler.pipeline import scheme_for_targets
from relaxlm.compiler.quantization import SCHEMES, quantize
from relaxlm.compiler.targets import resolve_targets
from relaxlm.frontends import load_checkpoint
from relaxlm.frontends.checkpoint import TOKENIZER_FILES
from relaxlm.frontends.lora import merge_lora
from relaxlm.testing.llama_gguf import write_llama_gguf

PREFILL = 12
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]

# The second adapter: rsLoRA scale alpha / sqrt(r), one module of rank 2, down_proj's own alpha.
RSLORA = {
    "use_rslora": True,
    "rank_pattern": {"layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"down_proj": 3},
}


def _hf_model(folder: Path) -> transformers.PreTrainedModel:
    """A fresh float32 copy (PEFT wraps the model it is given in place)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _make_adapter(base: Path, out: Path, seed: int, targets: list[str], **options) -> Path:
    """A random PEFT LoRA adapter for `base`, saved as save_pretrained writes it."""
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter changes the logits.
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options
    )
    peft.get_peft_model(_hf_model(base), config).save_pretrained(out)
    return out


def _peft_merged(base: Path, adapters: list[Path], out: Path) -> Path:
    """`base` with the adapters merged one after the other by PEFT, saved as a model folder."""
    model = _hf_model(base)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine similarity of all rows of logits together, and the least of each row's."""
    rows = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)), float(rows.min())


def _token_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(5, 400, n - 1).tolist()


def _assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-3) -> None:
    err = np.abs(ours - ref).max()
    assert err <= tol * np.abs(ref).max(), f"max abs error {err} vs max |logit| {np.abs(ref).max()}"


@pytest.fixture(scope="module")
def llama(checkpoints, tmp_path_factory):
    """The tiny Llama, two adapters for it, and PEFT's merge of both (in order)."""
    base = checkpoints("llama_gqa")
    root = tmp_path_factory.mktemp("lora")
    plain = _make_adapter(base, root / "plain", 0, LLAMA_TARGETS)
    rslora = _make_adapter(base, root / "rslora", 1, LLAMA_TARGETS, **RSLORA)
    merged = _peft_merged(base, [plain, rslora], root / "merged")
    return base, plain, rslora, merged


def test_adapters_merge_as_peft_does(llama):
    base, plain, rslora, merged = llama
    checkpoint = merge_lora(load_checkpoint(base), [plain, rslora])
    reference = load_file(merged / "model.safetensors")
    assert set(reference) == set(checkpoint.tensors)
    for name, weight in reference.items():  # equal up to the summation order of B @ A
        ours = checkpoint.read(name)
        assert ours.dtype == weight.dtype
        np.testing.assert_allclose(ours, weight, rtol=0, atol=1e-6 * np.abs(weight).max())
    untouched = load_checkpoint(base)
    adapted = [n for n in reference if not np.array_equal(untouched.read(n), reference[n])]
    # 5 modules a layer, 2 layers: the merge did change them (and nothing else)
    assert len(adapted) == 10 and all(n.endswith(".weight") for n in adapted)


def test_lora_bias_adds_to_the_base_bias(checkpoints, tmp_path):
    """lora_bias=True: lora_B has a bias, which the merge adds (scaled) to the layer's bias."""
    base = checkpoints("qwen2")  # q/k/v have biases
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        lora_bias=True,
    )
    model = peft.get_peft_model(_hf_model(base), config)
    with torch.no_grad():  # PEFT starts the bias at zero; make it count
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_()
    model.save_pretrained(tmp_path / "adapter")
    merged = _peft_merged(base, [tmp_path / "adapter"], tmp_path / "merged")
    reference = load_file(merged / "model.safetensors")
    checkpoint = merge_lora(load_checkpoint(base), [tmp_path / "adapter"])
    untouched = load_checkpoint(base)
    for layer in range(2):
        for proj in ("q", "v"):
            name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
            assert not np.allclose(untouched.read(name), reference[name])
            np.testing.assert_allclose(checkpoint.read(name), reference[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def lora_llm(llama):
    """The tiny Llama compiled with both adapters (into the session's compile cache)."""
    base, plain, rslora, _ = llama
    return relaxlm.LLM(str(base), lora=[plain, rslora])


def test_logits_equal_transformers_with_merged_adapters(llama, lora_llm):
    """Two --lora adapters (the second rsLoRA with rank and alpha patterns) merged in order."""
    base, plain, rslora, merged = llama
    llm = lora_llm
    ids = _token_ids(PREFILL + 12)
    ours = llm.score(ids, prefill=PREFILL)
    ref = hf_logits(merged, ids, PREFILL)
    _assert_close(ours, ref)
    without = hf_logits(base, ids, PREFILL)  # the adapters matter far beyond the tolerance
    assert np.abs(without - ref).max() > 0.1 * np.abs(ref).max()

    records = llm.manifest.lora
    assert [r["path"] for r in records] == [str(plain.resolve()), str(rslora.resolve())]
    file = plain / "adapter_model.safetensors"
    assert records[0]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (records[0]["r"], records[0]["alpha"], records[0]["use_rslora"]) == (4, 8, False)
    assert sorted(records[0]["target_modules"]) == sorted(LLAMA_TARGETS)
    assert records[1]["use_rslora"] and records[1]["rank_pattern"] == RSLORA["rank_pattern"]
    shown = relaxlm_cli("inspect", llm.artifact)
    (line,) = [row for row in shown.stdout.splitlines() if row.startswith("lora 1 ")]
    assert line.split()[2:6] == [str(rslora.resolve()), "r", "4,", "alpha"], line


def test_q8_base_with_adapters_stores_the_merged_weights_quantized(llama):
    """Merged before quantization (and before q/k/v fusion): the q8 artifact holds PEFT's
    merged weights, quantized as q8 stores them for this CPU (equal here; the test allows a
    level's difference where float rounding in B @ A crosses a rounding boundary), and its
    logits follow."""
    base, plain, rslora, merged = llama
    llm = relaxlm.LLM(str(base), quant="q8", lora=[plain, rslora])
    assert llm.manifest.quantization["scheme"] == "q8" and len(llm.manifest.lora) == 2
    scheme = scheme_for_targets(SCHEMES["q8"], resolve_targets("cpu"), "float32", None)
    stored = {}
    for shard in llm.manifest.shards:
        stored.update(load_file(llm.artifact / shard))
    reference = load_file(merged / "model.safetensors")
    attn = "model.layers.0.self_attn."
    fused = np.concatenate([reference[f"{attn}{p}_proj.weight"] for p in "qkv"])
    for name, weight in [
        ("model.layers.1.mlp.down_proj.weight", reference["model.layers.1.mlp.down_proj.weight"]),
        (f"{attn}q_proj+k_proj+v_proj.weight", fused),
    ]:
        parts = quantize(scheme, weight, np.float32)
        shapes = scheme.part_shapes(*weight.shape)
        assert len(parts) == len(shapes) >= 2
        for part, want in zip(shapes, parts, strict=True):
            got = stored[f"{name}.{part}"]
            if got.dtype.kind == "i":  # a weight off by an ulp may round to the next level
                assert (
                    np.abs(got.astype(np.int32) - want).max() <= 1 and (got != want).mean() < 1e-3
                )
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5)
    ids = _token_ids(PREFILL + 12, seed=1)
    ours, ref = llm.score(ids, prefill=PREFILL), hf_logits(merged, ids, PREFILL)
    # q8's rounding, amplified by the fixture's weights and the random adapters (0.9989 and
    # 0.997 seen), against a model the adapters turn far away from the base's logits
    cos, worst_row = _cosines(ours, ref)
    assert cos >= 0.998 and worst_row >= 0.995, (cos, worst_row)
    assert _cosines(ours, hf_logits(base, ids, PREFILL))[0] < 0.5


def test_gpt2_conv1d_adapter(checkpoints, tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: PEFT sets fan_in_fan_out and transposes B @ A."""
    base = checkpoints("gpt2")
    adapter = _make_adapter(base, tmp_path / "gpt2-lora", 2, ["c_attn", "c_proj", "c_fc"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    merged = _peft_merged(base, [adapter], tmp_path / "merged")
    out = relaxlm.compile(str(base), output=tmp_path / "a", lora=[adapter], progress=False)
    ids = _token_ids(PREFILL + 8, seed=2)
    _assert_close(relaxlm.LLM(out).score(ids, prefill=PREFILL), hf_logits(merged, ids, PREFILL))


def test_cache_key_follows_the_adapters(llama):
    base, plain, rslora, _ = llama
    options = {"target": "cpu", "quant": "none", "dtype": "float32"}
    keys = [
        content_key(base, options, adapters)
        for adapters in ([], [plain], [rslora], [plain, rslora], [rslora, plain])
    ]
    assert len(set(keys)) == len(keys)
    assert content_key(base, options, [plain]) == keys[1]


def _edited_adapter(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of the adapter at `src` with config fields set and tensors replaced/added."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors:
        file = dst / "adapter_model.safetensors"
        save_file({**load_file(file), **tensors}, file)
    return dst


def test_mismatched_shape_is_one_clear_cli_error(llama, tmp_path):
    base, plain, _, _ = llama
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    bad = _edited_adapter(plain, tmp_path / "bad", tensors={key: np.zeros((32, 4), np.float32)})
    proc = relaxlm_cli("compile", base, "--lora", bad, "-o", tmp_path / "out")
    assert proc.returncode == 2
    # the module, the adapter's update and the base weight's shape
    assert_clean_error(proc, "model.layers.0.self_attn.q_proj", "[32, 64]", "[64, 64]")
    assert not (tmp_path / "out").exists()


def test_dora_is_one_clear_cli_error(llama, tmp_path):
    base, plain, _, _ = llama
    dora = _edited_adapter(plain, tmp_path / "dora", config={"use_dora": True})
    proc = relaxlm_cli("compile", base, "--lora", dora, "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert_clean_error(proc, "use_dora", "merge_and_unload")


@pytest.mark.parametrize(
    "config, tensors, words",
    [
        ({"modules_to_save": ["lm_head"]}, None, ["modules_to_save"]),
        ({"bias": "all"}, None, ["bias", "'all'"]),
        ({"peft_type": "IA3"}, None, ["peft_type", "IA3"]),
        ({"r": 8}, None, ["lora_A is [4, 128]", "r = 8"]),  # the tensors' rank is 4
        (
            None,
            {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 8), "f4")},
            ["embed_tokens", "embedding"],
        ),
        (
            None,
            {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((4, 64), "f4")},
            ["up_proj", "no lora_B"],
        ),
        (
            None,
            {
                "base_model.model.model.layers.0.foo.lora_A.weight": np.zeros((4, 64), "f4"),
                "base_model.model.model.layers.0.foo.lora_B.weight": np.zeros((64, 4), "f4"),
            },
            ["model.layers.0.foo", "no weight"],
        ),
    ],
)
def test_unsupported_adapters_are_refused(llama, tmp_path, config, tensors, words):
    base, plain, _, _ = llama
    bad = _edited_adapter(plain, tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(relaxlm.RelaxlmError) as e:
        merge_lora(load_checkpoint(base), [bad])
    for word in words:
        assert word in str(e.value), str(e.value)


def test_gguf_bases_and_artifacts_take_no_adapter(llama, lora_llm, tmp_path):
    base, plain, _, _ = llama
    gguf = write_llama_gguf(base, tmp_path / "llama.gguf", "F16")
    with pytest.raises(relaxlm.RelaxlmError, match="GGUF file; LoRA adapters merge into"):
        merge_lora(load_checkpoint(gguf), [plain])
    with pytest.raises(relaxlm.RelaxlmError, match="merge at compile time"):
        relaxlm.LLM(str(lora_llm.artifact), lora=[plain])


def test_an_adapter_for_another_base_only_warns(llama, tmp_path, caplog):
    base, plain, _, _ = llama
    other = _edited_adapter(plain, tmp_path / "o", config={"base_model_name_or_path": "x/other"})
    with caplog.at_level(logging.WARNING):
        merged = merge_lora(load_checkpoint(base), [other])
    assert "x/other" in caplog.text and len(merged.adapters) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        merge_lora(load_checkpoint(base), [plain])  # made for this very folder
    assert "made for" not in caplog.text


def test_bfloat16_base_keeps_its_dtype(llama, tmp_path):
    base, plain, _, _ = llama
    folder = tmp_path / "bf16"
    shutil.copytree(base, folder)
    weights = load_file(folder / "model.safetensors")
    save_file(
        {n: w.astype(ml_dtypes.bfloat16) for n, w in weights.items()},
        folder / "model.safetensors",
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    merged = merge_lora(load_checkpoint(folder), [plain]).read(name)
    assert merged.dtype == ml_dtypes.bfloat16
    exact = merge_lora(load_checkpoint(base), [plain]).read(name)
    # float32 merge of the rounded base, rounded once: off the float32 merge by the base's
    # rounding and the result's (half a bfloat16 ulp each)
    err = np.abs(merged.astype(np.float32) - exact).max()
    assert err <= 2**-8 * np.abs(exact).max(), err


def test_old_manifests_without_lora_still_load(lora_llm, tmp_path):
    data = json.loads((lora_llm.artifact / "manifest.json").read_text())
    assert len(data["lora"]) == 2
    del data["lora"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.read(tmp_path).lora == []
