"""VITS / MMS-TTS (`VitsModel`): text -> waveform, no autoregressive loop.

Module tree and parameter names follow the checkpoint: `text_encoder.{embed_tokens,
encoder.layers.N,project}`, `duration_predictor.*`, `flow.flows.N`, `decoder.*` (HiFi-GAN). The
posterior encoder and the duration predictor's `post_*` modules serve training only and are not
built (their tensors are left unused). Weight-normalized convolutions keep the checkpoint's
`weight_g`/`weight_v` or `parametrizations.weight.original0/1` and are normalized in the graph.

The graph is split where shapes become data-dependent (the frame count is the sum of the
predicted durations), and the random draws are inputs, so runs are reproducible:
- `encode_text(input_ids[1, n], duration_noise[1, 2, n], speaker_id[1])`: the text encoder's
  prior means and log-variances and the predicted log-durations, `[1, 2 * flow_size + 1, n]`
  float32 (the stochastic predictor reads `duration_noise`, already scaled by
  noise_scale_duration).
- (runtime/vits.py, numpy) durations = ceil(exp(log-duration) / speaking rate); each token's
  prior repeated over its frames; latents = means + noise * exp(log-variances) * noise_scale.
- `decode_waveform(latents[1, flow_size, frames], speaker_id[1])`: the residual coupling
  flows in reverse, then HiFi-GAN; `[1, frames * prod(upsample_rates)]` float32 samples in
  [-1, 1].
A multi-speaker checkpoint (num_speakers > 1) conditions the duration predictor, the flows'
WaveNets and HiFi-GAN on the speaker's embedding; with one speaker `speaker_id` is ignored.
One text at a time (batch 1: no padding masks).
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tvm import relax, te
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError
from relaxlm.tvm_api import tirx

from .config import activation, from_config

# The spline's constants in transformers' `_unconstrained_rational_quadratic_spline`.
_MIN_BIN = 1e-3
_MIN_DERIVATIVE = 1e-3


@dataclass
class VitsConfig:
    vocab_size: int = 38
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 2
    window_size: int | None = 4
    use_bias: bool = True
    ffn_dim: int = 768
    ffn_kernel_size: int = 3
    flow_size: int = 192
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5
    use_stochastic_duration_prediction: bool = True
    num_speakers: int = 1
    speaker_embedding_size: int = 0
    upsample_initial_channel: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 4, 4])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    leaky_relu_slope: float = 0.1
    depth_separable_channels: int = 2
    depth_separable_num_layers: int = 3
    duration_predictor_flow_bins: int = 10
    duration_predictor_tail_bound: float = 5.0
    duration_predictor_kernel_size: int = 3
    duration_predictor_num_flows: int = 4
    duration_predictor_filter_channels: int = 256
    prior_encoder_num_flows: int = 4
    prior_encoder_num_wavenet_layers: int = 4
    wavenet_kernel_size: int = 5
    wavenet_dilation_rate: int = 1
    speaking_rate: float = 1.0
    noise_scale: float = 0.667
    noise_scale_duration: float = 0.8
    sampling_rate: int = 16000
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VitsConfig":
        config = from_config(cls, raw)
        activation("hidden_act", config.hidden_act)
        if config.hidden_size % config.num_attention_heads:
            raise RelaxlmError(
                f"config.json: hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if (config.num_speakers > 1) != (config.speaker_embedding_size > 0):
            raise RelaxlmError(
                f"config.json: num_speakers {config.num_speakers} with speaker_embedding_size "
                f"{config.speaker_embedding_size}: a multi-speaker VITS needs both above 1 and 0, "
                "a single-speaker one num_speakers 1 and speaker_embedding_size 0"
            )
        if config.depth_separable_channels != 2:
            raise RelaxlmError(
                f"config.json: depth_separable_channels {config.depth_separable_channels} is "
                "not supported; the duration flows split 2 channels (the VITS value)"
            )
        return config

    @property
    def context_window(self) -> int:
        return 4096  # characters (with blanks) per text; attention is over the whole text

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)


def _leaky_relu(x: nn.Tensor, slope: float) -> nn.Tensor:
    return nn.op.where(x >= 0.0, x, x * slope)


def _flip_channels(x: nn.Tensor) -> nn.Tensor:
    return nn.op.wrap_nested(relax.op.flip(x._expr, axis=1), name="flip")  # torch.flip(x, [1])


def _channel_norm(norm: nn.LayerNorm, x: nn.Tensor) -> nn.Tensor:
    """LayerNorm over the channels of a [b, C, t] tensor."""
    return nn.op.permute_dims(norm(nn.op.permute_dims(x, [0, 2, 1])), [0, 2, 1])


def _conv(cin, cout, kernel, dilation=1, groups=1, bias=True) -> nn.Conv1D:
    """A conv1d with the 'same' padding every VITS conv uses."""
    padding = (kernel * dilation - dilation) // 2
    return nn.Conv1D(
        cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=bias
    )


class _WeightNormPair(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        self.original0 = nn.Parameter((cout, 1, 1))  # g
        self.original1 = nn.Parameter((cout, cin, kernel))  # v


class _Parametrizations(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        self.weight = _WeightNormPair(cin, cout, kernel)


class WeightNormConv1D(nn.Module):
    """torch weight_norm(Conv1d): weight = g * v / ||v|| (per output channel), in either
    checkpoint layout (`weight_g`/`weight_v` or `parametrizations.weight.original0/1`)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int, layout: str):
        self.padding, self.dilation, self.layout = (
            (kernel * dilation - dilation) // 2,
            dilation,
            layout,
        )
        if layout == "parametrizations":
            self.parametrizations = _Parametrizations(cin, cout, kernel)
        else:
            self.weight_g = nn.Parameter((cout, 1, 1))
            self.weight_v = nn.Parameter((cout, cin, kernel))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.layout == "parametrizations":
            g, v = self.parametrizations.weight.original0, self.parametrizations.weight.original1
        else:
            g, v = self.weight_g, self.weight_v
        cout, cin, k = v.shape
        # Squared norms as cout 1x1 dot products ([cout, 1, K] @ [cout, K, 1]): a plain sum over
        # a weight's rows trips relaxlm's CPU matmul rule (it takes a reduction without batch).
        norm2 = nn.op.matmul(
            nn.op.reshape(v, (cout, 1, cin * k)), nn.op.reshape(v, (cout, cin * k, 1))
        )  # [cout, 1, 1]
        weight = v * (g / nn.op.sqrt(norm2))
        return nn.op.conv1d(x, weight, self.bias, padding=self.padding, dilation=self.dilation)


# -- text encoder ----------------------------------------------------------------------------


def _relative_to_absolute(x: nn.Tensor, window: int) -> nn.Tensor:
    """[b, H, n, 2w+1] scores per relative offset -> [b, H, n, n]: out[i, j] = x[i, j - i + w]
    where |j - i| <= w, else 0 (transformers pads its relative table with zeros)."""

    def compute(x):
        b, h, n, _ = x.shape

        def at(bb, hh, i, j):
            r = j - i + window
            inside = tirx.all(r >= 0, r <= 2 * window)
            return tirx.if_then_else(
                inside, x[bb, hh, i, tirx.max(tirx.min(r, 2 * window), 0)], tirx.const(0, x.dtype)
            )

        return te.compute((b, h, n, n), at, name="relative_to_absolute")

    return nn.op.tensor_expr_op(compute, "relative_to_absolute", [x])


def _absolute_to_relative(x: nn.Tensor, window: int) -> nn.Tensor:
    """[b, H, n, n] probabilities -> [b, H, n, 2w+1]: out[i, r] = x[i, i + r - w] where that
    column exists, else 0."""

    def compute(x):
        b, h, n, _ = x.shape

        def at(bb, hh, i, r):
            j = i + r - window
            inside = tirx.all(j >= 0, j < n)
            return tirx.if_then_else(
                inside, x[bb, hh, i, tirx.max(tirx.min(j, n - 1), 0)], tirx.const(0, x.dtype)
            )

        return te.compute((b, h, n, 2 * window + 1), at, name="absolute_to_relative")

    return nn.op.tensor_expr_op(compute, "absolute_to_relative", [x])


class VitsAttention(nn.Module):
    """Self-attention with relative position tables for keys and values (window w)."""

    def __init__(self, config: VitsConfig):
        d, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.window = config.window_size
        self.k_proj = nn.Linear(d, d, bias=config.use_bias)
        self.v_proj = nn.Linear(d, d, bias=config.use_bias)
        self.q_proj = nn.Linear(d, d, bias=config.use_bias)
        self.out_proj = nn.Linear(d, d, bias=config.use_bias)
        if self.window:
            self.emb_rel_k = nn.Parameter((1, 2 * self.window + 1, self.head_dim))
            self.emb_rel_v = nn.Parameter((1, 2 * self.window + 1, self.head_dim))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, n, d = x.shape

        def heads(t):  # [b, n, d] -> [b, H, n, hd]
            return nn.op.permute_dims(
                nn.op.reshape(t, (b, n, self.num_heads, self.head_dim)), [0, 2, 1, 3]
            )

        q = heads(self.q_proj(x) * (self.head_dim**-0.5))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = nn.op.matmul(q, nn.op.permute_dims(k, [0, 1, 3, 2]))  # [b, H, n, n]
        if self.window:
            rel_k = nn.op.permute_dims(nn.op.squeeze(self.emb_rel_k, 0))  # [hd, 2w+1]
            scores = scores + _relative_to_absolute(nn.op.matmul(q, rel_k), self.window)
        probs = nn.op.softmax(scores, axis=-1)
        out = nn.op.matmul(probs, v)  # [b, H, n, hd]
        if self.window:
            rel_v = nn.op.squeeze(self.emb_rel_v, 0)  # [2w+1, hd]
            out = out + nn.op.matmul(_absolute_to_relative(probs, self.window), rel_v)
        out = nn.op.reshape(nn.op.permute_dims(out, [0, 2, 1, 3]), (b, n, d))
        return self.out_proj(out)


class VitsFeedForward(nn.Module):
    def __init__(self, config: VitsConfig):
        k = config.ffn_kernel_size
        self.conv_1 = nn.Conv1D(config.hidden_size, config.ffn_dim, k)
        self.conv_2 = nn.Conv1D(config.ffn_dim, config.hidden_size, k)
        self.pad = [0, 0, 0, 0, (k - 1) // 2, k // 2]  # transformers pads left (k-1)//2, right k//2
        self.act = activation("hidden_act", config.hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = nn.op.permute_dims(x, [0, 2, 1])  # [b, d, n]
        x = self.act(self.conv_1(nn.op.pad(x, self.pad)))
        x = self.conv_2(nn.op.pad(x, self.pad))
        return nn.op.permute_dims(x, [0, 2, 1])


class VitsEncoderLayer(nn.Module):
    def __init__(self, config: VitsConfig):
        self.attention = VitsAttention(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = VitsFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class VitsEncoder(nn.Module):
    def __init__(self, config: VitsConfig):
        self.layers = nn.ModuleList(
            [VitsEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        )


class VitsTextEncoder(nn.Module):
    def __init__(self, config: VitsConfig):
        self.scale = math.sqrt(config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = VitsEncoder(config)
        self.project = nn.Conv1D(config.hidden_size, 2 * config.flow_size, 1)

    def forward(self, input_ids: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        """-> hidden states [b, d, n] and prior statistics (means, log-variances) [b, 2F, n]."""
        x = self.embed_tokens(input_ids) * self.scale  # [b, n, d]
        for layer in self.encoder.layers:
            x = layer(x)
        x = nn.op.permute_dims(x, [0, 2, 1])  # [b, d, n]
        return x, self.project(x)


# -- duration predictors ---------------------------------------------------------------------


class VitsDilatedDepthSeparableConv(nn.Module):
    def __init__(self, config: VitsConfig):
        k, c = config.duration_predictor_kernel_size, config.hidden_size
        n = config.depth_separable_num_layers
        self.convs_dilated = nn.ModuleList(
            [_conv(c, c, k, dilation=k**i, groups=c) for i in range(n)]
        )
        self.convs_pointwise = nn.ModuleList([nn.Conv1D(c, c, 1) for _ in range(n)])
        self.norms_1 = nn.ModuleList([nn.LayerNorm(c) for _ in range(n)])
        self.norms_2 = nn.ModuleList([nn.LayerNorm(c) for _ in range(n)])

    def forward(self, x: nn.Tensor, cond: nn.Tensor | None = None) -> nn.Tensor:
        if cond is not None:
            x = x + cond
        for dilated, pointwise, norm1, norm2 in zip(
            self.convs_dilated, self.convs_pointwise, self.norms_1, self.norms_2, strict=True
        ):
            h = nn.op.gelu(_channel_norm(norm1, dilated(x)))
            x = x + nn.op.gelu(_channel_norm(norm2, pointwise(h)))
        return x


class VitsElementwiseAffine(nn.Module):
    def __init__(self, config: VitsConfig):
        self.translate = nn.Parameter((config.depth_separable_channels, 1))
        self.log_scale = nn.Parameter((config.depth_separable_channels, 1))

    def reverse(self, x: nn.Tensor, cond: nn.Tensor) -> nn.Tensor:
        translate, log_scale = self.translate.astype("float32"), self.log_scale.astype("float32")
        return (x - translate) * nn.op.exp(nn.op.negative(log_scale))


class VitsConvFlow(nn.Module):
    """A coupling flow whose second channel goes through a rational-quadratic spline."""

    def __init__(self, config: VitsConfig):
        c, self.bins = config.hidden_size, config.duration_predictor_flow_bins
        self.bound, self.filter_channels = config.duration_predictor_tail_bound, c
        self.conv_pre = nn.Conv1D(1, c, 1)
        self.conv_dds = VitsDilatedDepthSeparableConv(config)
        self.conv_proj = nn.Conv1D(c, 3 * self.bins - 1, 1)

    def reverse(self, x: nn.Tensor, cond: nn.Tensor) -> nn.Tensor:
        """x [b, 2, n] float32 (the spline runs in float32 whatever the weights' dtype)."""
        first, second = nn.op.split(x, 2, axis=1)  # each [b, 1, n]
        h = self.conv_pre(first.astype(self.conv_pre.weight.dtype))
        h = self.conv_proj(self.conv_dds(h, cond)).astype("float32")  # [b, 3K-1, n]
        b, _, n = h.shape
        h = nn.op.permute_dims(nn.op.reshape(h, (b, 1, 3 * self.bins - 1, n)), [0, 1, 3, 2])
        widths, heights, derivatives = nn.op.split(h, [self.bins, 2 * self.bins], axis=-1)
        scale = 1.0 / math.sqrt(self.filter_channels)
        second = _spline_reverse(second, widths * scale, heights * scale, derivatives, self.bound)
        return nn.op.concat([first, second], dim=1)


def _spline_reverse(x, widths, heights, derivatives, bound: float) -> nn.Tensor:
    """The inverse of the piecewise rational-quadratic map on [-bound, bound] (identity outside):
    x [b, 1, n]; unnormalized widths, heights [b, 1, n, K] and inner derivatives [b, 1, n, K-1].
    Gathers by bin are one-hot sums, so the graph keeps static shapes."""
    bins = widths.shape[-1]
    edge = math.log(math.exp(1 - _MIN_DERIVATIVE) - 1)  # the tails' derivative: 1

    def knots(unnormalized):  # -> cumulative positions [.., K+1] and bin sizes [.., K]
        sizes = _MIN_BIN + (1 - _MIN_BIN * bins) * nn.op.softmax(unnormalized, axis=-1)
        inner = nn.op.split(nn.op.cumsum(sizes, axis=-1), [bins - 1], axis=-1)[0]
        inner = (2 * bound) * inner + (-bound)
        low, high = _like(inner, -bound), _like(inner, bound)
        cum = nn.op.concat([low, inner, high], dim=-1)
        left, right = nn.op.split(cum, [bins], axis=-1)[0], nn.op.split(cum, [1], axis=-1)[1]
        return cum, left, right - left

    cumwidths, left_w, widths = knots(widths)
    cumheights, left_h, heights = knots(heights)
    padded = nn.op.concat([_like(x, edge), derivatives, _like(x, edge)], dim=-1)
    derivatives = _MIN_DERIVATIVE + nn.op.softplus(padded)  # [.., K+1]
    # Bin of each input among the height knots (the last nudged up, as the reference does).
    nudge = nn.op.concat([_like(x, 0.0, bins), _like(x, 1e-6)], dim=-1)  # [.., K+1]
    above = (nn.op.unsqueeze(x, -1) >= cumheights + nudge).astype("float32")
    index = nn.op.sum(above, axis=-1, keepdims=True) - 1.0  # [.., 1]
    onehot = nn.op.equal(index, nn.op.arange(0, bins, dtype="float32")).astype("float32")  # [.., K]

    def pick(t):  # t[.., K] at each input's bin -> [b, 1, n]
        return nn.op.sum(t * onehot, axis=-1)

    d_lo, d_hi = (
        nn.op.split(derivatives, [bins], axis=-1)[0],
        nn.op.split(derivatives, [1], axis=-1)[1],
    )
    w, h = pick(widths), pick(heights)
    cw, ch, delta = pick(left_w), pick(left_h), pick(heights / widths)
    d0, d1 = pick(d_lo), pick(d_hi)
    i1 = d0 + d1 - 2.0 * delta
    i2 = x - ch
    i3 = i2 * i1
    a = h * (delta - d0) + i3
    b_ = h * d0 - i3
    c = nn.op.negative(delta) * i2
    root = (2.0 * c) / (nn.op.negative(b_) - nn.op.sqrt(b_ * b_ - 4.0 * a * c))
    inside = nn.op.where(x >= -bound, x <= bound, x > bound)  # -bound <= x <= bound
    return nn.op.where(inside, root * w + cw, x)


def _like(x: nn.Tensor, value: float, width: int = 1) -> nn.Tensor:
    """A constant [*x.shape[:3], width] full of `value` (x: [b, 1, n] or [b, 1, n, K])."""
    return nn.op.zeros([*x.shape[:3], width], dtype="float32") + value


class VitsStochasticDurationPredictor(nn.Module):
    """Reverse mode only: noise -> log-durations through the flows, conditioned on the text."""

    def __init__(self, config: VitsConfig):
        c = config.hidden_size
        self.conv_pre = nn.Conv1D(c, c, 1)
        self.conv_proj = nn.Conv1D(c, c, 1)
        self.conv_dds = VitsDilatedDepthSeparableConv(config)
        if config.speaker_embedding_size:
            self.cond = nn.Conv1D(config.speaker_embedding_size, c, 1)
        flows = [VitsElementwiseAffine(config)]
        flows += [VitsConvFlow(config) for _ in range(config.duration_predictor_num_flows)]
        self.flows = nn.ModuleList(flows)

    def forward(self, hidden: nn.Tensor, noise: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        x = self.conv_pre(hidden)
        if speaker is not None:
            x = x + self.cond(speaker)
        cond = self.conv_proj(self.conv_dds(x))
        # As the reference: flows reversed, without the first conv flow (its "useless vflow").
        flows = list(self.flows)[::-1]
        flows = flows[:-2] + [flows[-1]]
        z = noise
        for flow in flows:
            z = flow.reverse(_flip_channels(z), cond)
        return nn.op.split(z, 2, axis=1)[0]  # [b, 1, n] log-durations


class VitsDurationPredictor(nn.Module):
    def __init__(self, config: VitsConfig):
        k, c = config.duration_predictor_kernel_size, config.duration_predictor_filter_channels
        self.conv_1 = nn.Conv1D(config.hidden_size, c, k, padding=k // 2)
        self.norm_1 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.conv_2 = nn.Conv1D(c, c, k, padding=k // 2)
        self.norm_2 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.proj = nn.Conv1D(c, 1, 1)
        if config.speaker_embedding_size:
            self.cond = nn.Conv1D(config.speaker_embedding_size, config.hidden_size, 1)

    def forward(self, hidden: nn.Tensor, noise: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        if speaker is not None:
            hidden = hidden + self.cond(speaker)
        x = _channel_norm(self.norm_1, nn.op.relu(self.conv_1(hidden)))
        x = _channel_norm(self.norm_2, nn.op.relu(self.conv_2(x)))
        return self.proj(x)


# -- flow and vocoder ------------------------------------------------------------------------


class VitsWaveNet(nn.Module):
    def __init__(self, config: VitsConfig, num_layers: int, layout: str):
        h, k, rate = config.hidden_size, config.wavenet_kernel_size, config.wavenet_dilation_rate
        self.hidden = h
        if config.speaker_embedding_size:  # every layer's speaker bias, [2h] each, stacked
            e = config.speaker_embedding_size
            self.cond_layer = WeightNormConv1D(e, 2 * h * num_layers, 1, 1, layout)
        self.in_layers = nn.ModuleList(
            [WeightNormConv1D(h, 2 * h, k, rate**i, layout) for i in range(num_layers)]
        )
        self.res_skip_layers = nn.ModuleList(
            [
                WeightNormConv1D(h, 2 * h if i < num_layers - 1 else h, 1, 1, layout)
                for i in range(num_layers)
            ]
        )

    def forward(self, x: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        out = None
        last = len(self.in_layers) - 1
        if speaker is not None:  # [b, 2h * layers, 1] -> one [b, 2h, 1] per layer
            biases = nn.op.split(self.cond_layer(speaker), len(self.in_layers), axis=1)
        for i, (conv, res_skip) in enumerate(
            zip(self.in_layers, self.res_skip_layers, strict=True)
        ):
            h = conv(x) if speaker is None else conv(x) + biases[i]
            t, s = nn.op.split(h, 2, axis=1)
            acts = res_skip(nn.op.tanh(t) * nn.op.sigmoid(s))
            if i < last:
                res, skip = nn.op.split(acts, 2, axis=1)
                x = x + res
            else:
                skip = acts
            out = skip if out is None else out + skip
        return out


class VitsResidualCouplingLayer(nn.Module):
    def __init__(self, config: VitsConfig, layout: str):
        half = config.flow_size // 2
        self.conv_pre = nn.Conv1D(half, config.hidden_size, 1)
        self.wavenet = VitsWaveNet(config, config.prior_encoder_num_wavenet_layers, layout)
        self.conv_post = nn.Conv1D(config.hidden_size, half, 1)

    def reverse(self, x: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        first, second = nn.op.split(x, 2, axis=1)
        mean = self.conv_post(self.wavenet(self.conv_pre(first), speaker))
        return nn.op.concat([first, second - mean], dim=1)  # log-stddev is 0: mean only


class VitsResidualCouplingBlock(nn.Module):
    def __init__(self, config: VitsConfig, layout: str):
        self.flows = nn.ModuleList(
            [
                VitsResidualCouplingLayer(config, layout)
                for _ in range(config.prior_encoder_num_flows)
            ]
        )

    def reverse(self, x: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        for flow in reversed(list(self.flows)):
            x = flow.reverse(_flip_channels(x), speaker)
        return x


class HifiGanResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int], slope: float):
        self.slope = slope
        self.convs1 = nn.ModuleList([_conv(channels, channels, kernel, d) for d in dilations])
        self.convs2 = nn.ModuleList([_conv(channels, channels, kernel) for _ in dilations])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            h = conv2(_leaky_relu(conv1(_leaky_relu(x, self.slope)), self.slope))
            x = x + h
        return x


class VitsHifiGan(nn.Module):
    def __init__(self, config: VitsConfig):
        c0, self.slope = config.upsample_initial_channel, config.leaky_relu_slope
        self.kernels = len(config.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1D(config.flow_size, c0, 7, padding=3)
        self.upsampler = nn.ModuleList(
            [
                nn.ConvTranspose1D(
                    c0 // 2**i, c0 // 2 ** (i + 1), k, stride=r, padding=(k - r) // 2
                )
                for i, (r, k) in enumerate(
                    zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
                )
            ]
        )
        self.resblocks = nn.ModuleList(
            [
                HifiGanResidualBlock(c0 // 2 ** (i + 1), k, d, self.slope)
                for i in range(len(config.upsample_rates))
                for k, d in zip(
                    config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True
                )
            ]
        )
        channels = c0 // 2 ** len(config.upsample_rates)
        self.conv_post = nn.Conv1D(channels, 1, 7, padding=3, bias=False)
        if config.speaker_embedding_size:
            self.cond = nn.Conv1D(config.speaker_embedding_size, c0, 1)

    def forward(self, x: nn.Tensor, speaker: nn.Tensor | None) -> nn.Tensor:
        x = self.conv_pre(x)
        if speaker is not None:
            x = x + self.cond(speaker)
        for i, up in enumerate(self.upsampler):
            x = up(_leaky_relu(x, self.slope))
            blocks = self.resblocks[i * self.kernels : (i + 1) * self.kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total * (1.0 / self.kernels)
        x = self.conv_post(_leaky_relu(x, 0.01))  # torch's default slope here, as the reference
        return nn.op.tanh(x)  # [b, 1, samples]


class VitsModel(nn.Module):
    def __init__(self, config: VitsConfig, layout: str = "parametrizations"):
        self.config = config
        self.text_encoder = VitsTextEncoder(config)
        self.flow = VitsResidualCouplingBlock(config, layout)
        self.decoder = VitsHifiGan(config)
        if config.use_stochastic_duration_prediction:
            self.duration_predictor = VitsStochasticDurationPredictor(config)
        else:
            self.duration_predictor = VitsDurationPredictor(config)
        if config.num_speakers > 1:
            self.embed_speaker = nn.Embedding(config.num_speakers, config.speaker_embedding_size)

    @classmethod
    def for_tensors(cls, config: VitsConfig, tensors) -> "VitsModel":
        """The weight-norm layout the checkpoint stores (older files: weight_g / weight_v)."""
        old = any(name.endswith(".weight_g") for name in tensors)
        return cls(config, "weight_g" if old else "parametrizations")

    def _speaker(self, speaker_id: nn.Tensor) -> nn.Tensor | None:
        """[1] speaker id -> its embedding [1, E, 1]; None (ignored) for one speaker."""
        if self.config.num_speakers <= 1:
            return None
        return nn.op.permute_dims(self.embed_speaker(nn.op.reshape(speaker_id, (1, 1))), [0, 2, 1])

    def encode_text(
        self, input_ids: nn.Tensor, duration_noise: nn.Tensor, speaker_id: nn.Tensor
    ) -> nn.Tensor:
        hidden, stats = self.text_encoder(input_ids)  # [1, d, n], [1, 2F, n]
        noise = duration_noise  # float32: the duration flows' state stays float32
        log_duration = self.duration_predictor(hidden, noise, self._speaker(speaker_id))
        parts = [stats.astype("float32"), log_duration.astype("float32")]
        return nn.op.concat(parts, dim=1)  # [1, 2F + 1, n]

    def decode_waveform(self, latents: nn.Tensor, speaker_id: nn.Tensor) -> nn.Tensor:
        speaker = self._speaker(speaker_id)
        x = self.flow.reverse(latents.astype(self.text_encoder.embed_tokens.weight.dtype), speaker)
        wave = self.decoder(x, speaker)  # [1, 1, samples]
        return nn.op.squeeze(wave, 1).astype("float32")

    def speech_manifest(self, tokenizer: dict[str, Any] | None) -> dict[str, Any]:
        """What the runtime needs to tokenize text and turn durations into frames."""
        c = self.config
        return {
            "processor": "vits",
            "sampling_rate": c.sampling_rate,
            "hop_length": c.hop_length,
            "flow_size": c.flow_size,
            "speaking_rate": c.speaking_rate,
            "noise_scale": c.noise_scale,
            "noise_scale_duration": c.noise_scale_duration,
            "stochastic_duration": c.use_stochastic_duration_prediction,
            "num_speakers": c.num_speakers,
            "tokenizer": tokenizer,
        }


def export_vits(model: VitsModel):
    """Export encode_text and decode_waveform: (IRModule, [(name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        "encode_text": {
            "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
            "duration_noise": nn.spec.Tensor([1, 2, "num_tokens"], "float32"),
            "speaker_id": nn.spec.Tensor([1], "int32"),
            "$": modes,
        },
        "decode_waveform": {
            "latents": nn.spec.Tensor([1, model.config.flow_size, "num_frames"], "float32"),
            "speaker_id": nn.spec.Tensor([1], "int32"),
            "$": modes,
        },
    }
    return model.export_tvm(spec=spec)


def vits_tokenizer(folder) -> dict[str, Any]:
    """VitsTokenizer's settings and vocabulary (vocab.json, tokenizer_config.json), so the
    runtime tokenizes without transformers; RelaxlmError for settings it cannot follow."""
    vocab_file = folder / "vocab.json"
    if not vocab_file.is_file():
        raise RelaxlmError(
            f"{folder}: no vocab.json; a VITS checkpoint needs VitsTokenizer's vocab"
        )
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))  # order kept: normalize scans it
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("phonemize", True):
        raise RelaxlmError(
            f"{config_file}: phonemize is true: this tokenizer needs espeak phonemes, which "
            "relaxlm does not produce; use a checkpoint whose tokenizer reads characters "
            "(MMS-TTS models)"
        )
    added = {
        str(t["content"]): int(i)
        for i, t in (config.get("added_tokens_decoder") or {}).items()
        if str(t["content"]) not in vocab
    }
    unk = config.get("unk_token", "<unk>")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    return {
        "vocab": list(vocab.items()) + list(added.items()),
        "unk_id": vocab.get(unk, added.get(unk)),
        "add_blank": bool(config.get("add_blank", True)),
        "normalize": bool(config.get("normalize", True)),
        "is_uroman": bool(config.get("is_uroman", False)),
        "language": config.get("language"),
    }
