"""Tiny random-weight Hugging Face checkpoints (config, safetensors, tokenizer).

The machine that runs our tests has no model hub, so demos, benchmarks and parity tests build
their own checkpoints; tests (through tests/hf_models.py) and scripts import them from here.
Needs torch and transformers (the `test` extra). From the shell:

    python scripts/make_tiny_model.py OUT_DIR [--arch LlamaForCausalLM] [--tokenizer spm]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GPT2LMHeadModel",
)
# Embedding models: an encoder, and decoder trunks (XModel) used as embedders.
EMBEDDING_ARCHITECTURES = ("BertModel", "LlamaModel", "Qwen2Model", "Qwen3Model")
TOKENIZER_KINDS = ("bpe", "spm")

# The SPM tokenizer's characters: printable ASCII, the Metaspace marker and the accented
# letters and dash the corpus uses often; everything else is spelled in <0xNN> bytes.
SPM_ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F)) + "▁éïüëçñ—"

# Fixed ids: [<unk>=0, <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4] for both tokenizer kinds.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ~140 K parameters: compiles and runs in well under a second.
TINY_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
# ~3.2 M parameters: the CLI's default demo model, still compiles in seconds.
DEMO_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 704,
    "max_position_embeddings": 1024,
}

# Random-weight scales, chosen so max |logit| is ~10 and greedy decoding wanders (>= 10
# distinct tokens in 16) rather than repeating one token; transformers' own N(0, 0.02) init
# gives logits ~0, which hides most kernel bugs.
# Linear weights are N(0, (LINEAR_GAIN / sqrt(fan_in))^2), so every projection output has std
# ~LINEAR_GAIN whatever the width and attention is neither uniform nor one-hot. Embeddings and
# an untied lm_head are N(0, (EMBED_GAIN / sqrt(hidden))^2), so logits have std ~EMBED_GAIN
# tied or not. Norm weights are U(0.5, 1.5) so a kernel that skips the multiply is caught;
# biases are N(0, BIAS_STD^2).
LINEAR_GAIN = 2.0
EMBED_GAIN = 2.4
BIAS_STD = 0.5
NORM_RANGE = (0.5, 1.5)

_SUBJECTS = [
    "the cat",
    "a small dog",
    "my neighbour",
    "the old engineer",
    "every student",
    "she",
    "he",
    "they",
    "our team",
    "the compiler",
    "a quiet river",
    "the café owner",
    "Zoë",
    "the robot",
    "this function",
    "the kernel",
    "a tired runner",
    "the weather",
]
_VERBS = [
    "runs",
    "writes",
    "reads",
    "builds",
    "finds",
    "sees",
    "loves",
    "measures",
    "sends",
    "compiles",
    "tests",
    "watches",
    "paints",
    "counts",
    "opens",
    "moves",
    "fixes",
    "sings",
]
_OBJECTS = [
    "a long letter",
    "the red door",
    "three apples",
    "the blue sky",
    "a fast kernel",
    "the map",
    "fresh bread",
    "an old book",
    "the river bank",
    "twelve tokens",
    "a naïve résumé",
    "the über plan",
    "new shoes",
    "the garden",
    "a matrix",
    "the song",
]
_TAILS = [
    ".",
    "!",
    "?",
    "...",
    ", again.",
    " today.",
    " at 7:45 pm.",
    " (twice).",
    " — quickly.",
    "; then it stops.",
    " for 3.14 seconds.",
    " on 2024-05-17.",
    " with 100% effort.",
    " in Zürich.",
    " at the naïve café.",
    ' and says "hello".',
    " — ça va?",
    " for $42.",
]
_EXTRA = [
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 65536.",
    "Mixed unicode: café, naïve, Zürich, señor, Ελληνικά, русский, 日本語, 中文, 한국어.",
    "Symbols: @ # $ % ^ & * ( ) [ ] { } < > / \\ | ~ ` + = - _",
    "def f(x): return x * 2 + 1  # a python line",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Emoji: 🙂 🚀 ✨ and arrows → ← ↑ ↓.",
    "The quick brown fox jumps over the lazy dog.",
    "Q: What is 2 + 2? A: 4.",
]


def corpus(n_lines: int = 360, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with digits, punctuation and some unicode."""
    rng = random.Random(seed)
    lines = list(_EXTRA)
    while len(lines) < n_lines:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(_TAILS)
        if rng.random() < 0.3:
            price = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
            sentence += f" Item {rng.randint(0, 9999)} costs {price}."
        lines.append(sentence)
    return lines


def _train_bpe() -> Tokenizer:
    """Byte-level BPE (GPT-2 / Qwen2 / Llama-3 style); 461 tokens, padded to 464 by the model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=461,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def _train_spm() -> Tokenizer:
    """Llama/Mistral style: Metaspace, byte-fallback BPE, `<s>` prepended; 480 tokens."""
    metaspace = {"replacement": "▁", "prepend_scheme": "first"}
    # Train on the pre-tokenized text, then rebuild the model with Llama's id layout:
    # specials, then the 256 <0xNN> byte tokens, then the learned pieces.
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    # The alphabet is given, so rare characters (CJK, emoji, Greek) stay out of the vocab and
    # use byte fallback. A frequency cut (limit_alphabet alone) was not deterministic: tokenizers
    # breaks ties among characters seen once in hash order, so 日 or 本 were sometimes kept.
    # With every alphabet character given and the limit equal to its size, the trainer drops
    # exactly the characters outside it, whatever their counts.
    trainer = BpeTrainer(
        vocab_size=480 - 261,
        initial_alphabet=list(SPM_ALPHABET),
        limit_alphabet=len(SPM_ALPHABET),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    vocab: dict[str, int] = {}
    for piece in [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    # split=False as in Hugging Face's Llama/Mistral conversions; the merges never cross "▁".
    tok.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace, split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


@functools.cache
def _trained_tokenizer_json(kind: str) -> str:
    # Training takes ~50 ms, but many tests build models; cache the serialized result.
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {TOKENIZER_KINDS}")
    tok = _train_bpe() if kind == "bpe" else _train_spm()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for i, piece in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(piece) == i, (piece, tok.token_to_id(piece))
    return tok.to_str()


def make_tokenizer(
    out_dir: str | Path, kind: str = "bpe", chat_template: str | None = CHATML_TEMPLATE
) -> None:
    """Save a tiny trained tokenizer (tokenizer.json + tokenizer_config.json) to `out_dir`.

    kind: "bpe" (byte-level BPE, no bos) or "spm" (Llama-style Metaspace + byte fallback, bos).
    chat_template: Jinja string stored under "chat_template" in tokenizer_config.json.
    """
    out_dir = Path(out_dir)
    tok = Tokenizer.from_str(_trained_tokenizer_json(kind))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
    # Write the template into tokenizer_config.json, where most hub checkpoints keep it
    # (transformers 5 would otherwise write a separate chat_template.jinja).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def tokenizer_size(kind: str) -> int:
    """Number of tokens (including specials) of `make_tokenizer(kind=kind)`."""
    return Tokenizer.from_str(_trained_tokenizer_json(kind)).get_vocab_size(with_added_tokens=True)


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with the scales documented at the top of this file."""
    gen = torch.Generator().manual_seed(seed)
    embed_std = EMBED_GAIN / math.sqrt(model.config.hidden_size)
    # GPT-2's Conv1D stores weights [in_features, out_features], the transpose of nn.Linear.
    conv1d = {
        f"{path}.weight"
        for path, module in model.named_modules()
        if isinstance(module, transformers.pytorch_utils.Conv1D)
    }
    # Gemma's RMSNorm scales by (1 + w): draw w so that 1 + w lies in NORM_RANGE like others'.
    offset_norms = {
        f"{path}.weight"
        for path, module in model.named_modules()
        if type(module).__name__.startswith("Gemma") and type(module).__name__.endswith("RMSNorm")
    }
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is yielded once, as embed
            if name.endswith(("norm.weight", "LayerNorm.weight")):
                lo, hi = NORM_RANGE
                p.copy_(torch.rand(p.shape, generator=gen) * (hi - lo) + lo)
                if name in offset_norms:
                    p.sub_(1.0)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * BIAS_STD)
            elif name.endswith(("embed_tokens.weight", "embeddings.weight", "lm_head.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
            elif name.endswith(("wte.weight", "wpe.weight")):  # GPT-2 token, position tables
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
            elif name in conv1d:
                p.copy_(torch.randn(p.shape, generator=gen) * (LINEAR_GAIN / math.sqrt(p.shape[0])))
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):  # GPT-2 LayerNorm
                lo, hi = NORM_RANGE
                p.copy_(torch.rand(p.shape, generator=gen) * (hi - lo) + lo)
            elif p.ndim in (2, 3):  # nn.Linear weight [out, in], or stacked experts' [E, out, in]
                p.copy_(
                    torch.randn(p.shape, generator=gen) * (LINEAR_GAIN / math.sqrt(p.shape[-1]))
                )
            else:
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)} has no init rule")


def _write_legacy_config(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json with the transformers-4 keys most hub models use."""
    config = json.loads(config_path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_model(
    out_dir: str | Path,
    arch: str = "LlamaForCausalLM",
    seed: int = 0,
    *,
    tokenizer: str = "spm",
    base_config: dict | None = None,
    max_shard_size: str | int | None = None,
    legacy_config: bool = False,
    **config_overrides,
) -> Path:
    """Save a random-weight float32 `arch` checkpoint plus its tokenizer to `out_dir`.

    tokenizer: kind passed to `make_tokenizer` ("spm" or "bpe").
    base_config: config before overrides; TINY_CONFIG (hidden 64, 2 layers) by default.
    max_shard_size: e.g. "100KB" to force a sharded checkpoint (model.safetensors.index.json).
    legacy_config: write config.json with transformers-4 keys (rope_theta, rope_scaling,
        torch_dtype) instead of transformers-5 `rope_parameters` / `dtype`.
    config_overrides: config.json fields, e.g. num_key_value_heads=1, head_dim=32,
        tie_word_embeddings=True, rope_theta=5e5, rope_scaling={"rope_type": "linear", ...}.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {ARCHITECTURES}")
    out_dir = Path(out_dir)
    make_tokenizer(out_dir, kind=tokenizer)
    n_tokens = tokenizer_size(tokenizer)

    fields = {
        **(TINY_CONFIG if base_config is None else base_config),
        "vocab_size": -(-n_tokens // 8) * 8,  # rounded up to a multiple of 8, as hub models pad
        "bos_token_id": SPECIAL_TOKENS.index("<s>"),
        "eos_token_id": SPECIAL_TOKENS.index("</s>"),
        "dtype": "float32",
        **config_overrides,
    }
    if fields["vocab_size"] < n_tokens:
        raise ValueError(
            f"vocab_size={fields['vocab_size']} is smaller than the tokenizer's {n_tokens} tokens"
        )
    model_cls = getattr(transformers, arch)
    if (model_cls.config_class().pad_token_id or 0) >= fields["vocab_size"]:
        fields.setdefault("pad_token_id", None)  # Phi-3's default 32000 is past the tiny vocab
    config = model_cls.config_class(**fields, architectures=[arch])
    # Seed the global generator too: anything _init_weights leaves (a buffer, a parameter kind
    # it does not know) then still depends only on `seed`, not on what was built before.
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _init_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=fields["bos_token_id"], eos_token_id=fields["eos_token_id"]
    )
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    if legacy_config:
        _write_legacy_config(out_dir / "config.json")
    return out_dir


def make_embedding_model(
    out_dir: str | Path,
    arch: str = "BertModel",
    seed: int = 0,
    *,
    pooling: str | tuple[str, ...] = "mean",
    normalize: bool = True,
    max_seq_length: int | None = None,
    tokenizer: str = "spm",
    **config_overrides,
) -> Path:
    """Save a random-weight embedding model as a sentence-transformers folder at `out_dir`.

    arch: one of EMBEDDING_ARCHITECTURES (a BERT encoder, or a decoder trunk `XModel`).
    pooling: sentence-transformers pooling mode(s) for 1_Pooling/config.json; normalize: add
    the Normalize module; max_seq_length: sentence_bert_config.json's truncation length.
    config_overrides: config.json fields over TINY_CONFIG (BERT reads the same key names).
    """
    if arch not in EMBEDDING_ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {EMBEDDING_ARCHITECTURES}")
    out_dir = Path(out_dir)
    make_tokenizer(out_dir, kind=tokenizer, chat_template=None)
    model_cls = getattr(transformers, arch)
    known = model_cls.config_class().to_dict()  # BERT has no num_key_value_heads, rms_norm_eps
    fields = {
        **{k: v for k, v in TINY_CONFIG.items() if k in known},
        "vocab_size": -(-tokenizer_size(tokenizer) // 8) * 8,
        "dtype": "float32",
        **config_overrides,
    }
    model = model_cls(model_cls.config_class(**fields, architectures=[arch])).eval()
    _init_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)

    modes = [pooling] if isinstance(pooling, str) else list(pooling)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (out_dir / "2_Normalize").mkdir()
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out_dir / "1_Pooling").mkdir()
    pooling_config = {"word_embedding_dimension": fields["hidden_size"], "pooling_mode": modes}
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    st_config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (out_dir / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="LlamaForCausalLM", choices=ARCHITECTURES)
    parser.add_argument("--tokenizer", default="spm", choices=TOKENIZER_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="hidden 64 / 2 layers instead of the ~3 M demo size"
    )
    args = parser.parse_args(argv)
    out = make_model(
        args.out_dir,
        args.arch,
        args.seed,
        tokenizer=args.tokenizer,
        base_config=TINY_CONFIG if args.tiny else DEMO_CONFIG,
    )
    n_params = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="numpy") as f:
            n_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"wrote {args.arch} ({n_params / 1e6:.2f} M parameters) to {out}")


if __name__ == "__main__":
    main()
