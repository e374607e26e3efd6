"""Tensor parallelism for the Llama family: one shard's graph, and each shard's weights.

Every shard runs the same graph: the model built from a config with 1/N of the attention heads
(query and key/value alike) and 1/N of the MLP columns. q/k/v and gate/up are column-parallel
(each shard computes its own heads and columns, nothing exchanged); o_proj and down_proj are
row-parallel: each shard multiplies its slice of the input features, and one all-reduce (sum)
over the shards gives the full output, to which the bias is added once. Embeddings, norms and
the logits head are replicated.

The split of each weight is derived, not tabled: a parameter whose shard shape differs from the
checkpoint's along one axis (by a factor N) is split along that axis in rank order; the others
are whole on every shard. The KV cache of a shard holds its own key/value heads.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint
from .entry import ExportedModel, export_causal_lm
from .llama import LlamaForCausalLM

# The families built from llama.py's modules unchanged (config readers differ only).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class RowParallelLinear(nn.Module):
    """y = allreduce_sum(x @ W_shard^T) + b: the shard's input features, summed over shards.
    Parameter names equal nn.Linear's, so the checkpoint's weights bind to it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str = "float32"):
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        partial = nn.op.matmul(x, nn.op.permute_dims(self.weight))  # this shard's share
        y = nn.op.ccl_allreduce(partial, "sum")
        return y + self.bias if self.bias is not None else y


@dataclass
class ShardedModel:
    """One shard's graph (the same for every shard) and how the checkpoint's weights split."""

    exported: ExportedModel
    shards: int
    split: dict[str, int]  # parameter name -> the axis it is split along, in rank order
    base: Checkpoint = dataclasses.field(repr=False)

    def checkpoint(self, rank: int) -> Checkpoint:
        """The checkpoint as shard `rank` reads it: split tensors cut to its slice."""
        base = self.base
        return _ShardCheckpoint(
            base.path, base.config, base.tensors, base, self.split, rank, self.shards
        )

    def to_manifest(self) -> dict:
        """The shard plan the runtime reads (manifest.tensor_parallel, less the workers)."""
        return {
            "shards": self.shards,
            "split": dict(self.split),
            "allreduce": ["self_attn.o_proj", "mlp.down_proj"],  # per decoder layer
        }


@dataclass
class _ShardCheckpoint(Checkpoint):
    base: Checkpoint
    split: dict[str, int]
    rank: int
    shards: int

    def read(self, name: str) -> np.ndarray:
        array = self.base.read(name)
        axis = self.split.get(name)
        if axis is None:
            return array
        size = array.shape[axis] // self.shards
        index = [slice(None)] * array.ndim
        index[axis] = slice(self.rank * size, (self.rank + 1) * size)
        return np.ascontiguousarray(array[tuple(index)])


def shard(checkpoint: Checkpoint, dtype: str, shards: int, architectures: dict) -> ShardedModel:
    """The graph of one of `shards` shards and the weights' split; RelaxlmError for a checkpoint
    or a shard count that cannot be split so.

    architectures: frontends.ARCHITECTURES (name -> (config reader, model class)).
    """
    if not isinstance(shards, int) or shards < 2:
        raise RelaxlmError(f"tensor_parallel={shards!r} is invalid; set it to an integer >= 2")
    if type(checkpoint) is not Checkpoint or checkpoint.path.is_file():
        raise RelaxlmError(
            f"{checkpoint.path}: tensor parallelism splits a Hugging Face checkpoint folder's "
            "float weights; GGUF files, ONNX graphs, prequantized (AWQ/GPTQ) checkpoints and "
            "merged LoRA adapters cannot be split yet: drop --tensor-parallel, or use the "
            "checkpoint folder"
        )
    arch = checkpoint.architecture
    if arch not in ARCHITECTURES:
        raise RelaxlmError(
            f"{arch} cannot be split across shards (--tensor-parallel): only "
            f"{', '.join(ARCHITECTURES)} can; compile it without --tensor-parallel"
        )
    read_config, model_class = architectures[arch]
    assert issubclass(model_class, LlamaForCausalLM), model_class
    config = read_config(checkpoint.config)
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    if bad := [f"{k} {v}" for k, v in sizes.items() if v % shards]:
        raise RelaxlmError(
            f"{checkpoint.path / 'config.json'}: {', '.join(bad)} not divisible by "
            f"--tensor-parallel {shards}: each shard takes whole heads and an equal share of "
            "the MLP; pick a shard count that divides them"
        )
    shard_config = dataclasses.replace(config, **{k: v // shards for k, v in sizes.items()})
    model = model_class(shard_config)
    for layer in model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = RowParallelLinear(
            attn.num_q_heads * attn.head_dim, config.hidden_size, attn.o_proj.bias is not None
        )
        mlp.down_proj = RowParallelLinear(
            shard_config.intermediate_size, config.hidden_size, mlp.down_proj.bias is not None
        )
    model.to(dtype)
    mod, named_params = export_causal_lm(model)
    shapes = {name: tuple(int(d) for d in p.shape) for name, p in named_params}
    split = {}
    for name, shape in shapes.items():
        if name not in checkpoint.tensors:
            raise RelaxlmError(f"{checkpoint.path}: checkpoint lacks the weight {name}")
        full = tuple(checkpoint.tensors[name].shape)
        axes = [i for i, (a, b) in enumerate(zip(shape, full, strict=True)) if a != b]
        if axes:
            assert len(axes) == 1 and full[axes[0]] == shape[axes[0]] * shards, (name, full)
            split[name] = axes[0]
    exported = ExportedModel(
        mod=mod,
        param_names=list(shapes),
        param_shapes=shapes,
        dtype=dtype,
        architecture=arch,
        config=checkpoint.config,
        context_window=config.context_window,
        vocab_size=config.vocab_size,
    )
    return ShardedModel(exported, shards, split, checkpoint)
