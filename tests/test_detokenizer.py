"""IncrementalDetokenizer: deltas concatenate to the full decode, never with broken UTF-8."""

import json
import random

import pytest
from hf_models import make_tokenizer

from relaxlm.runtime.detokenizer import IncrementalDetokenizer
from relaxlm.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    " leading and  double  spaces\n\nnew paragraph",
    "Mixed unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語, 中文, 한국어.",
    "Emoji: 🙂 🚀 ✨ 👩‍👩‍👧 and arrows → ← ↑ ↓.",
    "<|im_start|>assistant\n日本語のテキスト<|im_end|> after",
    "def f(x): return x * 2 + 1  # a python line",
]


@pytest.fixture(scope="module", params=["bpe", "spm", "spm_llama_legacy"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp(request.param)
    make_tokenizer(folder, kind=request.param.split("_")[0])
    if request.param == "spm_llama_legacy":  # Metaspace prepending "▁" to every piece
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="LlamaTokenizer", legacy=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(folder)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


def assert_streams_like_decode(tokenizer: Tokenizer, ids: list[int], skip=True) -> list[str]:
    deltas = stream(tokenizer, ids, skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full, (ids, deltas, full)
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas), (ids, deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids(tokenizer, skip):
    rng = random.Random(1)
    for _ in range(1500):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
        assert_streams_like_decode(tokenizer, ids, skip)


def test_random_slices_of_real_text(tokenizer):
    """Slices start and end anywhere, so multi-byte characters are cut across tokens."""
    rng = random.Random(2)
    encoded = [tokenizer.encode(text, add_special_tokens=True) for text in TEXTS]
    for ids in encoded:
        assert_streams_like_decode(tokenizer, ids)
    for _ in range(1500):
        ids = rng.choice(encoded)
        start = rng.randrange(len(ids))
        assert_streams_like_decode(tokenizer, ids[start : rng.randint(start + 1, len(ids))])


def test_random_mixtures_of_byte_and_word_tokens(tokenizer):
    """Byte tokens of valid characters interleaved with words, spaces and special tokens."""
    rng = random.Random(3)
    texts = ["日", "🙂", "é", " the", "▁", "\n"]
    pieces = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    pieces += [[2], [4]]
    for _ in range(1500):
        ids = [i for _ in range(rng.randint(1, 10)) for i in rng.choice(pieces)]
        assert_streams_like_decode(tokenizer, ids)


def test_character_split_across_tokens_is_emitted_whole(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is not in these tiny vocabularies
    ids += tokenizer.encode(" ok", add_special_tokens=False)
    deltas = assert_streams_like_decode(tokenizer, ids)
    # Byte-level BPE emits it with its last byte; byte-fallback tokens wait for the run to end.
    first = next(d for d in deltas if d)
    assert first == "🙂" or first.startswith("🙂 ")


def test_words_keep_their_spaces(tokenizer):
    ids = tokenizer.encode("the cat sees the river bank", add_special_tokens=False)
    deltas = assert_streams_like_decode(tokenizer, ids)
    assert "".join(deltas) == "the cat sees the river bank"
    assert sum(d.startswith(" ") for d in deltas) >= 4  # " cat", " sees", ... keep their space


def test_text_is_emitted_before_flush(tokenizer):
    ids = tokenizer.encode("Hello world, this is a test.", add_special_tokens=False)
    deltas = stream(tokenizer, ids)
    assert deltas[-1] == "" and "".join(deltas[:-1]) == "Hello world, this is a test."
