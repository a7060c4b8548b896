"""Reverse-process samplers: small pure functions of (denoise_fn, schedule, x, seeds, ...).

`denoise_fn(x_t, t) -> eps` is the network's noise prediction. Every sampler walks the step indices
[start, stop) of its own timestep sequence with a `tf.while_loop`, so the caller compiles the whole
loop (or a chunk of it, for a progress bar) as one `tf.function`. Randomness is per image: image i
draws its noise from the stateless seed (seeds[i], counter), so an image is the same whatever the
batch it is generated in.
"""

from __future__ import annotations

import numpy as np

from .compat import tf
from .schedule import extract


def per_image_normal(seeds, counter, image_shape):
    """Standard normal noise (B, *image_shape), image i drawn from the stateless seed (seeds[i], counter)."""
    counter = tf.cast(counter, tf.int32)
    return tf.map_fn(lambda s: tf.random.stateless_normal(image_shape, tf.stack([s, counter])),
                     tf.cast(seeds, tf.int32), fn_output_signature=tf.float32)


def initial_noise(seeds, image_shape):
    """x_T for the given per-image seeds (counter -1 is reserved for it)."""
    return per_image_normal(seeds, -1, image_shape)


def ddpm_timesteps(schedule, steps: int | None = None) -> np.ndarray:
    """The ancestral sampler visits every t from T-1 down to 0."""
    del steps
    return np.arange(schedule.timesteps - 1, -1, -1, dtype=np.int32)


def ddpm(denoise_fn, schedule, x, seeds, start, stop, *, variance="small", clip_x0=True, steps=None):
    """Ancestral sampling (Algorithm 2, Ho et al. 2020) over step indices [start, stop) of T-1..0.

    variance 'small' is the posterior variance beta_tilde_t, 'large' is beta_t (Sec. 3.2). The
    predicted x0 is optionally clipped to [-1, 1] before forming the posterior mean.
    """
    del steps
    T = schedule.timesteps
    log_var_table = schedule.posterior_log_variance_clipped if variance == "small" else schedule.log_betas
    batch = tf.shape(x)[0]
    image_shape = tf.shape(x)[1:]

    def body(i, x):
        t_scalar = T - 1 - i
        t = tf.fill([batch], t_scalar)
        eps = tf.cast(denoise_fn(x, t), tf.float32)
        x0 = schedule.predict_x0(x, t, eps)
        if clip_x0:
            x0 = tf.clip_by_value(x0, -1.0, 1.0)
        mean, _, _ = schedule.posterior(x0, x, t)
        noise = per_image_normal(seeds, t_scalar, image_shape)
        nonzero = tf.cast(t_scalar > 0, tf.float32)  # no noise at the last step
        return i + 1, mean + nonzero * tf.exp(0.5 * extract(log_var_table, t)) * noise

    _, x = tf.while_loop(lambda i, x: i < stop, body, [tf.cast(start, tf.int32), x])
    return x


def ddim_timesteps(schedule, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1] (linspace spacing), descending."""
    return np.round(np.linspace(schedule.timesteps - 1, 0, steps)).astype(np.int32)


def ddim(denoise_fn, schedule, x, seeds, start, stop, *, steps=50, clip_x0=True, eta=0.0, variance=None):
    """DDIM (Song et al. 2020, Eq. 12) with `steps` evenly spaced timesteps; eta 0 is deterministic."""
    del variance
    ts = tf.constant(ddim_timesteps(schedule, steps))
    ts_prev = tf.concat([ts[1:], [-1]], axis=0)
    alpha_bar = tf.concat([schedule.alpha_bar, [1.0]], axis=0)  # index -1 -> alpha_bar = 1 (t = -1)
    batch = tf.shape(x)[0]
    image_shape = tf.shape(x)[1:]

    def body(i, x):
        t_scalar, prev_scalar = ts[i], ts_prev[i]
        t = tf.fill([batch], t_scalar)
        eps = tf.cast(denoise_fn(x, t), tf.float32)
        a_t = tf.gather(alpha_bar, t_scalar)
        a_prev = tf.gather(alpha_bar, tf.where(prev_scalar < 0, schedule.timesteps, prev_scalar))
        x0 = (x - tf.sqrt(1.0 - a_t) * eps) / tf.sqrt(a_t)
        if clip_x0:
            x0 = tf.clip_by_value(x0, -1.0, 1.0)
            eps = (x - tf.sqrt(a_t) * x0) / tf.sqrt(1.0 - a_t)
        sigma = eta * tf.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        noise = per_image_normal(seeds, t_scalar, image_shape)
        x = tf.sqrt(a_prev) * x0 + tf.sqrt(tf.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps + sigma * noise
        return i + 1, x

    _, x = tf.while_loop(lambda i, x: i < stop, body, [tf.cast(start, tf.int32), x])
    return x


SAMPLERS = {"ddpm": (ddpm, ddpm_timesteps), "ddim": (ddim, ddim_timesteps)}
