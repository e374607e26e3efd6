"""The entry functions every causal LM exports, defined once for all architectures.

- `prefill(input_ids[1, n], logit_positions[b])`: the tokens of one or more sequences laid
  end to end (the KV cache knows where each begins); returns logits only at
  `logit_positions`, `[1, b, vocab]` float32.
- `decode(input_ids[b, 1])`: one new token for each of b sequences; `[b, 1, vocab]` float32.

The paged-attention pass adds the KV-cache parameter after the inputs.

A vision-language model (`VisionLM`) exports three more, so images are spliced into a prompt:
- `encode_images(pixel_values[k, c, h, w])`: k preprocessed images, or LLaVA-NeXT's tiles
  (float32) -> their features in the text trunk's width, `[k, tokens per image, hidden]`
  float32. An architecture may ask for other inputs (`VisionLM.image_inputs`; Qwen2.5-VL:
  patches with their positions and windows -> `[tokens, hidden]`).
- `embed_tokens(input_ids[1, n])`: the token embeddings, `[1, n, hidden]` float32.
- `prefill_embeds(embeddings[1, n, hidden], logit_positions[b])`: `prefill` from embeddings
  (token embeddings with image features at the image-token positions); plus the inputs of
  `VisionLM.prefill_position_inputs` (Qwen2.5-VL: M-RoPE positions `[3, n]`).
- `prefill_image_block(embeddings[1, n, hidden], logit_positions[b])`, for a model whose image
  tokens attend bidirectionally (Gemma 3): `prefill_embeds` over one sequence's n tokens of one
  image, which see each other and, causally, the cached tokens before them.
- `image_newline_features()`, for a model that has it (LLaVA-NeXT): the learned vector the
  runtime puts after each row of an image's tiles, `[hidden]` float32.

A speech model (`SpeechSeq2Seq`, an encoder-decoder such as Whisper) exports instead of the
text entries (see frontends/whisper.py): `encode_audio`, `cross_kv`, and `prefill` / `decode`
that also take the cross-attention keys and values.

Every embedding model exports one entry instead, and no KV cache:
- `embed(input_ids[b, s], attention_mask[b, s])`: b texts, right-padded (real tokens first,
  mask 1 on them, 0 on padding); returns the pooled embeddings, `[b, dim]` float32.
"""

from dataclasses import dataclass, field
from typing import Any

from tvm import IRModule, relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import spec as nn_spec

from relaxlm.errors import RelaxlmError


@dataclass
class ExportedModel:
    """What a frontend hands the compiler: the graph, its weights in order, and model facts."""

    mod: IRModule
    param_names: list[str]  # the packed-params order of the graph's functions
    param_shapes: dict[str, tuple[int, ...]]
    dtype: str
    architecture: str
    config: dict[str, Any]  # the checkpoint's config.json
    context_window: int
    vocab_size: int
    # "generate": prefill/decode over a KV cache; "embed": embed(); "transcribe": Whisper;
    # "synthesize": text to speech (frontends/vits.py)
    task: str = "generate"
    embedding: dict[str, Any] = field(default_factory=dict)  # pooling, for "embed"
    # Image preprocessing and image token, for vision-language models (runtime/vision.py).
    vision: dict[str, Any] = field(default_factory=dict)
    # Audio features and special tokens, for speech models (runtime/audio.py, runtime/whisper.py).
    speech: dict[str, Any] = field(default_factory=dict)
    # A pipeline stage's decoder layers [first, end) of num_layers (see export_causal_lm_stage);
    # None: the whole model.
    layers: tuple[int, int, int] | None = None
    # Adapter slots (frontends/lora_slots.py): {slots, max_rank, targets}; empty: none.
    lora_slots: dict[str, Any] = field(default_factory=dict)


class CausalLM(nn.Module):
    """Base of every decoder model: subclasses give `hidden_states` and `logits`."""

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden] final hidden states (after norm)."""
        raise NotImplementedError(f"{type(self).__name__} must define hidden_states")

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """[..., hidden] -> [..., vocab] in float32."""
        raise NotImplementedError(f"{type(self).__name__} must define logits")

    def prefill(self, input_ids: nn.Tensor, logit_positions: nn.Tensor) -> nn.Tensor:
        hidden = self.hidden_states(input_ids)  # [1, n, hidden]
        hidden = nn.op.take(hidden, logit_positions, axis=1)  # [1, b, hidden]
        return self.logits(hidden)

    def decode(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.logits(self.hidden_states(input_ids))  # [b, 1, vocab]

    # A model split across devices (a device map) runs its trunk in parts: the architectures
    # that give these three can be split (Llama and the families built on it).
    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden], what the first layer takes."""
        raise NotImplementedError(f"{type(self).__name__} must define embed")

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers in order, each [batch, seq, hidden] -> the same."""
        raise NotImplementedError(f"{type(self).__name__} must define decoder_layers")

    def final_norm(self, x: nn.Tensor) -> nn.Tensor:
        """The norm after the last layer."""
        raise NotImplementedError(f"{type(self).__name__} must define final_norm")


def export_causal_lm(model: CausalLM):
    """Export the entry functions: (IRModule, [(param name, nn.Parameter)] in packed order)."""
    return model.export_tvm(spec=_text_spec())


def can_split(model: nn.Module) -> bool:
    """Whether the model's layers can run as pipeline stages (it gives embed, decoder_layers
    and final_norm, and is a text model)."""
    return (
        isinstance(model, CausalLM)
        and not isinstance(model, VisionLM)
        and all(
            getattr(type(model), name) is not getattr(CausalLM, name)
            for name in ("embed", "decoder_layers", "final_norm")
        )
    )


def export_causal_lm_stage(
    model: CausalLM, first: int, end: int, hidden_size: int, dtype: str
) -> tuple[IRModule, list]:
    """Export one pipeline stage: decoder layers [first, end) as `prefill` and `decode`, taking
    only the weights they use: (IRModule, [(param name, nn.Parameter)] in packed order).

    The first stage takes token ids and embeds them, the last ends in logits (as the whole
    model's entries); the others take and return the hidden state, [1, n, hidden] in prefill
    and [b, 1, hidden] in decode, in the model's dtype. One stage of every layer is the whole
    model's entries.
    """
    layers = model.decoder_layers()
    is_first, is_last = first == 0, end == len(layers)
    assert 0 <= first < end <= len(layers), (first, end)
    if is_first and is_last:
        return export_causal_lm(model)

    def trunk(x: nn.Tensor) -> nn.Tensor:
        x = model.embed(x) if is_first else x
        for layer in layers[first:end]:
            x = layer(x)
        return model.final_norm(x) if is_last else x

    def prefill_head(x, logit_positions):
        return model.logits(nn.op.take(trunk(x), logit_positions, axis=1))  # [1, b, vocab]

    def decode_head(x):
        return model.logits(trunk(x))  # [b, 1, vocab]

    modes = {"param_mode": "packed", "effect_mode": "none"}
    if is_first:
        prefill_in = {"x": nn.spec.Tensor([1, "num_tokens"], "int32")}
        decode_in = {"x": nn.spec.Tensor(["batch_size", 1], "int32")}
    else:
        prefill_in = {"x": nn.spec.Tensor([1, "num_tokens", hidden_size], dtype)}
        decode_in = {"x": nn.spec.Tensor(["batch_size", 1, hidden_size], dtype)}
    if is_last:
        prefill_in["logit_positions"] = nn.spec.Tensor(["num_logits"], "int32")
    methods = {
        "prefill": (prefill_head if is_last else trunk, prefill_in),
        "decode": (decode_head if is_last else trunk, decode_in),
    }
    spec = nn_spec.ModuleSpec(
        model,
        list(methods),
        [nn_spec.MethodSpec.from_raw({**args, "$": modes}, f) for f, args in methods.values()],
    )
    mod, named_params = model.export_tvm(spec=spec)
    return _keep_used_params(mod, named_params)


def _keep_used_params(mod: IRModule, named_params: list) -> tuple[IRModule, list]:
    """The module with each function's packed weights cut to those some function reads, and
    those weights' (name, parameter) pairs, in order. (The exporter packs every parameter of
    the model into every function, each read into a binding; a stage reads its own layers'
    only, so the others' bindings are dead code.)"""
    mod = relax.transform.DeadCodeElimination()(mod)
    funcs = {gv: f for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    used: set[int] = set()
    for func in funcs.values():
        packed = func.params[-1]

        def visit(expr, packed=packed) -> None:
            if isinstance(expr, relax.TupleGetItem) and expr.tuple_value.same_as(packed):
                used.add(expr.index)

        relax.analysis.post_order_visit(func.body, visit)
    keep = sorted(used)
    rewriter = _PackedParamsRewriter(mod, {old: new for new, old in enumerate(keep)})
    for gv, func in funcs.items():
        rewriter.rewrite(gv, func)
    return rewriter.builder_.get(), [named_params[i] for i in keep]


@relax.expr_functor.mutator
class _PackedParamsRewriter(relax.PyExprMutator):
    def __init__(self, mod: IRModule, slot: dict[int, int]):
        super().__init__(mod)
        self.slot = slot  # old packed index -> new

    def rewrite(self, gv, func: relax.Function) -> None:
        self._old = func.params[-1]
        fields = list(self._old.ty.fields)
        new_fields = [fields[i] for i in sorted(self.slot)]
        self._new = relax.Var(self._old.name, relax.TupleType(new_fields))
        body = self.visit_expr(func.body)
        params = [*func.params[:-1], self._new]
        self.builder_.update_func(
            gv, relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        )

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        if not op.tuple_value.same_as(self._old):
            return super().visit_tuple_getitem_(op)
        return relax.TupleGetItem(self._new, self.slot[op.index])

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        # Only reached for a use of the whole tuple, which a cut tuple cannot stand for.
        if var.same_as(self._old):
            raise RelaxlmError("a stage function passes its whole weight tuple on; cannot cut it")
        return super().visit_var_(var)


def _text_spec() -> dict[str, Any]:
    modes = {"param_mode": "packed", "effect_mode": "none"}
    return {
        "prefill": {
            "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
            "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
            "$": modes,
        },
        "decode": {"input_ids": nn.spec.Tensor(["batch_size", 1], "int32"), "$": modes},
    }


class VisionLM(CausalLM):
    """Base of every vision-language model: a CausalLM that also gives `encode_images`,
    `embed_tokens`, `hidden_states_from_embeddings`, `image_shape` and `hidden_size`."""

    image_shape: tuple[int, int, int]  # (channels, height, width) encode_images takes
    hidden_size: int

    def prefill_embeds(self, embeddings: nn.Tensor, logit_positions: nn.Tensor) -> nn.Tensor:
        hidden = self.hidden_states_from_embeddings(embeddings)  # [1, n, hidden]
        return self.logits(nn.op.take(hidden, logit_positions, axis=1))  # [1, b, vocab]

    def image_inputs(self) -> dict[str, Any]:
        """encode_images' inputs (name -> spec); an architecture that needs more than pixels
        (Qwen2.5-VL: patch positions and attention windows) gives its own."""
        return {"pixel_values": nn.spec.Tensor(["num_images", *self.image_shape], "float32")}

    def prefill_position_inputs(self) -> dict[str, Any]:
        """prefill_embeds' inputs after logit_positions (Qwen2.5-VL: M-RoPE positions)."""
        return {}


class TrunkVisionLM(VisionLM):
    """A vision-language model around a causal LM `language_model` whose own trunk
    (`language_model.model`: layers, norm) takes the spliced embeddings as they are (LLaVA,
    Gemma 3), and a vision tower given by `config.vision`."""

    @classmethod
    def for_tensors(cls, config, names):
        """The module tree whose parameter names are the checkpoint's: the tower nested under
        `vision_model` (transformers 4) or not (transformers 5)."""
        return cls(config, any(n.startswith("vision_tower.vision_model.") for n in names))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        v = self.config.vision
        return (v.num_channels, v.image_size, v.image_size)

    @property
    def hidden_size(self) -> int:
        return self.config.text.hidden_size

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.language_model.hidden_states(input_ids)

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        return self.language_model.logits(hidden)

    def hidden_states_from_embeddings(self, embeddings: nn.Tensor) -> nn.Tensor:
        trunk = self.language_model.model
        x = embeddings.astype(trunk.norm.weight.dtype)
        for layer in trunk.layers:
            x = layer(x)
        return trunk.norm(x)


def export_vision_lm(model: VisionLM):
    """Export prefill/decode plus the image entries: (IRModule, [(name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        **_text_spec(),
        "encode_images": {**model.image_inputs(), "$": modes},
        "embed_tokens": {"input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"), "$": modes},
        "prefill_embeds": {
            "embeddings": nn.spec.Tensor([1, "num_tokens", model.hidden_size], "float32"),
            "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
            **model.prefill_position_inputs(),
            "$": modes,
        },
    }
    if hasattr(model, "prefill_image_block"):  # Gemma 3: an image's tokens, bidirectionally
        spec["prefill_image_block"] = {**spec["prefill_embeds"]}
    if hasattr(model, "image_newline_features"):
        spec["image_newline_features"] = {"$": modes}
    return model.export_tvm(spec=spec)


class SpeechSeq2Seq(nn.Module):
    """Base of every speech encoder-decoder: subclasses give `encode_audio`, `cross_kv`,
    `decoder_logits`, `features_shape` and `cross_kv_shape`."""

    features_shape: tuple[int, int]  # (mel bins, frames) of one window
    cross_kv_shape: tuple[int, int, int]  # (2 * decoder layers, encoder positions, width)

    def prefill(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        return self.decoder_logits(input_ids, cross_kv)  # [1, n, vocab]

    def decode(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        return self.decoder_logits(input_ids, cross_kv)  # [b, 1, vocab]


def export_speech_seq2seq(model: SpeechSeq2Seq):
    """Export encode_audio, cross_kv, prefill and decode: (IRModule, [(name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    layers2, positions, width = model.cross_kv_shape
    spec = {
        "encode_audio": {
            "input_features": nn.spec.Tensor(["batch_size", *model.features_shape], "float32"),
            "$": modes,
        },
        "cross_kv": {
            "encoder_states": nn.spec.Tensor(["batch_size", positions, width], "float32"),
            "$": modes,
        },
        "prefill": {
            "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
            "cross_kv": nn.spec.Tensor([1, *model.cross_kv_shape], "float32"),
            "$": modes,
        },
        "decode": {
            "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
            "cross_kv": nn.spec.Tensor(["batch_size", *model.cross_kv_shape], "float32"),
            "$": modes,
        },
    }
    return model.export_tvm(spec=spec)


class Embedder(nn.Module):
    """Base of every embedding model: subclasses give `embed`."""

    def embed(self, input_ids: nn.Tensor, attention_mask: nn.Tensor) -> nn.Tensor:
        """[batch, seq] ids and mask (right-padded) -> [batch, dim] float32 embeddings."""
        raise NotImplementedError(f"{type(self).__name__} must define embed")


def export_embedding(model: Embedder):
    """Export `embed`: (IRModule, [(param name, nn.Parameter)] in packed order)."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        "embed": {
            "input_ids": nn.spec.Tensor(["batch_size", "seq_len"], "int32"),
            "attention_mask": nn.spec.Tensor(["batch_size", "seq_len"], "int32"),
            "$": modes,
        }
    }
    return model.export_tvm(spec=spec)
