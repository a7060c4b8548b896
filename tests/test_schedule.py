"""The forward process against closed forms (Ho et al. 2020, Eq. 4, 6, 7)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import tf
from ddpm_tf.schedule import Schedule, extract, linear_betas


@pytest.fixture(scope="module")
def schedule():
    return Schedule(linear_betas(1000, 1e-4, 0.02))


def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000)
    assert b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)


def test_tables_against_closed_forms(schedule):
    s = schedule.np
    b = linear_betas(1000)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), computed here with logs, independently of cumprod.
    alpha_bar = np.exp(np.cumsum(np.log1p(-b)))
    assert np.allclose(s["alpha_bar"], alpha_bar, rtol=1e-12)
    # Known value for the DDPM schedule: alpha_bar_T is about 4.04e-5 (sqrt ~ 0.00635).
    assert s["alpha_bar"][-1] == pytest.approx(4.0358e-5, rel=1e-3)
    t = 500
    expected_var = b[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    assert s["posterior_variance"][t] == pytest.approx(expected_var, rel=1e-12)
    assert s["posterior_variance"][0] == 0.0
    assert s["posterior_log_variance_clipped"][0] == pytest.approx(np.log(s["posterior_variance"][1]))
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
        ab = schedule.np["alpha_bar"][t]
        assert x_t[i].mean() == pytest.approx(np.sqrt(ab) * 0.5, abs=0.02)
        assert x_t[i].var() == pytest.approx(1 - ab, rel=0.05, abs=2e-4)


def test_posterior_matches_bayes(schedule):
    # q(x_{t-1} | x_t, x0) from Bayes' rule on the Gaussians q(x_{t-1}|x0) and q(x_t|x_{t-1}).
    s = schedule.np
    t = 300
    x0, x_t = 0.3, -0.7
    prior_mean, prior_var = np.sqrt(s["alpha_bar"][t - 1]) * x0, 1 - s["alpha_bar"][t - 1]
    lik_scale, lik_var = np.sqrt(s["alphas"][t]), s["betas"][t]
    post_var = 1 / (1 / prior_var + lik_scale**2 / lik_var)
    post_mean = post_var * (prior_mean / prior_var + lik_scale * x_t / lik_var)
    mean, var, _ = schedule.posterior(tf.fill([1, 1, 1, 1], x0), tf.fill([1, 1, 1, 1], x_t), tf.constant([t]))
    assert mean.numpy().item() == pytest.approx(post_mean, rel=1e-5)
    assert var.numpy().item() == pytest.approx(post_var, rel=1e-5)


def test_predict_x0_inverts_q_sample(schedule):
    x0 = tf.random.stateless_uniform([3, 4, 4, 1], seed=[0, 1], minval=-1, maxval=1)
    eps = tf.random.stateless_normal([3, 4, 4, 1], seed=[0, 2])
    t = tf.constant([1, 400, 900])
    x_t = schedule.q_sample(x0, t, eps)
    assert np.allclose(schedule.predict_x0(x_t, t, eps).numpy(), x0.numpy(), atol=2e-3)
