"""Samplers against the closed-form denoiser of Gaussian data, determinism and per-image seeds."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import keras, tf
from ddpm_tf.config import DiffusionConfig, ModelConfig
from ddpm_tf.samplers import Sampler, initial_noise, make_timesteps
from ddpm_tf.schedule import Schedule, extract, linear_betas, prediction_target
from ddpm_tf.unet import build_unet

MU, S = 0.3, 0.5


class GaussianDenoiser:
    """The exact E[eps | x_t] when every pixel of x0 is N(MU, S^2), called like a Keras model; with
    another `prediction` it returns the matching E[v | x_t] or E[x0 | x_t] (all linear in x_t)."""

    def __init__(self, schedule, prediction="eps"):
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, inputs, training=False):
        x_t, t = inputs
        ab = extract(self.schedule.alpha_bar, t)
        eps = tf.sqrt(1.0 - ab) / (ab * S**2 + 1.0 - ab) * (x_t - tf.sqrt(ab) * MU)
        # E[x0 | x_t] directly (not (x_t - sigma eps) / sqrt(alpha_bar), which loses float32 digits as alpha_bar -> 0).
        x0 = (tf.sqrt(ab) * S**2 * x_t + (1.0 - ab) * MU) / (ab * S**2 + 1.0 - ab)
        return prediction_target(self.prediction, x0, eps, tf.sqrt(ab), tf.sqrt(1.0 - ab))


# Tolerances on the spread: DDIM is a first-order ODE solver, and at 50 steps it under-disperses a
# Gaussian by about 5.6 % (the same computation in float64 numpy gives 0.472 for S = 0.5); at 500
# steps the error is under 1 %. A wrong coefficient anywhere is off by far more.
@pytest.mark.parametrize("name, steps, options, rel_std", [
    ("ddpm", None, {"variance": "small"}, 0.03),
    ("ddpm", None, {"variance": "large"}, 0.03),
    ("ddim", 50, {"eta": 0.0}, 0.08),
    ("ddim", 500, {"eta": 0.0}, 0.025),
    ("ddim", 500, {"eta": 1.0}, 0.03),  # at 50 steps eta 1 under-disperses by 11 % (numpy: 0.443)
    # Second order: 4.5 % narrow at 20 steps (numpy float64: 0.4775), where DDIM is 14 % narrow.
    ("dpmpp_2m", 20, {}, 0.06),
    ("dpmpp_2m", 20, {"spacing": "trailing"}, 0.06),
    ("dpmpp_2m", 50, {}, 0.02),
    ("ddim", 100, {"spacing": "trailing"}, 0.05),
])
def test_samplers_recover_gaussian_data(name, steps, options, rel_std):
    schedule = Schedule(linear_betas(1000))
    sampler = Sampler(GaussianDenoiser(schedule), schedule, name, steps, clip_x0=False, **options)
    x = sampler(np.arange(8), (32, 32, 1))  # 8192 scalar samples
    assert x.mean() == pytest.approx(MU, abs=0.02)
    assert x.std() == pytest.approx(S, rel=rel_std)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("name, steps, rel_std", [("ddpm", 250, 0.04), ("ddim", 100, 0.05), ("dpmpp_2m", 25, 0.05)])
def test_every_sampler_works_with_every_objective(schedule_name, prediction, name, steps, rel_std):
    schedule = Schedule.from_config(DiffusionConfig(timesteps=1000, schedule=schedule_name))
    sampler = Sampler(GaussianDenoiser(schedule, prediction), schedule, name, steps, clip_x0=False,
                      prediction=prediction)
    x = sampler(np.arange(8), (32, 32, 1))
    assert x.mean() == pytest.approx(MU, abs=0.02)
    assert x.std() == pytest.approx(S, rel=rel_std)
    # The same sampler driven by the eps form of the same denoiser lands on the same images.
    eps_sampler = Sampler(GaussianDenoiser(schedule, "eps"), schedule, name, steps, clip_x0=False)
    assert np.allclose(eps_sampler(np.arange(2), (32, 32, 1)), x[:2], atol=2e-3)


def test_an_option_the_sampler_does_not_take_is_refused():
    schedule = Schedule(linear_betas(20))
    for name in ("ddpm", "dpmpp_2m"):
        with pytest.raises(ValueError, match=f"the {name} sampler takes no eta"):
            Sampler(GaussianDenoiser(schedule), schedule, name, eta=0.5)
    sampler = Sampler(GaussianDenoiser(schedule), schedule, "ddim", 5, eta=0.5, spacing="trailing")
    assert (sampler.name, sampler.num_steps, sampler.eta, sampler.variance) == ("ddim", 5, 0.5, None)
    assert sampler.metadata(start_index=2)["ddpm_tf:steps"] == 3
    assert sampler.metadata()["ddpm_tf:spacing"] == "trailing"


def test_timestep_spacings():
    ts = make_timesteps(1000, 50, "linspace")
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    trailing = make_timesteps(1000, 50, "trailing")
    assert list(trailing[:3]) == [999, 979, 959] and trailing[-1] == 19
    assert list(make_timesteps(1000, None)) == list(range(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="1..1000"):
            make_timesteps(1000, bad)


def test_ddim_eta0_is_deterministic_given_x_T():
    schedule = Schedule(linear_betas(1000))
    sampler = Sampler(GaussianDenoiser(schedule), schedule, "ddim", 20, clip_x0=False)
    x_T = initial_noise(tf.constant([5, 6]), tf.constant([4, 4, 1])).numpy()
    a = sampler([5, 6], (4, 4, 1), x_start=x_T)
    b = sampler([100, 200], (4, 4, 1), x_start=x_T)  # other seeds: eta 0 draws no noise
    assert np.array_equal(a, b)
    # ...and a stochastic sampler does depend on them.
    ddpm = Sampler(GaussianDenoiser(schedule), schedule, "ddpm", clip_x0=False)
    assert not np.allclose(ddpm([5, 6], (4, 4, 1), x_start=x_T), ddpm([100, 200], (4, 4, 1), x_start=x_T))


def _random_net():
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                      dropout=0.0, norm_groups=8)
    net = build_unet(cfg, 16, 3)
    rng = np.random.default_rng(0)
    for w in net.weights:  # a non-zero output conv, so the network matters
        w.assign(rng.normal(0, 0.05, w.shape).astype(np.float32) + w.numpy())
    return net


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_same_seed_same_images_whatever_the_batch(name):
    net = _random_net()
    schedule = Schedule(linear_betas(20))
    options = {"eta": 0.5} if name == "ddim" else {}  # the others take no eta
    sampler = Sampler(net, schedule, name, 10 if name != "ddpm" else None, **options)
    shape = (16, 16, 3)
    eight = sampler(np.arange(10, 18), shape)
    three = sampler(np.arange(10, 13), shape)
    one = sampler([12], shape)
    assert np.allclose(three, eight[:3], atol=1e-4)
    assert np.allclose(one[0], eight[2], atol=1e-4)
    again = sampler(np.arange(10, 13), shape)
    assert np.array_equal(again, three)
    assert not np.allclose(eight[0], eight[1])


def test_initial_noise_is_per_image():
    a = initial_noise(tf.constant([1, 2, 3]), tf.constant([4, 4, 1])).numpy()
    b = initial_noise(tf.constant([3]), tf.constant([4, 4, 1])).numpy()
    assert np.array_equal(a[2], b[0])
    assert abs(a.std() - 1) < 0.3
