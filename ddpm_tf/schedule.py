"""The forward process of Ho et al. 2020: beta schedule tables, q(x_t | x_0), the posterior
q(x_prev | x_t, x_0), and the network's prediction targets (eps, v or x0) and their loss weights.

Tables are computed once in float64 numpy (`Schedule.float64`) and cast once to float32 tensors.
TensorFlow is imported inside the functions that need it, so the lists config.py reads import without it.

Notation, one for the whole package:
- `betas`: beta_t, the noise added at step t.
- `alpha_bar`: the cumulative product alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al.'s alpha-bar).
  Ho et al.'s per-step alpha_t = 1 - beta_t is never used by name here.
- `sqrt_alpha_bar` and `sigma` = sqrt(1 - alpha_bar): the signal and noise scales of
  x_t = sqrt_alpha_bar x0 + sigma eps (Eq. 4). Lu et al. 2022 and Salimans & Ho 2022 write this signal
  scale alpha_t; we write sqrt_alpha_bar, so a bare `alpha` never means two things.
- SNR_t = alpha_bar_t / (1 - alpha_bar_t).
"""

from __future__ import annotations

import numpy as np


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
LOSS_WEIGHTINGS = ("none", "min_snr")  # min_snr: `loss_weight` with a gamma


def posterior(alpha_bar_t, alpha_bar_prev):
    """(c_x0, c_xt, variance) of q(x_prev | x_t, x0) = N(c_x0 x0 + c_xt x_t, variance), float64 numpy.

    Between neighbours these are Eq. 6-7 of Ho et al. 2020; between any two timesteps of the process they
    hold with beta = 1 - alpha_bar_t / alpha_bar_prev (the respaced process, Nichol & Dhariwal 2021, Sec. 4).
    """
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    c_x0 = beta * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar_t)
    c_xt = (1.0 - alpha_bar_prev) * np.sqrt(1.0 - beta) / (1.0 - alpha_bar_t)
    return c_x0, c_xt, beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)


def prediction_target(prediction: str, x0, eps, sqrt_alpha_bar, sigma):
    """What the network learns to output: eps, x0, or v = sqrt_alpha_bar eps - sigma x0 (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return sqrt_alpha_bar * eps - sigma * x0
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def split_prediction(prediction: str, out, x_t, sqrt_alpha_bar, sigma):
    """(x0, eps) from the network output for any objective: the one conversion every sampler uses.

    eps: x0 = (x_t - sigma eps) / sqrt_alpha_bar.  x0: eps = (x_t - sqrt_alpha_bar x0) / sigma.  v: since
    alpha_bar + sigma^2 = 1, x0 = sqrt_alpha_bar x_t - sigma v and eps = sigma x_t + sqrt_alpha_bar v
    (Salimans & Ho 2022, Eq. 5-6).
    """
    if prediction == "eps":
        return (x_t - sigma * out) / sqrt_alpha_bar, out
    if prediction == "x0":
        return out, (x_t - sqrt_alpha_bar * out) / sigma
    if prediction == "v":
        return sqrt_alpha_bar * x_t - sigma * out, sigma * x_t + sqrt_alpha_bar * out
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def loss_weight(prediction: str, snr, gamma: float | None):
    """Per-example weight of the MSE in the objective's own space; gamma None means unweighted (1).

    Min-SNR-gamma (Hang et al. 2023) weights the x0-space error by min(SNR, gamma). With x_t fixed,
    |eps error|^2 = SNR |x0 error|^2 and |v error|^2 = (SNR + 1) |x0 error|^2, so the same weighting
    is min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0.
    """
    from .compat import tf

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
    from .compat import tf

    return tf.reshape(tf.gather(table, t), [-1, 1, 1, 1])


class Schedule:
    """Diffusion tables for a beta schedule: float64 numpy in `.float64`, float32 tensors as attributes."""

    def __init__(self, betas: np.ndarray):
        from .compat import tf

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas < 1).all()
        alpha_bar = np.cumprod(1.0 - betas)
        self.float64 = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": np.sqrt(alpha_bar),
            "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar),
            "snr": alpha_bar / (1.0 - alpha_bar),
        }
        self.timesteps = len(betas)
        for name, table in self.float64.items():
            setattr(self, name, tf.constant(table, dtype=tf.float32))

    @classmethod
    def from_config(cls, diffusion_cfg) -> Schedule:
        """The schedule a `DiffusionConfig` describes."""
        return cls(BETA_SCHEDULES[diffusion_cfg.schedule](diffusion_cfg))

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Eq. 4, Ho et al. 2020)."""
        from .compat import tf

        dtype = x0.dtype
        return (tf.cast(extract(self.sqrt_alpha_bar, t), dtype) * x0
                + tf.cast(extract(self.sqrt_one_minus_alpha_bar, t), dtype) * eps)
