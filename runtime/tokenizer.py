"""The checkpoint's tokenizer, loaded the way `transformers` 5 loads it, without `transformers`.

`tokenizer.json` is the pipeline (normalizer, pre-tokenizer, model, post-processor, decoder);
`tokenizer_config.json` names the special tokens and holds the chat template; the eos ids come
from `generation_config.json`, else the model's `config.json`. Two transformers-5 rules matter
for exact ids:

- `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored whenever tokenizer.json
  exists: its post-processor alone decides which special tokens `encode` adds.
- A `LlamaTokenizer` checkpoint (not byte-level) gets its normalizer, pre-tokenizer and decoder
  rebuilt from `legacy` / `add_prefix_space` (see `_llama_pipeline`), unless its model type is
  one transformers loads as plain tokenizer.json.
"""

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend

from relaxlm.errors import RelaxlmError

# Named special tokens: special even where tokenizer.json lists them as plain added tokens.
_NAMED_SPECIAL_TOKENS = tuple(
    f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
)

# Model types that ship a `LlamaTokenizer` tokenizer_class but that transformers 5 loads as plain
# tokenizer.json (its auto/tokenization_auto.py maps them to TokenizersBackend).
_PLAIN_JSON_MODEL_TYPES = frozenset(
    "mistral mixtral ministral ministral3 mistral3 pixtral phi3 phi3_v phimoe internlm2 internlm3 "
    "jamba minicpm3 nemotron llava llava_next vipllava persimmon stablelm".split()
)


class Tokenizer:
    """Encodes text to ids and decodes ids to text exactly as `transformers.AutoTokenizer` does."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.special_ids = frozenset(
            i for i, token in backend.get_added_tokens_decoder().items() if token.special
        )
        # transformers applies this clean-up only to non-BPE models (it corrupts BPE text).
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    @classmethod
    def from_dir(cls, path: str | os.PathLike, model_config: dict | None = None) -> "Tokenizer":
        """Load tokenizer.json and the optional config files from a checkpoint or artifact folder.

        model_config: the model's config.json; read from `path` when not given.
        """
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise RelaxlmError(
                f"{path} has no tokenizer.json; relaxlm needs the fast (`tokenizers`) format. "
                "Convert it with transformers: "
                "AutoTokenizer.from_pretrained(...).save_pretrained(...)"
            )
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot read
            raise RelaxlmError(
                f"{path / 'tokenizer.json'} is not a tokenizer the `tokenizers` library reads "
                f"({e}); fix or re-download the file, or recompile the model"
            ) from e
        # transformers truncates and pads only when a call asks; tokenizer.json may ask always
        # (all-MiniLM-L6-v2's pads every text to 128 tokens).
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        if not any(k in config for k in (*_NAMED_SPECIAL_TOKENS, "added_tokens_decoder")):
            config = {**_read_json(path / "special_tokens_map.json"), **config}  # legacy layout
        if model_config is None:
            model_config = _read_json(path / "config.json")

        if _uses_llama_pipeline(path / "tokenizer.json", config, model_config):
            _llama_pipeline(backend, config)
        _add_special_tokens(backend, config)

        bos, eos = _content(config.get("bos_token")), _content(config.get("eos_token"))
        eos_ids = _eos_ids(_read_json(path / "generation_config.json"), model_config)
        if not eos_ids and eos is not None and backend.token_to_id(eos) is not None:
            eos_ids = (backend.token_to_id(eos),)
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=eos_ids,
            chat_template=_chat_template(path, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (`len(hf_tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens (BOS) tokenizer.json's post-processor adds.

        Pass add_special_tokens=False for text rendered by a chat template, which has its own BOS.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RelaxlmError(f"{path} is not valid JSON ({e}); fix or re-download the file") from e


def _content(token: str | dict | None) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _eos_ids(generation_config: dict, model_config: dict) -> tuple[int, ...]:
    for source in (generation_config, model_config):
        eos = source.get("eos_token_id")
        if eos is not None:
            return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return ()


def _chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def _add_special_tokens(backend: Backend, config: dict) -> None:
    """Register the config's special tokens the way transformers 5 does on load.

    Named ones (bos, eos, ...) become special even if tokenizer.json has them as plain added
    tokens; `added_tokens_decoder` entries and extra special tokens are added only if missing.
    """
    existing = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    tokens = []
    for key in _NAMED_SPECIAL_TOKENS:
        content = _content(config.get(key))
        if content is None:
            continue
        old = existing.get(content)
        flags = {"normalized": False}
        if old is not None:
            flags = {a: getattr(old, a) for a in ("single_word", "lstrip", "rstrip", "normalized")}
        tokens.append(AddedToken(content, special=True, **flags))
    for entry in config.get("added_tokens_decoder", {}).values():
        if entry["content"] not in existing:
            tokens.append(AddedToken(**{k: v for k, v in entry.items() if k != "__type"}))
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = extra.values() if isinstance(extra, dict) else extra
    for token in map(_content, extra):
        if token not in existing:
            tokens.append(AddedToken(token, special=True, normalized=False))
    if tokens:
        backend.add_special_tokens(tokens)


def _uses_llama_pipeline(tokenizer_json: Path, config: dict, model_config: dict) -> bool:
    declared = config.get("tokenizer_class") or model_config.get("tokenizer_class") or ""
    return (
        declared.removesuffix("Fast") == "LlamaTokenizer"
        and model_config.get("model_type") not in _PLAIN_JSON_MODEL_TYPES
        and '"ByteLevel"' not in tokenizer_json.read_text(encoding="utf-8")
    )


def _llama_pipeline(backend: Backend, config: dict) -> None:
    """Rebuild the text pipeline as transformers 5's `LlamaTokenizer.__init__` does.

    It drops tokenizer.json's normalizer (Llama 2's `Prepend("▁")`) for a Metaspace pre-tokenizer
    that prepends "▁" to the first piece only unless `legacy` is true, so " hi" and text after
    a special token tokenize differently from tokenizer.json alone.
    """
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    prepend = "always" if config.get("legacy", False) else "first"
    prepend = prepend if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=prepend, split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop spaces before punctuation and contractions."""
    for piece in (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re"):
        text = text.replace(" " + piece, piece.rstrip())
    return text
