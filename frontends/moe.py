"""Sparse mixture-of-experts MLP: a softmax top-k router and SwiGLU experts held stacked.

Each expert projection is one parameter [num_experts, out, in] (the checkpoint's per-expert
tensors, stacked by `Checkpoint`), and `StackedLinear` computes only the experts a token was
routed to: out[t, j] = x[t] @ W[expert[t, j]].T reads the selected experts' rows and no others,
so decode at batch 1 streams top_k experts' weights per layer, not all of them.
"""

from tvm import te
from tvm.relax.frontend import nn


class StackedLinear(nn.Module):
    """Bias-free linear layers of every expert, applied to the experts each token selected."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((num_experts, out_features, in_features))

    def forward(self, x: nn.Tensor, experts: nn.Tensor) -> nn.Tensor:
        """x [tokens, 1 or top_k, in], experts [tokens, top_k] int32 -> [tokens, top_k, out].

        With one input row per token, every selected expert reads that row; with top_k rows,
        slot j reads row j (the down projection after each expert's activation).
        """
        shared = x.shape[1] == 1

        def compute(x: te.Tensor, experts: te.Tensor, w: te.Tensor) -> te.Tensor:
            tokens, top_k = experts.shape
            k = te.reduce_axis((0, self.in_features), name="k")
            return te.compute(
                (tokens, top_k, self.out_features),
                lambda t, j, n: te.sum(x[t, 0 if shared else j, k] * w[experts[t, j], n, k], k),
                name="expert_matmul",
            )

        # Pattern "out-elementwise fusable", as for a plain matmul: activations fuse after the
        # matmul, never into its inner loop (where they would be recomputed per output row).
        return nn.op.tensor_expr_op(
            compute, "expert_matmul", [x, experts, self.weight], attrs={"op_pattern": 4}
        )


class SparseMoE(nn.Module):
    """Router `gate` plus SwiGLU experts; attribute names are the checkpoint's.

    names: the checkpoint's (gate, up, down) projection names under `experts`, e.g.
    ("w1", "w3", "w2") for Mixtral, ("gate_proj", "up_proj", "down_proj") for Qwen3-MoE.
    normalize_top_k: rescale the top-k probabilities to sum to one (Mixtral always does;
    Qwen3-MoE when `norm_topk_prob` is set).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool,
        names: tuple[str, str, str],
    ):
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.names = names
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.Module()
        gate, up, down = names
        setattr(self.experts, gate, StackedLinear(num_experts, hidden_size, intermediate_size))
        setattr(self.experts, up, StackedLinear(num_experts, hidden_size, intermediate_size))
        setattr(self.experts, down, StackedLinear(num_experts, intermediate_size, hidden_size))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, h = x.shape
        flat = nn.op.reshape(x, (b * s, h))  # [tokens, hidden]
        # Routing in float32, as transformers does: softmax over all experts, then top-k.
        probs = nn.op.softmax(self.gate(flat).astype("float32"), axis=-1)  # [tokens, E]
        weights, experts = nn.op.topk(probs, self.top_k, axis=-1, dtype="int32")  # [tokens, k]
        if self.normalize_top_k:
            weights = weights / nn.op.sum(weights, axis=-1, keepdims=True)
        weights = nn.op.reshape(weights, (b * s, self.top_k, 1))  # [tokens, top_k, 1]
        rows = nn.op.reshape(flat, (b * s, 1, h))  # [tokens, 1, hidden]
        gate, up, down = (getattr(self.experts, n) for n in self.names)
        act = nn.op.silu(gate(rows, experts)) * up(rows, experts)  # [tokens, top_k, inter]
        out = down(act, experts)  # [tokens, top_k, hidden]
        out = nn.op.sum(out * weights.astype(out.dtype), axis=1)  # [tokens, hidden]
        return nn.op.reshape(out, (b, s, h))
