"""GGUF tokenizers rebuilt as tokenizer.json encode exactly as llama.cpp does.

The oracle is llama-cpp-python's `tokenize(text, add_bos=True, special=True)` (BOS as the
file's metadata says, special tokens parsed in text) on real vocabulary-only GGUF files from
the llama-cpp-python source distribution (fetched with pip once per session, not committed):
SentencePiece (llama-spm, phi-3) and byte-level BPE with several pre-tokenizers (llama-bpe,
qwen2, gpt-2, starcoder, command-r); and on SmolLM2's own vocabulary (test_default_model.py
holds the model). Strings: llama.cpp's own tokenizer test inputs plus a few hundred of ours.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import llama_cpp
import pytest
from hf_models import SPECIAL_TOKENS

from relaxlm.errors import RelaxlmError
from relaxlm.frontends.gguf import read_metadata
from relaxlm.frontends.gguf_tokenizer import write_tokenizer
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.testing.tiny_models import corpus

SPM_VOCABS = ["llama-spm", "phi-3"]
BPE_VOCABS = ["llama-bpe", "qwen2", "gpt-2", "starcoder", "command-r"]
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """vendor/llama.cpp/models of the llama-cpp-python sdist matching the installed version."""
    root = tmp_path_factory.mktemp("llama-cpp-sdist")
    spec = f"llama-cpp-python=={llama_cpp.__version__}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    proc = subprocess.run([*cmd, spec, "-d", str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip could not fetch the {spec} sdist (its vocab files):\n{proc.stderr}")
    (archive,) = root.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/models/ggml-vocab-" in m.name]
        tar.extractall(root, members=members, filter="data")
    (models,) = root.glob("*/vendor/llama.cpp/models")
    return models


def _strings(extra_file: Path | None = None) -> list[str]:
    """A few hundred varied strings: unicode, whitespace runs, digits, code, special tokens."""
    texts = corpus(240, seed=7)
    texts += [
        "",
        " ",
        "  ",
        "   \n\n  ",
        "\t",
        "\t\t x",
        "\n",
        "\r\n",
        "a\r\nb",
        "trailing   ",
        "   leading",
        "multiple    inner     spaces",
        "12345678901234567890",
        "3.14159 2,718 1e-9 0x1F",
        "I'm you're we'll they'd it's DON'T",
        "ÄÖÜ äöü ß Ærø",
        "🙂🙂🙂 🦙.cpp",
        "日本語のテキストと中文和한국어",
        "नमस्ते दुनिया",
        "مرحبا بالعالم",
        "\u00a0non-breaking\u2009thin\u200bzero-width",
        "tabs\tand\tnewlines\nmixed \n\t end",
        "<s>",
        "</s>",
        "<unk>",
        "<s>hello</s>",
        "a<s>b",
        " <s> spaced </s> ",
        "<|endoftext|>",
        "x<|endoftext|>y",
        "<|im_start|>user\nhi<|im_end|>\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "$100,000.00 and 50% off!!!",
        "==> --> <== ... ;;; ///",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "URL: https://example.com/path?q=1&r=2#frag",
        *[" " * n + "x" for n in range(1, 6)],
        *["x" + "\n" * n for n in range(1, 5)],
        *SPECIAL_TOKENS,
    ]
    if extra_file is not None and extra_file.is_file():
        texts += extra_file.read_text(encoding="utf-8").split(TEST_SEPARATOR)
    return texts


def _check_parity(gguf_path: Path, tmp_path: Path, texts: list[str]) -> None:
    folder = tmp_path / "tokenizer"
    write_tokenizer(read_metadata(gguf.GGUFReader(str(gguf_path))), folder)
    ours = Tokenizer.from_dir(folder, model_config={})
    oracle = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    mismatches = []
    for text in texts:
        expected = oracle.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        got = ours.encode(text)
        if got != expected:
            mismatches.append((text, got[:16], expected[:16]))
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"
    assert len(texts) >= 250


@pytest.mark.parametrize("vocab", SPM_VOCABS + BPE_VOCABS)
def test_ids_equal_llama_cpp(vocab, vocab_dir, tmp_path):
    path = vocab_dir / f"ggml-vocab-{vocab}.gguf"
    _check_parity(path, tmp_path, _strings(vocab_dir / f"ggml-vocab-{vocab}.gguf.inp"))


def test_smollm2_vocabulary_equals_llama_cpp(tmp_path):
    from relaxlm.default_model import default_model

    _check_parity(default_model(), tmp_path, _strings())


def test_special_tokens_bos_and_template(vocab_dir, tmp_path):
    metadata = read_metadata(gguf.GGUFReader(str(vocab_dir / "ggml-vocab-llama-spm.gguf")))
    metadata["tokenizer.chat_template"] = "{{ bos_token }}{{ messages[0]['content'] }}"
    write_tokenizer(metadata, tmp_path)
    tok = Tokenizer.from_dir(tmp_path, model_config={})
    assert tok.bos_token == "<s>" and tok.bos_token_id == 1
    assert tok.encode("hi")[0] == 1  # add_bos: SentencePiece files default to it
    assert tok.chat_template == metadata["tokenizer.chat_template"]
    assert 2 in tok.eos_token_ids  # </s>
    assert tok.decode(tok.encode(" Hello  world")) == " Hello  world"


def test_unknown_tokenizer_model_is_named():
    with pytest.raises(RelaxlmError, match="tokenizer model 'rwkv'"):
        write_tokenizer(
            {"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, Path("/x")
        )
