"""A GGUF file's tokenizer (tokenizer.ggml.* metadata) rebuilt as a `tokenizers` tokenizer.json,
with tokenizer_config.json and generation_config.json, so the runtime loads it like any HF one.

The rebuilt tokenizer encodes as llama.cpp's `llama_tokenize(text, add_special=True,
parse_special=True)` does (src/llama-vocab.cpp):
- "llama" (SentencePiece): llama.cpp merges the adjacent pair whose union is the vocabulary
  token of highest score; a BPE whose merges are every split of every token, ranked by the
  merged token's score, does the same (transformers' SentencePieceExtractor builds it so).
  A space is prepended to each text piece (add_space_prefix), spaces become "▁", characters
  outside the vocabulary fall back to <0xXX> byte tokens.
- "gpt2" (byte-level BPE): the file's merges, and llama.cpp's pre-tokenizer regexes for
  `tokenizer.ggml.pre`, applied in turn as Split pre-tokenizers.
Special tokens are those llama.cpp parses in text: control, user-defined and unknown types,
and the end-of-generation names it recognises.
"""

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from relaxlm.errors import RelaxlmError

# gguf.TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp marks as control tokens whatever their type in the file
# (llama-vocab.cpp): the end-of-generation and end-of-turn names, and fill-in-the-middle names.
# (llama.cpp keeps gemma4's and plamo's "</s>" normal; those families are not read here.)
_EOG_TEXTS = frozenset(
    "<|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn> "
    "<|endoftext|> </s> <|eom_id|> <EOT> _<EOT> [EOT] [EOS] <|end_of_text|> <end_of_utterance> "
    "<eos> <turn|> <|tool_response> [e~[ <｜end▁of▁sentence｜>".split()
)
_FIM_TEXTS = frozenset(
    "<|fim_prefix|> <fim-prefix> <fim_prefix> <｜fim▁begin｜> <PRE> ▁<PRE> <|code_prefix|> "
    "<|prefix|> <|fim_suffix|> <fim-suffix> <fim_suffix> <｜fim▁hole｜> <SUF> ▁<SUF> "
    "<|code_suffix|> <|suffix|> <|fim_middle|> <fim-middle> <fim_middle> <｜fim▁end｜> <MID> "
    "▁<MID> <|code_middle|> <|middle|> <|fim_pad|> <fim-pad> <fim_pad> <PAD> [PAD] "
    "<|fim_repo|> <|repo_name|> <fim-repo> <REPO> <reponame> <|file_sep|>".split()
)

# llama.cpp's pre-tokenizer regexes (llm_tokenizer_bpe), by pre-tokenizer type.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]


def _pre(regexes: list[str], ignore_merges: bool = False, add_bos: bool = False) -> dict:
    return {"regexes": regexes, "ignore_merges": ignore_merges, "add_bos": add_bos}


# tokenizer.ggml.pre -> regexes, and the defaults llama.cpp sets for that type.
PRE_TOKENIZERS: dict[str, dict] = {
    **dict.fromkeys(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2".split(),
        _pre([_LLAMA3], ignore_merges=True, add_bos=True),
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _pre([_LLAMA3])),
    **dict.fromkeys(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de mellum mpt olmo".split(),
        _pre([_GPT2]),
    ),
    **dict.fromkeys(
        "qwen2 deepseek-r1-qwen megrez stablelm2".split(),
        _pre([_QWEN2]),
    ),
    **dict.fromkeys(
        "smollm starcoder refact command-r codeshell exaone minerva-7b".split(),
        _pre([r"\p{N}", _GPT2]),
    ),
    "default": _pre(_DEFAULT),
}


def write_tokenizer(metadata: dict[str, Any], folder: Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json to `folder`."""
    vocab = GGUFVocab(metadata)
    tokenizer = vocab.tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(vocab.tokenizer_config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(vocab.generation_config(), indent=2))
    return [
        folder / n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    ]


class GGUFVocab:
    """The tokenizer.ggml.* metadata, read once, and what it builds."""

    def __init__(self, metadata: dict[str, Any]):
        self.model = metadata.get("tokenizer.ggml.model")
        if self.model not in ("llama", "gpt2"):
            raise RelaxlmError(
                f"GGUF tokenizer model {self.model!r} is not supported; supported: llama "
                "(SentencePiece) and gpt2 (byte-level BPE)"
            )
        self.metadata = metadata
        tokens = list(metadata["tokenizer.ggml.tokens"])
        # llama.cpp renames empty tokens so every id has a text
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(self.tokens)
        self.types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * n)
        self.scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * n)
        self.pre = metadata.get("tokenizer.ggml.pre") or "default"
        if self.model == "gpt2" and self.pre not in PRE_TOKENIZERS:
            raise RelaxlmError(
                f"GGUF pre-tokenizer {self.pre!r} is not supported; supported: "
                + ", ".join(sorted(PRE_TOKENIZERS))
            )
        spm = self.model == "llama"
        self.add_bos = bool(
            metadata.get(
                "tokenizer.ggml.add_bos_token",
                spm or PRE_TOKENIZERS.get(self.pre, {}).get("add_bos"),
            )
        )
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", spm))
        default_ids = {"bos": 1, "eos": 2, "unknown": 0} if spm else {"bos": 11, "eos": 11}
        self.ids = {
            name: metadata.get(f"tokenizer.ggml.{name}_token_id", default_ids.get(name))
            for name in ("bos", "eos", "unknown", "padding", "eot", "eom")
        }

    # -- the tokenizer ----------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        if self.model == "llama":
            tokenizer = self._spm()
        else:
            tokenizer = self._bpe()
        tokenizer.add_special_tokens(self._added_tokens())
        tokenizer.post_processor = self._post_processor()
        return tokenizer

    def _vocab(self) -> dict[str, int]:
        # A text listed twice maps to its last id, as llama.cpp's token_to_id does.
        return {t: i for i, t in enumerate(self.tokens)}

    def _spm(self) -> Tokenizer:
        vocab = self._vocab()
        unk_id = self.ids["unknown"]
        unk = self.tokens[unk_id] if unk_id is not None and unk_id < len(self.tokens) else None
        model = models.BPE(
            vocab=vocab,
            merges=spm_merges(self.tokens, self.scores, vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
        tokenizer = Tokenizer(model)
        steps = [normalizers.Prepend("▁")] if self.add_space_prefix else []
        tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = None
        strip = [decoders.Strip(" ", 1, 0)] if self.add_space_prefix else []
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
        return tokenizer

    def _bpe(self) -> Tokenizer:
        pre = PRE_TOKENIZERS[self.pre]
        merges = []
        for merge in self.metadata.get("tokenizer.ggml.merges") or []:
            cut = merge.find(" ", 1)  # as llama.cpp splits them
            merges.append((merge[:cut], merge[cut + 1 :]) if cut >= 0 else (merge, ""))
        model = models.BPE(vocab=self._vocab(), merges=merges, ignore_merges=pre["ignore_merges"])
        tokenizer = Tokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre["regexes"]]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    def special_ids(self) -> list[int]:
        """Ids llama.cpp matches in text before tokenizing (its special-tokens cache)."""
        return [
            i
            for i, (t, kind) in enumerate(zip(self.tokens, self.types, strict=False))
            if kind in (CONTROL, USER_DEFINED, UNKNOWN) or t in _EOG_TEXTS | _FIM_TEXTS
        ]

    def _added_tokens(self) -> list[AddedToken]:
        # User-defined tokens are matched in text but are not "special" (they are not skipped
        # when decoding), as in transformers.
        rstrip = self._rstrip_texts()
        return [
            AddedToken(
                self.tokens[i],
                special=self.types[i] != USER_DEFINED,
                normalized=False,
                rstrip=self.tokens[i] in rstrip,
            )
            for i in self.special_ids()
        ]

    def _rstrip_texts(self) -> set[str]:
        """Special tokens that swallow the whitespace after them: llama.cpp sets this by model
        name, for Phi-3 only (all special tokens but <unk>, <s> and <|endoftext|>)."""
        name = str(self.metadata.get("general.name", "")).lower()
        if "phi-3" not in name and "phi3" not in name:
            return set()
        texts = {self.tokens[i] for i in self.special_ids()} | {"</s>"}
        return texts - {"<unk>", "<s>", "<|endoftext|>"}

    def _post_processor(self):
        single, special = "$A", []
        for name, add, where in (("bos", self.add_bos, "front"), ("eos", self.add_eos, "back")):
            token_id = self.ids[name]
            if not add or token_id is None:
                continue
            token = self.tokens[token_id]
            single = f"{token} {single}" if where == "front" else f"{single} {token}"
            special.append((token, token_id))
        pair = single.replace("$A", "$A $B:1")
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- configs ---------------------------------------------------------------------------

    def eog_ids(self) -> list[int]:
        """End-of-generation ids: eos, eot, eom and the texts llama.cpp stops at."""
        ids = [self.ids[n] for n in ("eos", "eot", "eom") if self.ids[n] is not None]
        ids += [i for i, t in enumerate(self.tokens) if t in _EOG_TEXTS]
        return sorted(set(ids))

    def _text(self, name: str) -> str | None:
        token_id = self.ids[name]
        return (
            self.tokens[token_id] if token_id is not None and token_id < len(self.tokens) else None
        )

    def tokenizer_config(self) -> dict[str, Any]:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._text("bos"),
            "eos_token": self._text("eos"),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if self.model == "llama" and self._text("unknown") is not None:
            config["unk_token"] = self._text("unknown")
        if self._text("padding") is not None:
            config["pad_token"] = self._text("padding")
        template = self.metadata.get("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        return {k: v for k, v in config.items() if v is not None}

    def generation_config(self) -> dict[str, Any]:
        config = {"eos_token_id": self.eog_ids()}
        if self.ids["bos"] is not None:
            config["bos_token_id"] = self.ids["bos"]
        return config


def spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple]:
    """Every split (left, right) of every token into two tokens, highest merged score first.

    Ties keep token order, then the parts' ids (transformers' SentencePieceExtractor).
    """
    merges = []
    for token_id, token in enumerate(tokens):
        local = [
            (vocab[token[:i]], vocab[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort()
        merges.extend((-scores[token_id], left, right) for _, _, left, right in local)
    merges.sort(key=lambda m: m[0])  # stable: ties stay in token order
    return [(left, right) for _, left, right in merges]
