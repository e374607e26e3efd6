"""Diffusion noise schedulers (DDIM, Euler discrete) in numpy, read from a diffusers
`scheduler_config.json` and equal to diffusers' deterministic path step by step.

Data in, data out: `timesteps(n)` gives the schedule, `scale_input` and `step` are pure
functions of (latents, model output, step index), so a whole denoising loop is tested
against diffusers without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of diffusers' `scheduler_config.json` that DDIM and Euler read."""

    _class_name: str = "DDIMScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = (
        None  # each scheduler's own default: DDIM leading, Euler linspace
    )
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    interpolation_type: str = "linear"
    final_sigmas_type: str = "zero"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> SchedulerConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )


def _alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float32) ** 2
    else:
        raise ValueError(
            f"beta_schedule {cfg.beta_schedule!r} is not supported (linear, scaled_linear)"
        )
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _spaced_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """diffusers' `timestep_spacing` (Table 2 of arXiv:2305.08891), as float64 values."""
    n = cfg.num_train_timesteps
    if not 0 < steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)) - 1
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")


class DDIMScheduler:
    """DDIM with eta = 0 (deterministic), as diffusers' `DDIMScheduler`."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg = replace(cfg, timestep_spacing=cfg.timestep_spacing or "leading")
        self.alphas_cumprod = _alphas_cumprod(cfg)
        self.final_alpha_cumprod = (
            np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        )
        self.init_noise_sigma = 1.0
        self.steps = 0

    def timesteps(self, steps: int) -> np.ndarray:
        self.steps = steps
        if self.cfg.timestep_spacing == "linspace":
            return _spaced_timesteps(self.cfg, steps).round().astype(np.int64)
        return _spaced_timesteps(self.cfg, steps).astype(np.int64)

    def scale_input(self, latents: np.ndarray, index: int) -> np.ndarray:
        return latents

    def step(
        self, model_output: np.ndarray, timestep: int, latents: np.ndarray, index: int
    ) -> np.ndarray:
        cfg = self.cfg
        prev = int(timestep) - cfg.num_train_timesteps // self.steps
        a_t = self.alphas_cumprod[int(timestep)]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if cfg.prediction_type == "epsilon":
            x0, eps = (latents - b_t**0.5 * model_output) / a_t**0.5, model_output
        elif cfg.prediction_type == "v_prediction":
            x0 = a_t**0.5 * latents - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * latents
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (latents - a_t**0.5 * x0) / b_t**0.5
        else:
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported")
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)


class EulerDiscreteScheduler:
    """Euler discrete without churn (s_churn = 0), as diffusers' `EulerDiscreteScheduler`."""

    def __init__(self, cfg: SchedulerConfig):
        if cfg.interpolation_type != "linear":
            raise ValueError(
                f"interpolation_type {cfg.interpolation_type!r} is not supported (linear)"
            )
        self.cfg = cfg = replace(cfg, timestep_spacing=cfg.timestep_spacing or "linspace")
        self.alphas_cumprod = _alphas_cumprod(cfg)
        self.sigmas = np.zeros(1, np.float32)

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        return top if self.cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def timesteps(self, steps: int) -> np.ndarray:
        t = _spaced_timesteps(self.cfg, steps).astype(np.float32)
        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(t, np.arange(len(train_sigmas)), train_sigmas)
        if self.cfg.final_sigmas_type == "sigma_min":
            last = float(train_sigmas[0])
        elif self.cfg.final_sigmas_type == "zero":
            last = 0.0
        else:
            raise ValueError(f"final_sigmas_type {self.cfg.final_sigmas_type!r} is not supported")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return t

    def scale_input(self, latents: np.ndarray, index: int) -> np.ndarray:
        return (latents / (self.sigmas[index] ** 2 + 1) ** 0.5).astype(np.float32)

    def step(
        self, model_output: np.ndarray, timestep: float, latents: np.ndarray, index: int
    ) -> np.ndarray:
        sigma = self.sigmas[index]
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            x0 = latents - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)
        elif kind in ("sample", "original_sample"):
            x0 = model_output
        else:
            raise ValueError(f"prediction_type {kind!r} is not supported")
        derivative = (latents - x0) / sigma
        return (latents + derivative * (self.sigmas[index + 1] - sigma)).astype(np.float32)


@dataclass(frozen=True)
class FlowMatchConfig:
    """The keys of diffusers' `FlowMatchEulerDiscreteScheduler` config that FLUX uses."""

    _class_name: str = "FlowMatchEulerDiscreteScheduler"
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False
    extra: dict = field(default_factory=dict)

    from_dict = classmethod(SchedulerConfig.from_dict.__func__)


class FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler steps, as diffusers' `FlowMatchEulerDiscreteScheduler` driven by
    `FluxPipeline` (sigmas linspace(1, 1/n, n), shifted by `mu` from the image's token count
    when `use_dynamic_shifting`)."""

    def __init__(self, cfg: FlowMatchConfig):
        unsupported = {
            "invert_sigmas": cfg.invert_sigmas,
            "shift_terminal": cfg.shift_terminal,
            "use_karras_sigmas": cfg.use_karras_sigmas,
            "use_exponential_sigmas": cfg.use_exponential_sigmas,
            "use_beta_sigmas": cfg.use_beta_sigmas,
            "stochastic_sampling": cfg.stochastic_sampling,
        }
        for key, value in unsupported.items():
            if value:
                raise ValueError(
                    f"FlowMatchEulerDiscreteScheduler {key}={value!r} is not supported; "
                    "remove it from scheduler_config.json"
                )
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {cfg.time_shift_type!r} is not supported")
        self.cfg = cfg
        self.init_noise_sigma = 1.0
        self.sigmas = np.zeros(1, np.float32)

    def mu(self, image_seq_len: int) -> float:
        """FluxPipeline's `calculate_shift`: mu linear in the image's token count."""
        c = self.cfg
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return image_seq_len * m + (c.base_shift - m * c.base_image_seq_len)

    def timesteps(self, steps: int, image_seq_len: int) -> np.ndarray:
        """The `steps` timesteps (sigma * 1000, float32) for an image of `image_seq_len` tokens."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        c = self.cfg
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        if c.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            if c.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
        sigmas = sigmas.astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return sigmas * np.float32(c.num_train_timesteps)

    def step(self, model_output: np.ndarray, latents: np.ndarray, index: int) -> np.ndarray:
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (latents.astype(np.float32) + dt * model_output).astype(np.float32)


SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
}


def make_flow_match_scheduler(raw: dict) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching scheduler of a FLUX folder's `scheduler_config.json`."""
    cfg = FlowMatchConfig.from_dict(raw)
    if cfg._class_name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"scheduler {cfg._class_name!r} is not supported for FLUX "
            "(FlowMatchEulerDiscreteScheduler)"
        )
    return FlowMatchEulerDiscreteScheduler(cfg)


def make_scheduler(raw: dict, name: str | None = None):
    """The scheduler a diffusers `scheduler_config.json` names (or `name`, with that config)."""
    cfg = SchedulerConfig.from_dict(raw)
    name = name or cfg._class_name
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported; use one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](cfg)
