"""Stable Diffusion: the numpy schedulers equal diffusers' step by step."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.schedulers import make_scheduler  # noqa: E402

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
CASES = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    (
        "DDIMScheduler",
        {"timestep_spacing": "linspace", "clip_sample": True, "beta_schedule": "linear"},
    ),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
]


def _close(ours, ref, rel=1e-5):
    """float32 agreement: max error within `rel` of the reference's largest magnitude."""
    err = float(np.abs(ours - ref).max())
    assert err <= rel * float(np.abs(ref).max()), (err, float(np.abs(ref).max()))


@pytest.mark.parametrize(("name", "delta"), CASES)
def test_scheduler_matches_diffusers_step_by_step(name, delta):
    raw = {**SD15, **delta, "_class_name": name}
    ref = getattr(diffusers, name).from_config(raw)
    ours = make_scheduler(raw)
    steps = 7
    ref.set_timesteps(steps)
    ts = ours.timesteps(steps)
    np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=0, atol=0)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma
    xr = torch.from_numpy(x.copy())
    for i, t in enumerate(ts):
        _close(ours.scale_input(x, i), ref.scale_model_input(xr, ref.timesteps[i]).numpy())
        eps = rng.standard_normal(x.shape).astype(np.float32)
        x = ours.step(eps, t, x, i)
        xr = ref.step(torch.from_numpy(eps), ref.timesteps[i], xr).prev_sample
        _close(x, xr.numpy())


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="PNDMScheduler.*not supported"):
        make_scheduler({**SD15, "_class_name": "PNDMScheduler"})
