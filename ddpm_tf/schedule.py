"""The forward process of Ho et al. 2020: beta schedule tables, q(x_t | x_0), the posterior
q(x_{t-1} | x_t, x_0), and the network's prediction targets (eps, v or x0) and their loss weights.

Tables are computed once in float64 numpy and cast once to float32 tensors. Notation: alpha_t =
sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), so x_t = alpha_t x0 + sigma_t eps and
SNR_t = alpha_t^2 / sigma_t^2.
"""

from __future__ import annotations

import numpy as np

from .compat import tf


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4: 1e-4 -> 0.02 over T = 1000), float64."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2,
    betas_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped to max_beta (0.999) against the singularity at t = T."""
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1.0 + s) * np.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


BETA_SCHEDULES = {"linear": lambda cfg: linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end),
                  "cosine": lambda cfg: cosine_betas(cfg.timesteps, cfg.cosine_s)}
PREDICTIONS = ("eps", "v", "x0")


def prediction_target(prediction: str, x0, eps, alpha, sigma):
    """What the network learns to output: eps, x0, or v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def split_prediction(prediction: str, out, x_t, alpha, sigma):
    """(x0, eps) from the network output for any objective: the one conversion every sampler uses.

    eps: x0 = (x_t - sigma eps) / alpha.  x0: eps = (x_t - alpha x0) / sigma.  v: since alpha^2 +
    sigma^2 = 1, x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v (Salimans & Ho 2022, Eq. 5-6).
    """
    if prediction == "eps":
        return (x_t - sigma * out) / alpha, out
    if prediction == "x0":
        return out, (x_t - alpha * out) / sigma
    if prediction == "v":
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def loss_weight(prediction: str, snr, gamma: float | None):
    """Per-example weight of the MSE in the objective's own space; gamma None means unweighted (1).

    Min-SNR-gamma (Hang et al. 2023) weights the x0-space error by min(SNR, gamma). With x_t fixed,
    |eps error|^2 = SNR |x0 error|^2 and |v error|^2 = (SNR + 1) |x0 error|^2, so the same weighting
    is min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0.
    """
    if gamma is None:
        return tf.ones_like(snr)
    clipped = tf.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "x0":
        return clipped
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def extract(table, t):
    """table[t] reshaped to (B, 1, 1, 1) so it broadcasts over images (B, H, W, C)."""
    return tf.reshape(tf.gather(table, t), [-1, 1, 1, 1])


class Schedule:
    """Diffusion tables for a beta schedule; numpy float64 in `.np`, float32 tensors as attributes."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas < 1).all()
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        # Eq. 7, Ho et al. 2020: posterior variance beta_tilde_t and mean coefficients.
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.np = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": np.sqrt(alpha_bar),
            "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar),
            "sqrt_recip_alpha_bar": np.sqrt(1.0 / alpha_bar),
            "sqrt_recipm1_alpha_bar": np.sqrt(1.0 / alpha_bar - 1.0),
            "posterior_variance": posterior_variance,
            # beta_tilde_0 is 0; log of it is clipped to beta_tilde_1, as in the DDPM reference code.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "log_betas": np.log(np.append(posterior_variance[1], betas[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
            "posterior_mean_coef2": (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar),
            "snr": alpha_bar / (1.0 - alpha_bar),
        }
        self.timesteps = len(betas)
        for name, table in self.np.items():
            setattr(self, name, tf.constant(table, dtype=tf.float32))

    @classmethod
    def from_config(cls, diffusion_cfg) -> Schedule:
        """The schedule a `DiffusionConfig` describes."""
        return cls(BETA_SCHEDULES[diffusion_cfg.schedule](diffusion_cfg))

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Eq. 4, Ho et al. 2020)."""
        dtype = x0.dtype
        return (tf.cast(extract(self.sqrt_alpha_bar, t), dtype) * x0
                + tf.cast(extract(self.sqrt_one_minus_alpha_bar, t), dtype) * eps)

    def posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)  (Eq. 6-7)."""
        mean = extract(self.posterior_mean_coef1, t) * x0 + extract(self.posterior_mean_coef2, t) * x_t
        return mean, extract(self.posterior_variance, t), extract(self.posterior_log_variance_clipped, t)
