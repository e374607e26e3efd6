"""Which checkpoints are embedding models, and decoders used as embedders.

A checkpoint is an embedding model when its architecture is
- an encoder: `BertModel`;
- a decoder trunk `XModel` whose `XForCausalLM` relaxlm supports (`LlamaModel`, `Qwen2Model`,
  ...), as Qwen3-Embedding-style checkpoints are;
- or a supported `XForCausalLM` whose folder holds sentence-transformers' `modules.json`.
Pooling follows the folder's sentence-transformers modules (see pooling.py); without them,
sentence-transformers' own defaults: mean pooling for encoders, last-token pooling for decoders,
no normalisation.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from . import bert
from .checkpoint import Checkpoint
from .entry import CausalLM, Embedder
from .pooling import Pooling, pool, read_pooling

log = logging.getLogger(__name__)

ENCODERS = {"BertModel": (bert.BertConfig.from_dict, bert.BertModel)}


@dataclass
class EmbeddingModel:
    model: Embedder
    pooling: Pooling
    context_window: int
    vocab_size: int


class DecoderEmbedder(Embedder):
    """A causal LM's final hidden states, pooled.

    Attention stays causal: rows are right-padded, so no real token attends to padding. The
    trunk's parameters are named as the checkpoint has them, with or without the "model."
    prefix of the causal LM (transformers' `XModel` saves them without it).
    """

    def __init__(self, lm: CausalLM, pooling: Pooling, prefixed: bool):
        self.pooling = pooling
        self._hidden_states = lm.hidden_states  # a method, so not exported as a module
        if prefixed:
            self.model = lm.model
        else:  # the trunk's modules directly under this one: "layers.0...", "norm.weight"
            for name, value in vars(lm.model).items():
                setattr(self, name, value)

    def embed(self, input_ids: nn.Tensor, attention_mask: nn.Tensor) -> nn.Tensor:
        return pool(self._hidden_states(input_ids), attention_mask, self.pooling)


def embedding_model(
    checkpoint: Checkpoint, decoders: dict[str, tuple[Callable, type]]
) -> EmbeddingModel | None:
    """The checkpoint's embedding model, or None if it is a text generator.

    decoders: the causal LM architectures, name -> (config reader, model class).
    """
    arch = checkpoint.architecture
    if arch in ENCODERS:
        read_config, model_class = ENCODERS[arch]
        config = read_config(checkpoint.config)
        pooling = _pooling(checkpoint, "mean")
        window = config.max_position_embeddings
        return EmbeddingModel(
            model_class(config, pooling), pooling, _cap(window, pooling), config.vocab_size
        )
    lm_arch = arch.removesuffix("Model") + "ForCausalLM" if arch.endswith("Model") else arch
    has_modules = (checkpoint.path / "modules.json").is_file()
    if lm_arch not in decoders or (arch == lm_arch and not has_modules):
        return None
    read_config, model_class = decoders[lm_arch]
    config = read_config(checkpoint.config)
    lm = model_class(config)
    if not isinstance(getattr(lm, "model", None), nn.Module):
        raise RelaxlmError(f"{arch}: {lm_arch} has no `model` trunk to embed with")
    pooling = _pooling(checkpoint, "lasttoken")
    prefixed = any(name.startswith("model.") for name in checkpoint.tensors)
    model = DecoderEmbedder(lm, pooling, prefixed)
    return EmbeddingModel(model, pooling, _cap(config.context_window, pooling), config.vocab_size)


def _pooling(checkpoint: Checkpoint, default_mode: str) -> Pooling:
    pooling = read_pooling(checkpoint.path, default_mode)
    if pooling is None:
        log.info("%s has no modules.json; using %s pooling", checkpoint.path, default_mode)
        pooling = Pooling(modes=(default_mode,), normalize=False)
    return pooling


def _cap(window: int, pooling: Pooling) -> int:
    return min(window, pooling.max_seq_length or window)
