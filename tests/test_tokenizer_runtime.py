"""relaxlm.runtime.tokenizer against `transformers.AutoTokenizer` on tiny trained tokenizers.

"bpe" is byte-level BPE (GPT-2 / Qwen / Llama 3 style, no BOS); "spm" is Llama / Mistral style
(Metaspace, byte-fallback BPE, `<s>` added by tokenizer.json's post-processor).
"""

import ast
import json
import random
import sys
from pathlib import Path

import pytest
import tokenizers
import transformers
from hf_models import make_tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two  spaces\n\nand a newline\tand a tab",
    "",
    " ",
    "Mixed unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語, 中文, 한국어.",
    "Emoji: 🙂 🚀 ✨ 👩‍👩‍👧 and arrows → ←",
    "<s>special</s> tokens <|im_start|>user\nhi<|im_end|>",
    "a<|im_start|>b",
    "def f(x): return x * 2 + 1  # code",
    "[INST] What is 2 + 2? [/INST]",
]

# Llama 2 / Mistral v0.1 as converted by transformers 4: the "▁" prefix is a normalizer.
LLAMA2_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}


def make_folder(
    path: Path,
    kind: str | None,
    config: dict | None = None,
    model_config: dict | None = None,
    edit_json=None,
    files: dict[str, str] | None = None,
) -> Path:
    """A tokenizer folder; `config` updates tokenizer_config.json (None deletes a key).

    kind: "bpe" or "spm" for make_tokenizer; None edits the tokenizer already in `path`.
    """
    if kind is not None:
        make_tokenizer(path, kind=kind)
    config_path = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    for key, value in (config or {}).items():
        if value is None:
            tokenizer_config.pop(key, None)
        else:
            tokenizer_config[key] = value
    config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False))
    if edit_json is not None:
        tokenizer_json = json.loads((path / "tokenizer.json").read_text())
        edit_json(tokenizer_json)
        (path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    if model_config is not None:
        (path / "config.json").write_text(json.dumps(model_config))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def assert_matches_transformers(folder: Path) -> Tokenizer:
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_dir(folder)
    for text in TEXTS:
        for add in (True, False):
            expected = hf(text, add_special_tokens=add)["input_ids"]
            assert ours.encode(text, add_special_tokens=add) == expected, (text, add)

    rng = random.Random(0)
    sequences = [hf(text)["input_ids"] for text in TEXTS]
    sequences += [[rng.randrange(len(hf)) for _ in range(rng.randint(1, 24))] for _ in range(200)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)

    assert ours.vocab_size == len(hf)
    assert (ours.bos_token, ours.bos_token_id) == (hf.bos_token, hf.bos_token_id)
    assert ours.eos_token == hf.eos_token
    assert ours.special_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}
    return ours


def qwen2_pipeline(tokenizer_json):
    """Qwen2's tokenizer.json text pipeline, which Qwen2Tokenizer.__init__ rebuilds as is."""
    tokenizer_json["normalizer"] = {"type": "NFC"}
    split = {
        "type": "Split",
        "pattern": {"Regex": PRETOKENIZE_REGEX},
        "behavior": "Isolated",
        "invert": False,
    }
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    tokenizer_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}


# (kind, tokenizer_config updates, config.json, tokenizer.json edit). Classes whose __init__
# rebuilds the pipeline (Qwen2Tokenizer, GPT2Tokenizer) are paired with the pipeline their
# checkpoints ship; only LlamaTokenizer's rebuild differs from its checkpoints' tokenizer.json.
CASES = {
    "bpe": ("bpe", {}),
    "bpe_add_bos_token": ("bpe", {"add_bos_token": True}),
    "bpe_add_bos_and_eos_token": ("bpe", {"add_bos_token": True, "add_eos_token": True}),
    "bpe_llama_class": ("bpe", {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True}),
    "bpe_qwen2_class": (
        "bpe",
        {"tokenizer_class": "Qwen2TokenizerFast", "pad_token": "</s>"},
        None,
        qwen2_pipeline,
    ),
    "bpe_gpt2_class": ("bpe", {"tokenizer_class": "GPT2TokenizerFast"}),
    "spm": ("spm", {}),
    "spm_add_bos_token_false": ("spm", {"add_bos_token": False}),
    "spm_add_eos_token": ("spm", {"add_eos_token": True}),
    "spm_llama_class": ("spm", {"tokenizer_class": "LlamaTokenizerFast"}),
    "spm_llama_legacy": ("spm", {"tokenizer_class": "LlamaTokenizerFast", "legacy": True}),
    "spm_llama_no_prefix_space": (
        "spm",
        {"tokenizer_class": "LlamaTokenizerFast", "add_prefix_space": False},
    ),
    "spm_preTrained_class": ("spm", {"tokenizer_class": "PreTrainedTokenizerFast"}),
    "spm_clean_up_spaces": ("spm", {"clean_up_tokenization_spaces": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(tmp_path, case):
    assert_matches_transformers(make_folder(tmp_path, *CASES[case]))


@pytest.mark.parametrize("legacy", [None, False, True])
@pytest.mark.parametrize("model_type", [None, "llama", "mistral"])
def test_llama2_style_tokenizer_json(tmp_path, legacy, model_type):
    """A transformers-4 Llama 2 folder: transformers 5 rebuilds it unless the model is Mistral."""

    def llama2(tokenizer_json):
        tokenizer_json["normalizer"] = LLAMA2_NORMALIZER
        tokenizer_json["pre_tokenizer"] = None

    config = {"tokenizer_class": "LlamaTokenizerFast", "legacy": legacy}
    model_config = None if model_type is None else {"model_type": model_type}
    folder = make_folder(tmp_path, "spm", config, model_config, edit_json=llama2)
    assert_matches_transformers(folder)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("how", ["not_special_in_json", "missing_from_json"])
def test_config_special_tokens_are_registered(tmp_path, kind, how):
    """eos / extra special tokens named in tokenizer_config.json, not special in tokenizer.json."""

    def demote(tokenizer_json):
        chat_tokens = ("<|im_start|>", "<|im_end|>")
        if how == "missing_from_json":
            added = tokenizer_json["added_tokens"]
            tokenizer_json["added_tokens"] = [t for t in added if t["content"] not in chat_tokens]
        else:
            for token in tokenizer_json["added_tokens"]:
                token["special"] = token["special"] and token["content"] not in chat_tokens

    config = {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    folder = make_folder(tmp_path, kind, config, edit_json=demote)
    ours = assert_matches_transformers(folder)
    assert ours.eos_token_ids == (ours.token_to_id("<|im_end|>"),)


@pytest.mark.parametrize("clean_up", [False, True])
def test_unigram_with_clean_up_spaces(tmp_path, clean_up):
    """transformers' clean_up_tokenization_spaces applies to non-BPE models only."""
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 20 + ["I can't , isn't it ? yes !"] * 20, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path)
    make_folder(tmp_path, None, {"clean_up_tokenization_spaces": clean_up})
    ours = assert_matches_transformers(tmp_path)
    text = "I can't , isn't it ?"
    assert ours.decode(ours.encode(text)) == ("I can't, isn't it?" if clean_up else text)


def test_eos_token_ids_sources(tmp_path):
    generation_config = {"generation_config.json": '{"eos_token_id": [2, 4]}'}
    folder = make_folder(tmp_path, "bpe", files=generation_config)
    assert Tokenizer.from_dir(folder).eos_token_ids == (2, 4)
    (folder / "generation_config.json").unlink()
    assert Tokenizer.from_dir(folder).eos_token_ids == (2,)  # tokenizer_config's "</s>"
    (folder / "config.json").write_text('{"eos_token_id": 4}')
    assert Tokenizer.from_dir(folder).eos_token_ids == (4,)
    assert Tokenizer.from_dir(folder, model_config={"eos_token_id": [3, 4]}).eos_token_ids == (3, 4)
    make_folder(folder, "bpe", {"eos_token": None})
    (folder / "config.json").unlink()
    assert Tokenizer.from_dir(folder).eos_token_ids == ()


def test_chat_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    folder = make_folder(tmp_path, "spm", {"chat_template": named})
    assert Tokenizer.from_dir(folder).chat_template == "D"

    (folder / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert Tokenizer.from_dir(folder).chat_template == hf.chat_template
    assert hf.chat_template == "J{{ messages[0].content }}"

    folder = make_folder(tmp_path / "none", "spm", {"chat_template": None})
    assert Tokenizer.from_dir(folder).chat_template is None


def test_special_tokens_map_json_is_read_when_config_has_none(tmp_path):
    folder = make_folder(tmp_path, "spm", {"bos_token": None, "eos_token": None, "unk_token": None})
    special_tokens_map = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    ours = Tokenizer.from_dir(folder)
    assert (ours.bos_token, ours.bos_token_id, ours.eos_token) == ("<s>", 1, "</s>")


def test_missing_or_broken_files_raise(tmp_path):
    with pytest.raises(RelaxlmError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    folder = make_folder(tmp_path, "bpe", files={"generation_config.json": "{not json"})
    with pytest.raises(RelaxlmError, match="generation_config.json is not valid JSON"):
        Tokenizer.from_dir(folder)


RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
ALLOWED_IMPORTS = {"numpy", "tokenizers", "jinja2", "relaxlm"}


@pytest.mark.parametrize("module", ["tokenizer", "detokenizer", "sampler", "chat_template"])
def test_runtime_text_modules_import_no_compiler_or_transformers(module):
    tree = ast.parse((RUNTIME / f"{module}.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    for name in names:
        top = name.split(".")[0]
        assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, name
        if top == "relaxlm":
            assert name == "relaxlm.errors" or name.startswith("relaxlm.runtime"), name
