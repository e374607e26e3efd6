"""GGUF files: llama.cpp's blocks kept as they are and computed exactly, q/k rows un-permuted,
logits close to llama.cpp's own (llama-cpp-python) on the same file.

Test files are written here from random-weight HF models (relaxlm/testing/llama_gguf.py writes F16,
llama.cpp's quantizer makes the rest). Two oracles:
- transformers on the file's weights dequantized by gguf-py (`gguf.quants`, llama.cpp's
  reference in numpy): relaxlm must match it to float32 rounding, which proves the block
  formats, the permutation and the name and config mapping exact;
- llama.cpp on the file: its quantized matmuls also quantize the activations (to 8 bits per
  block), so its logits differ by a few percent of the largest logit on these random models,
  whose layers amplify errors (reported per type; SmolLM2 in test_default_model.py is the
  real-weights case).
"""

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import tvm
from gguf import quants
from hf_models import PARITY_CASES, hf_logits, make_model
from safetensors.numpy import save_file
from tvm import te

import relaxlm
from relaxlm.artifacts import Manifest, weight_index
from relaxlm.artifacts.safetensors_io import read
from relaxlm.compiler.int8_dot import has_int8_dot, int8_dot_flavour
from relaxlm.compiler.quantization import A8_REPACKS, GGUF_SCHEMES, dequantize
from relaxlm.compiler.quantize_weights import dequantize_te
from relaxlm.compiler.targets import resolve_target
from relaxlm.errors import RelaxlmError
from relaxlm.frontends import load_checkpoint
from relaxlm.frontends.gguf import hf_name, load_gguf, unpermute_rows
from relaxlm.testing.llama_gguf import _permute_rope, quantize_gguf, write_llama_gguf

# K-quants need rows of whole 256-value super-blocks: hidden and intermediate multiples of 256.
WIDE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,  # no output.weight: the tied table is gathered and matmul'd
}
# ftype -> (HF model, llama.cpp file type)
FILES = {
    "F16": ("tiny", "F16"),
    "BF16": ("tiny", "BF16"),
    "Q8_0": ("tiny", "Q8_0"),
    "Q4_1": ("tiny", "Q4_1"),
    "Q4_0": ("tiny", "Q4_0"),  # llama.cpp stores output.weight as Q6_K, or Q8_0 when K < 256
    "Q5_0": ("tiny", "Q5_0"),
    "Q5_1": ("tiny", "Q5_1"),
    "Q4_K_M": ("wide", "Q4_K_M"),  # Q4_K with Q6_K for some tensors
    "Q5_K_M": ("wide", "Q5_K_M"),
    "Q6_K": ("wide", "Q6_K"),
    "Q3_K_S": ("wide", "Q3_K_S"),  # Q3_K, a Q6_K table
    "Q2_K": ("wide", "Q2_K"),  # Q2_K with Q3_K for some tensors, a Q6_K table
    "qwen2-Q8_0": ("qwen2", "Q8_0"),
    "llama3-rope-F16": ("llama3", "F16"),  # rope_freqs.weight: Llama 3.1-style rope scaling
}
# Llama 3.1's rope scaling, with head_dim 32 and theta 1e4 so that three frequencies fall
# between the scaled and the unscaled ones (as in real Llama 3 models).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# max |logit difference| / max |logit| vs llama.cpp, per file (measured: F16 0.004, BF16 0.013,
# Q8_0 0.05, Q4_0 0.04, Q4_1 0.04, Q4_K_M 0.08, Q5_K_M 0.08, Q6_K 0.08, qwen2 Q8_0 0.04): its
# F16 / BF16 / 8-bit activations.
LLAMA_CPP_REL = {"F16": 0.01, "BF16": 0.03}
LLAMA_CPP_REL_QUANT = 0.15
TOKENS = [1, 17, 250, 33, 402, 9, 77, 131, 5, 260, 300, 41, 8, 199, 64, 20]


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    """file key (FILES) -> a GGUF file, written on first use."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def model(kind: str) -> Path:
        if kind not in made:
            out = root / kind
            if kind == "tiny":
                make_model(out, **PARITY_CASES["llama_gqa"])
            elif kind == "wide":
                make_model(out, "LlamaForCausalLM", seed=11, base_config=_wide_config())
            elif kind == "llama3":
                make_model(
                    out,
                    "LlamaForCausalLM",
                    seed=12,
                    head_dim=32,
                    rope_theta=10000.0,
                    rope_scaling=dict(LLAMA3_ROPE),  # (make_model adds to it)
                    legacy_config=True,
                )
            else:
                make_model(out, **PARITY_CASES["qwen2"])
            made[kind] = out
        return made[kind]

    def get(key: str) -> Path:
        if key not in made:
            kind, ftype = FILES[key]
            f16 = root / f"{kind}-F16.gguf"
            if not f16.exists():
                write_llama_gguf(model(kind), f16)
            made[key] = f16 if ftype == "F16" else quantize_gguf(f16, root / f"{key}.gguf", ftype)
        return made[key]

    get.hf_dir = model
    return get


def _wide_config() -> dict:
    from hf_models import TINY_CONFIG

    return {**TINY_CONFIG, **WIDE}


@pytest.fixture(scope="session")
def gguf_llm(gguf_file):
    loaded: dict[str, relaxlm.LLM] = {}

    def get(key: str) -> relaxlm.LLM:
        if key not in loaded:
            loaded[key] = relaxlm.LLM(str(gguf_file(key)))
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def llama(gguf_file):
    opened: dict[str, llama_cpp.Llama] = {}

    def get(key: str) -> llama_cpp.Llama:
        if key not in opened:
            opened[key] = llama_cpp.Llama(
                model_path=str(gguf_file(key)), logits_all=True, n_ctx=256, verbose=False
            )
        return opened[key]

    return get


def _llama_cpp_logits(ll: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    ll.reset()
    ll.eval(ids)
    return np.array(ll.scores[: len(ids)])


def _rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# -- block formats -------------------------------------------------------------------------


def _random_blocks(scheme, rows: int, k: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 scales (where each block format keeps them)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, k // scheme.group_size, scheme.block_bytes), np.uint8)
    fp16_at = {
        **{"Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]},
        **{"Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2]},
    }
    for offset in fp16_at.get(scheme.ggml_type, [0]):
        scale = (rng.standard_normal(blocks.shape[:2]) * 0.1).astype(np.float16)
        blocks[..., offset : offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", sorted(GGUF_SCHEMES))
def test_block_dequantization_is_llama_cpps(ggml_type):
    """numpy reference == gguf-py's (llama.cpp's) bit for bit, and the TE kernel == numpy."""
    scheme = GGUF_SCHEMES[ggml_type]
    rows, k = 6, 512
    raw = _random_blocks(scheme, rows, k, seed=len(ggml_type))
    ours = dequantize(scheme, [raw], k)
    oracle = quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type])
    np.testing.assert_array_equal(ours, oracle)

    parts = te.placeholder(raw.shape, "uint8", name="raw")
    out = te.compute((rows, k), lambda n, j: dequantize_te(scheme, [parts], n, j, "float32"))
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    kernel = tvm.compile(te.create_prim_func([parts, out]), target=target)
    result = tvm.runtime.tensor(np.zeros((rows, k), np.float32))
    kernel(tvm.runtime.tensor(raw), result)
    np.testing.assert_array_equal(result.numpy(), ours)


def test_unpermute_undoes_llama_cpps_qk_permutation_on_floats_and_block_rows(gguf_file):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(unpermute_rows(_permute_rope(w, heads), heads), w)
    # On a quantized file: the Q8_0 rows of attn_q / attn_k, un-permuted and dequantized, are
    # HF's q_proj / k_proj to within half a quantization step.
    from safetensors.numpy import load_file

    hf = load_file(gguf_file.hf_dir("tiny") / "model.safetensors")
    checkpoint = load_gguf(gguf_file("Q8_0"))
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ):
        info = checkpoint.tensors[name]
        assert info.ggml_type == "Q8_0" and info.permute_heads > 0
        raw = checkpoint.read(name)  # un-permuted block rows
        assert raw.dtype == np.uint8
        back = dequantize(GGUF_SCHEMES["Q8_0"], [raw], info.shape[1])
        w = hf[name]
        # Q8_0's step is per block of 32 (max |w| / 127); the F16 file rounded w first.
        step = np.repeat(np.abs(w.reshape(len(w), -1, 32)).max(axis=2) / 127, 32, axis=1)
        assert np.all(np.abs(back - w) <= 0.51 * step + 2**-10 * np.abs(w))
        assert not np.all(np.abs(_permute_rope(back, info.permute_heads) - w) <= step)


# -- whole models --------------------------------------------------------------------------


def _dequantized_hf_folder(path: Path, out: Path) -> Path:
    """An HF folder of the file's weights dequantized by gguf-py, named and un-permuted."""
    checkpoint = load_gguf(path)
    tensors = {}
    for name, info in checkpoint.tensors.items():
        t = checkpoint.reader.tensors[info.index]
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(info.shape)
        tensors[name] = unpermute_rows(w, info.permute_heads) if info.permute_heads else w
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**checkpoint.config, "dtype": "float32"}))
    return out


@pytest.mark.parametrize("key", list(FILES))
def test_blocks_computed_exactly(key, gguf_file, gguf_llm, tmp_path):
    """relaxlm on the GGUF == transformers on its dequantized weights (float32 rounding)."""
    llm = gguf_llm(key)
    folder = _dequantized_hf_folder(gguf_file(key), tmp_path / "dequantized")
    for prefill in (len(TOKENS), 4):
        ours = llm.score(TOKENS, prefill=prefill)
        theirs = hf_logits(folder, TOKENS, prefill)
        assert _rel(ours, theirs) < 1e-4, (key, prefill, _rel(ours, theirs))


@pytest.mark.parametrize("key", list(FILES))
def test_logits_close_to_llama_cpp(key, gguf_llm, llama, record_property):
    ours = gguf_llm(key).score(TOKENS, prefill=1, every_token=False)  # prefill 1, then decode
    theirs = _llama_cpp_logits(llama(key), TOKENS)
    rel = _rel(ours, theirs)
    record_property("max_rel_err_vs_llama_cpp", rel)
    print(f"{key}: max |logit diff| / max |logit| vs llama.cpp = {rel:.4f}")
    assert rel < LLAMA_CPP_REL.get(key, LLAMA_CPP_REL_QUANT), rel
    # Random weights give close runners-up: llama.cpp's activation rounding flips a few.
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75
    every = gguf_llm(key).score(TOKENS, prefill=len(TOKENS), every_token=True)
    np.testing.assert_allclose(every, ours, rtol=0, atol=1e-4 * np.abs(ours).max())


def _llama_cpp_greedy(ll: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    ll.reset()
    ll.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(ll.scores[ll.n_tokens - 1])))
        ll.eval([out[-1]])
    return out


@pytest.mark.parametrize("key", ["F16", "Q8_0"])
def test_greedy_equals_llama_cpp(key, gguf_llm, llama):
    """16 greedy tokens equal llama.cpp's. Random weights leave near ties that llama.cpp's
    8-bit activations (Q8_0) can flip: a prompt may part ways only at a step whose top-2 gap
    is within that error; [1, 5, 9] has none."""
    llm, ll = gguf_llm(key), llama(key)
    params = relaxlm.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    strict = [[1, 5, 9]] if key == "Q8_0" else [[1, 5, 9], TOKENS[:6], TOKENS[:3], TOKENS[6:12]]
    for prompt in [[1, 5, 9], TOKENS[:6], TOKENS[:3], TOKENS[6:12]]:
        ours = llm.generate(prompt, params)[0].token_ids
        theirs = _llama_cpp_greedy(ll, prompt, 16)
        if prompt in strict:
            assert ours == theirs, prompt
            continue
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), 16)
        if same < 16:
            logits = llm.score(prompt + ours[:same], prefill=len(prompt) + same)[0]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < LLAMA_CPP_REL_QUANT * np.abs(logits).max(), (prompt, same)


def _int8_rounded(x: np.ndarray) -> tuple[np.ndarray, float]:
    """x rounded per group of 32 along the last axis to int8 codes of scale max|x| / 127, as
    int8_dot.py (and llama.cpp's Q8_0 / Q8_1 activations) round a linear's input; and how
    near a rounding tie the nearest value came (in codes: 0 is a tie)."""
    k = x.shape[-1]
    groups = x.astype(np.float32).reshape(*x.shape[:-1], k // 32, 32)
    scale = np.abs(groups).max(-1, keepdims=True) / np.float32(127)
    codes = groups / np.where(scale > 0, scale, 1)
    margin = float(np.abs(codes - np.floor(codes) - 0.5).min())
    return (np.rint(codes) * scale).reshape(x.shape), margin


# An oracle activation within this many codes of a rounding tie may round either way in our
# float32 sums (they differ from torch's by an ulp or so); one such code flipped moved the
# logits by up to 0.011 of the max (Q5_0, Q3_K_S files), so those runs get TIE_REL.
TIE_MARGIN, TIE_REL = 1e-4, 0.02


@pytest.mark.skipif(
    not has_int8_dot(resolve_target("cpu").target()), reason="gguf-a8 needs an x86 CPU with AVX2"
)
@pytest.mark.parametrize(
    "key", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_S", "Q2_K"]
)
def test_gguf_a8_computes_the_blocks_with_int8_activations(key, gguf_file, llama, tmp_path):
    """`--quant gguf-a8`: the file's Q4_0 / Q4_1 / Q5_0 / Q5_1 / K-quant / Q8_0 tensors kept as
    their codes and scales, computed with int8 activations (the K-quant files' tied table,
    Q6_K, too: gathered and, as the head, through the int8 kernel). Oracles: transformers on
    the file's dequantized weights with every such linear's input rounded to int8 (float32
    rounding apart, and codes at ties: TIE_MARGIN), and llama.cpp on the file (same bound and
    top-1 agreement as the blocks)."""
    import torch

    path = gguf_file(key)
    llm = relaxlm.LLM(str(path), quant="gguf-a8")
    q = llm.manifest.quantization
    assert q["scheme"] == "gguf-a8" and q["activations"] == "int8", q
    types = load_gguf(path).stored_types
    repacked = {name.removesuffix(".weight") for name, t in types.items() if t in A8_REPACKS}
    assert {A8_REPACKS[t].name for t in types.values() if t in A8_REPACKS} <= set(q["tensors"])
    # no blocks left but Q2_K's (the kernel takes one min per 32 values, Q2_K has one per 16)
    assert not [t for t in q["tensors"] if t.startswith("gguf-") and t != "gguf-q2_k"], q
    assert ("gguf-q2_k" in q["tensors"]) == ("Q2_K" in types.values())
    if FILES[key][0] == "wide":  # a Q6_K tied table: the output head
        assert types["model.embed_tokens.weight"] == "Q6_K", types
        table = {p["name"]: p for p in llm.manifest.params}["model.embed_tokens.weight.q"]
        assert table["shape"][0] % 16 == 0, table  # in row tiles: the head takes the int8 kernel
    if llm.manifest.model_config.get("tie_word_embeddings") and "model.embed_tokens" in repacked:
        repacked.add("lm_head")  # transformers' name for the matmul by the tied table

    margins = []

    def int8_inputs(name, x):
        if name not in repacked:
            return x
        rounded, margin = _int8_rounded(x.numpy())
        margins.append(margin)
        return torch.from_numpy(rounded)

    folder = _dequantized_hf_folder(path, tmp_path / "dequantized")
    for prefill in (len(TOKENS), 4):
        margins.clear()
        ours = llm.score(TOKENS, prefill=prefill)
        theirs = hf_logits(folder, TOKENS, prefill, linear_input=int8_inputs)
        bound = 1e-4 if min(margins) > TIE_MARGIN else TIE_REL
        assert _rel(ours, theirs) < bound, (key, prefill, _rel(ours, theirs), min(margins))
    ours = llm.score(TOKENS, prefill=1, every_token=False)
    theirs = _llama_cpp_logits(llama(key), TOKENS)
    print(f"gguf-a8 {key}: max |logit diff| / max |logit| vs llama.cpp = {_rel(ours, theirs):.4f}")
    assert _rel(ours, theirs) < LLAMA_CPP_REL_QUANT
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75


@pytest.mark.skipif(
    int8_dot_flavour(resolve_target("cpu").target()) != "avx512vnni",
    reason="compares with this CPU's AVX-512 VNNI artifact",
)
@pytest.mark.parametrize("key", ["Q8_0", "Q4_K_M"])
def test_gguf_a8_built_for_an_avx2_cpu_equals_the_vnni_artifact(key, gguf_file):
    """`--target cpu:haswell`: gguf-a8 built for an AVX2 CPU (this one runs its code) takes the
    emulated int8 dot product, whose integer sums equal VNNI's: the logits equal this CPU's
    artifact's but for the float kernels' vector widths (ymm against zmm sums). Q8_0: int8
    weights, the case an emulation that saturated would get wrong; Q4_K_M: Q4_K and Q6_K."""
    path = gguf_file(key)
    vnni = relaxlm.LLM(str(path), quant="gguf-a8")
    avx2 = relaxlm.LLM(str(path), quant="gguf-a8", target="cpu:haswell")
    assert avx2.manifest.targets["cpu"]["tvm_target"]["mcpu"] == "haswell"
    for prefill in (len(TOKENS), 4):
        ours, theirs = avx2.score(TOKENS, prefill=prefill), vnni.score(TOKENS, prefill=prefill)
        assert _rel(ours, theirs) < 1e-5, (key, prefill, _rel(ours, theirs))


def test_gguf_a8_needs_blocks_it_repacks(gguf_file, checkpoints):
    """A file without blocks that gguf-a8 repacks, or a safetensors folder: one error."""
    for model in (gguf_file("F16"), checkpoints("llama_gqa")):
        with pytest.raises(RelaxlmError, match="gguf-a8 repacks a GGUF file's"):
            relaxlm.compile(model, output=Path(model).parent / "never", quant="gguf-a8")


def test_blocks_are_copied_not_requantized(gguf_file, gguf_llm):
    """A Q4_K_M file keeps each tensor in its own type; the artifact holds the file's bytes."""
    llm = gguf_llm("Q4_K_M")
    manifest = Manifest.read(llm.artifact)
    kept = manifest.quantization["tensors"]
    assert kept.get("gguf-q4_k") and kept.get("gguf-q6_k"), kept
    index = weight_index(llm.artifact, manifest)
    reader = gguf.GGUFReader(str(gguf_file("Q4_K_M")))
    blocks = {
        hf_name(t.name): t.data.reshape(t.shape[-1], -1)
        for t in reader.tensors
        if t.tensor_type.name in GGUF_SCHEMES
    }
    checked = 0
    for stored in index:
        if not stored.endswith(".q"):
            continue
        # fuse_parallel_linear stores weights that share an input as one, rows concatenated
        names = _fused_members(stored.removesuffix(".q"))
        if any(n not in blocks or "q_proj" in n or "k_proj" in n for n in names):
            continue  # q/k rows are un-permuted; the GGUF tests compare their logits
        expected = np.concatenate([blocks[n] for n in names], axis=0)
        np.testing.assert_array_equal(read(index[stored]), expected)
        checked += 1
    assert checked >= 3, checked


def test_requested_scheme_requantizes_the_blocks(gguf_file, tmp_path):
    """`quant="q8"` on a Q4_1 file converts every block tensor (it was once recorded in the
    manifest and ignored): dequantized exactly, then quantized as a float checkpoint is. So the
    artifact's weights are those of the file's weights dequantized by gguf-py and compiled with
    q8, and the manifest says what was converted."""
    source = gguf_file("Q4_1")
    floats = _dequantized_hf_folder(source, tmp_path / "dequantized")
    ours = relaxlm.compile(source, output=tmp_path / "gguf-q8", quant="q8", progress=False)
    reference = relaxlm.compile(floats, output=tmp_path / "hf-q8", quant="q8", progress=False)
    quantization = Manifest.read(ours).quantization
    blocks: dict[str, int] = {}  # llama.cpp keeps a tensor or two in Q8_0 in a Q4_1 file
    for t in gguf.GGUFReader(str(source)).tensors:
        if t.tensor_type.name in GGUF_SCHEMES:
            blocks[t.tensor_type.name] = blocks.get(t.tensor_type.name, 0) + 1
    assert quantization["scheme"] == "q8"
    assert quantization["requantized_from"] == blocks and blocks["Q4_1"] > 1
    assert not [name for name in quantization["tensors"] if name.startswith("gguf-")]
    ours_index = weight_index(ours, Manifest.read(ours))
    reference_index = weight_index(reference, Manifest.read(reference))
    assert list(ours_index) == list(reference_index)
    for name, stored in ours_index.items():
        np.testing.assert_array_equal(read(stored), read(reference_index[name]), err_msg=name)


def _fused_members(name: str) -> list[str]:
    """a.q_proj+k_proj.weight -> [a.q_proj.weight, a.k_proj.weight]."""
    if "+" not in name:
        return [name]
    first, *middle, last = name.split("+")
    head, first = first.rsplit(".", 1)
    last, tail = last.split(".", 1)
    return [f"{head}.{m}.{tail}" for m in (first, *middle, last)]


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(gguf_file):
    config = load_checkpoint(gguf_file("llama3-rope-F16")).config
    got = config["rope_scaling"]
    assert got["rope_type"] == "llama3"
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        assert got[key] == pytest.approx(LLAMA3_ROPE[key], rel=1e-4), key


def test_gguf_loads_through_load_checkpoint(gguf_file):
    checkpoint = load_checkpoint(gguf_file("qwen2-Q8_0"))
    assert checkpoint.architecture == "Qwen2ForCausalLM"
    assert checkpoint.config["tie_word_embeddings"] is True
    assert "model.layers.0.self_attn.q_proj.bias" in checkpoint.tensors
    assert {p.name for p in checkpoint.tokenizer_files} >= {
        "tokenizer.json",
        "tokenizer_config.json",
    }


# -- refusals ------------------------------------------------------------------------------


def _writer(path: Path, arch: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_context_length(64)
    writer.add_feed_forward_length(256)
    writer.add_layer_norm_rms_eps(1e-5)
    return writer


def _close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = _writer(path, "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 256), np.float32))
    _close(writer)
    with pytest.raises(RelaxlmError, match="architecture 'falcon' is not supported"):
        load_checkpoint(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq4_nl.gguf"
    writer = _writer(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 256), np.float32))
    iq4_nl = gguf.GGMLQuantizationType.IQ4_NL
    raw = np.zeros((4, gguf.GGML_QUANT_SIZES[iq4_nl][1] * 8), np.uint8)  # 4 rows of 8 blocks
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=iq4_nl)
    _close(writer)
    with pytest.raises(RelaxlmError, match=r"blk\.0\.attn_q\.weight \(IQ4_NL\)"):
        load_checkpoint(path)
