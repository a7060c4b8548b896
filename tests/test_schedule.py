"""The forward process against closed forms (Ho et al. 2020, Eq. 4, 6, 7)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import tf
from ddpm_tf.config import DiffusionConfig
from ddpm_tf.schedule import (
    PREDICTIONS,
    Schedule,
    cosine_betas,
    extract,
    linear_betas,
    loss_weight,
    posterior,
    prediction_target,
    split_prediction,
)


@pytest.fixture(scope="module")
def schedule():
    return Schedule(linear_betas(1000, 1e-4, 0.02))


def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000)
    assert b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)


def test_tables_against_closed_forms(schedule):
    s = schedule.float64
    b = linear_betas(1000)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), computed here with logs, independently of cumprod.
    alpha_bar = np.exp(np.cumsum(np.log1p(-b)))
    assert np.allclose(s["alpha_bar"], alpha_bar, rtol=1e-12)
    # Known value for the DDPM schedule: alpha_bar_T is about 4.04e-5 (sqrt ~ 0.00635).
    assert s["alpha_bar"][-1] == pytest.approx(4.0358e-5, rel=1e-3)
    t = 500
    expected_var = b[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    assert posterior(s["alpha_bar"][t], s["alpha_bar"][t - 1])[2] == pytest.approx(expected_var, rel=1e-12)
    assert posterior(s["alpha_bar"][0], 1.0)[2] == 0.0  # the step into clean data adds no noise
    # The float32 tensors are the float64 tables cast once.
    assert schedule.alpha_bar.dtype == tf.float32
    assert np.allclose(schedule.alpha_bar.numpy(), s["alpha_bar"].astype(np.float32))


def test_extract_shape(schedule):
    out = extract(schedule.betas, tf.constant([0, 999]))
    assert out.shape == (2, 1, 1, 1)
    assert np.allclose(out.numpy().ravel(), [1e-4, 0.02])


def test_q_sample_statistics(schedule):
    # x0 = 0.5 everywhere: x_t ~ N(sqrt(ab_t) * 0.5, 1 - ab_t)  (Eq. 4).
    t_values = [0, 250, 999]
    x0 = tf.fill([len(t_values), 64, 64, 8], 0.5)
    eps = tf.random.stateless_normal(x0.shape, seed=[1, 2])
    x_t = schedule.q_sample(x0, tf.constant(t_values), eps).numpy()
    for i, t in enumerate(t_values):
        ab = schedule.float64["alpha_bar"][t]
        assert x_t[i].mean() == pytest.approx(np.sqrt(ab) * 0.5, abs=0.02)
        assert x_t[i].var() == pytest.approx(1 - ab, rel=0.05, abs=2e-4)


def test_posterior_matches_bayes(schedule):
    # q(x_{t-1} | x_t, x0) from Bayes' rule on the Gaussians q(x_{t-1}|x0) and q(x_t|x_{t-1}).
    s = schedule.float64
    t = 300
    x0, x_t = 0.3, -0.7
    prior_mean, prior_var = np.sqrt(s["alpha_bar"][t - 1]) * x0, 1 - s["alpha_bar"][t - 1]
    lik_scale, lik_var = np.sqrt(1 - s["betas"][t]), s["betas"][t]
    post_var = 1 / (1 / prior_var + lik_scale**2 / lik_var)
    post_mean = post_var * (prior_mean / prior_var + lik_scale * x_t / lik_var)
    c_x0, c_xt, var = posterior(s["alpha_bar"][t], s["alpha_bar"][t - 1])  # what the ddpm sampler steps with
    mean = c_x0 * x0 + c_xt * x_t
    assert mean == pytest.approx(post_mean, rel=1e-5)
    assert var == pytest.approx(post_var, rel=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_converts_back_to_x0_and_eps(schedule, prediction):
    x0 = tf.random.stateless_uniform([3, 4, 4, 1], seed=[0, 1], minval=-1, maxval=1)
    eps = tf.random.stateless_normal([3, 4, 4, 1], seed=[0, 2])
    t = tf.constant([1, 400, 900])
    x_t = schedule.q_sample(x0, t, eps)
    sqrt_alpha_bar, sigma = extract(schedule.sqrt_alpha_bar, t), extract(schedule.sqrt_one_minus_alpha_bar, t)
    target = prediction_target(prediction, x0, eps, sqrt_alpha_bar, sigma)
    if prediction == "v":  # Salimans & Ho 2022: v = sqrt(alpha_bar) eps - sigma x0, by hand in float64
        ab = schedule.float64["alpha_bar"][[1, 400, 900]].reshape(-1, 1, 1, 1)
        v = np.sqrt(ab) * eps.numpy() - np.sqrt(1 - ab) * x0.numpy()
        assert np.allclose(target.numpy(), v, atol=1e-6)
    x0_back, eps_back = split_prediction(prediction, target, x_t, sqrt_alpha_bar, sigma)
    # eps -> x0 divides by sqrt_alpha_bar (0.08 at t = 900), x0 -> eps by sigma (0.01 at t = 1): float32
    # round-off grows.
    assert np.allclose(x0_back.numpy(), x0.numpy(), atol=2e-3)
    assert np.allclose(eps_back.numpy(), eps.numpy(), atol=2e-3)


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    b = cosine_betas(T, s)
    alpha_bar = np.cumprod(1 - b)
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731 - Eq. 17, Nichol & Dhariwal 2021
    t = np.arange(1, T + 1)
    # Before the clip at 0.999 (only the very last beta), alpha_bar_t = f(t) / f(0) exactly.
    assert np.allclose(alpha_bar[:-1], f(t[:-1]) / f(0), rtol=1e-10)
    assert b.max() == pytest.approx(0.999) and (b[:-1] < 0.999).all() and (b > 0).all()
    assert alpha_bar[T // 2 - 1] == pytest.approx(f(T / 2) / f(0))  # about 0.494: half the signal at mid-way
    sched = Schedule.from_config(DiffusionConfig(timesteps=T, schedule="cosine"))
    assert np.allclose(sched.float64["betas"], b)
    assert np.allclose(sched.float64["snr"], alpha_bar / (1 - alpha_bar))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_equal_min_snr_times_x0_error(schedule, prediction):
    # Hang et al. 2023: whatever the objective, the weighted loss is min(SNR, gamma) |x0 - x0_hat|^2.
    gamma = 5.0
    t = tf.constant([0, 50, 200, 500, 999])
    x0 = tf.random.stateless_uniform([5, 8, 8, 1], seed=[3, 1], minval=-1, maxval=1)
    eps = tf.random.stateless_normal([5, 8, 8, 1], seed=[3, 2])
    x_t = schedule.q_sample(x0, t, eps)
    sqrt_alpha_bar, sigma = extract(schedule.sqrt_alpha_bar, t), extract(schedule.sqrt_one_minus_alpha_bar, t)
    out = (prediction_target(prediction, x0, eps, sqrt_alpha_bar, sigma)
           + 0.1 * tf.random.stateless_normal(x0.shape, [3, 3]))
    x0_hat, _ = split_prediction(prediction, out, x_t, sqrt_alpha_bar, sigma)
    target = prediction_target(prediction, x0, eps, sqrt_alpha_bar, sigma)
    snr = tf.gather(schedule.snr, t)
    weighted = loss_weight(prediction, snr, gamma) * tf.reduce_mean(tf.square(out - target), axis=[1, 2, 3])
    ab = schedule.float64["alpha_bar"][t.numpy()]
    expected = np.minimum(ab / (1 - ab), gamma) * np.mean(np.square(x0_hat - x0), axis=(1, 2, 3))
    assert np.allclose(weighted.numpy(), expected, rtol=2e-3)
    assert np.allclose(loss_weight(prediction, snr, None).numpy(), 1.0)
