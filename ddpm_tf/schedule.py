"""The forward process of Ho et al. 2020: beta schedule tables, q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0).

Tables are computed once in float64 numpy and cast once to float32 tensors.
"""

from __future__ import annotations

import numpy as np

from .compat import tf


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4: 1e-4 -> 0.02 over T = 1000), float64."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


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
        }
        self.timesteps = len(betas)
        for name, table in self.np.items():
            setattr(self, name, tf.constant(table, dtype=tf.float32))

    @classmethod
    def from_config(cls, diffusion_cfg) -> Schedule:
        """The schedule a `DiffusionConfig` describes."""
        return cls(linear_betas(diffusion_cfg.timesteps, diffusion_cfg.beta_start, diffusion_cfg.beta_end))

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Eq. 4, Ho et al. 2020)."""
        dtype = x0.dtype
        return (tf.cast(extract(self.sqrt_alpha_bar, t), dtype) * x0
                + tf.cast(extract(self.sqrt_one_minus_alpha_bar, t), dtype) * eps)

    def predict_x0(self, x_t, t, eps):
        """x0 from x_t and the predicted noise (Eq. 15 rearranged)."""
        return extract(self.sqrt_recip_alpha_bar, t) * x_t - extract(self.sqrt_recipm1_alpha_bar, t) * eps

    def posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)  (Eq. 6-7)."""
        mean = extract(self.posterior_mean_coef1, t) * x0 + extract(self.posterior_mean_coef2, t) * x_t
        return mean, extract(self.posterior_variance, t), extract(self.posterior_log_variance_clipped, t)
