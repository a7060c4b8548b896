"""The sampling engine: the reverse-process samplers, their registry, and `Sampler`, which compiles one.

`denoise_fn(x_t, t)` is the network's output: eps, v or x0 as the run's `prediction` says, turned into
(x0, eps) by `schedule.split_prediction`, so every sampler works with every objective. A sampler visits a
descending sequence of timesteps; its per-step coefficients are computed once in float64 numpy from the
schedule's alpha_bar (the cumulative product, see schedule.py), and its step is a `tf.while_loop` over the
indices [start, stop) of that sequence, so the caller compiles the whole loop (or a chunk of it, for a
progress bar) as one `tf.function`. The loop state is (x, x0_prev): x0_prev is the previous data
prediction, which the multistep solver needs and the others carry along. Randomness is per image: image i
draws its noise from the stateless seed (seeds[i], t), so an image is the same whatever the batch it is
generated in.

A run with labels samples with classifier-free guidance (Ho & Salimans 2022): `guided_denoiser` wraps the
network so that every sampler gets uncond + W (cond - uncond), both branches in one batched forward pass.

The names, default steps and options of the samplers are read by config.py and cli.py, which must not
import TensorFlow: it is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, RunError
from .schedule import Schedule, posterior, split_prediction

SPACINGS = ("linspace", "trailing")
VARIANCES = ("small", "large")  # the ddpm sampler's reverse variance: the posterior's, or beta
GUIDANCE_DEFAULT = 2.0  # sample.guidance; 1 is the plain conditional model, 0 the unconditional one
GUIDANCE_MAX = 100.0  # the largest scale config and CLI accept


def guide(cond, uncond, guidance: float):
    """Classifier-free guidance in diffusers' convention: uncond + W (cond - uncond). W = 1 is the conditional
    prediction, W = 0 the unconditional one; Ho & Salimans 2022 write (1 + w) cond - w uncond, w = W - 1.
    Linear in the network output, so the same for an eps, v or x0 prediction."""
    return uncond + guidance * (cond - uncond)


def guided_denoiser(net, guidance: float = 1.0):
    """denoise(x_t, t, labels) of `net`: for a network with labels, the guided prediction for (B, K) multi-hot
    `labels` (all zero: the null label, unconditional); the conditional and unconditional branches run as one
    batch of 2B. A network without labels ignores `labels`; augmentation conditioning is always zero (sampling
    is never augmented)."""
    from .compat import tf
    from .unet import network_inputs, num_labels_of

    def call(x, t, labels=None):
        return net(network_inputs(net, x, t, labels), training=False)

    if not num_labels_of(net) or guidance == 0.0:  # no labels given = the null label, unconditional
        return lambda x, t, labels: call(x, t)
    if guidance == 1.0:  # one branch suffices: W = 1 is the conditional prediction itself
        return call

    def denoise(x, t, labels):
        b = tf.shape(x)[0]
        both = call(tf.concat([x, x], 0), tf.concat([t, t], 0), tf.concat([labels, tf.zeros_like(labels)], 0))
        out = tf.cast(both, tf.float32)
        return guide(out[:b], out[b:], guidance)

    return denoise


def per_image_normal(seeds, counter, image_shape):
    """Standard normal noise (B, *image_shape), image i drawn from the stateless seed (seeds[i], counter)."""
    from .compat import tf

    counter = tf.cast(counter, tf.int32)  # seeds are int32 too: every option and key keeps them in 0..seeds.SEED_MAX
    return tf.map_fn(lambda s: tf.random.stateless_normal(image_shape, tf.stack([s, counter])),
                     tf.cast(seeds, tf.int32), fn_output_signature=tf.float32)


def initial_noise(seeds, image_shape):
    """x_T for the given per-image seeds (counter -1 is reserved for it)."""
    return per_image_normal(seeds, -1, image_shape)


def slerp(a: np.ndarray, b: np.ndarray, frac: float) -> np.ndarray:
    """Spherical interpolation from a to b at fraction `frac` (keeps the norm Gaussian noise has, unlike lerp)."""
    a_flat, b_flat = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    cos = np.dot(a_flat, b_flat) / (np.linalg.norm(a_flat) * np.linalg.norm(b_flat))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if theta < 1e-6:
        return ((1 - frac) * a + frac * b).astype(np.float32)
    return ((np.sin((1 - frac) * theta) * a + np.sin(frac * theta) * b) / np.sin(theta)).astype(np.float32)


def make_timesteps(num_timesteps: int, steps: int | None, spacing: str = "linspace") -> np.ndarray:
    """`steps` timesteps out of 0..T-1, descending. linspace: from T-1 to 0 evenly (DDIM's uniform
    choice); trailing: T-1, T-1-T/steps, ... (Lin et al. 2023, 'Common diffusion noise schedules and
    sample steps are flawed', Table 2), which starts at the last timestep and skips the small ones."""
    T = num_timesteps
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the run's diffusion.timesteps), got {steps}")
    if spacing == "linspace":
        ts = np.round(np.linspace(T - 1, 0, steps)) if steps > 1 else np.array([T - 1])
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps))[:steps] - 1
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    return ts.astype(np.int32)


def sampler_timesteps(name: str, num_timesteps: int, steps: int | None, spacing: str = "linspace") -> np.ndarray:
    """The timesteps a sampler visits. DPM-Solver++ with linspace spacing takes `steps` of `steps + 1`
    evenly spaced points and leaves out t = 0, as diffusers does: its last step then goes from t ~ T/steps
    straight to clean data (first order). A second-order step into t = 0, where log-SNR jumps, overshoots
    (a Gaussian's spread comes out 24 % too wide at 20 steps; 4.5 % too narrow this way)."""
    if name == "dpmpp_2m" and spacing == "linspace" and steps is not None and steps < num_timesteps:
        return make_timesteps(num_timesteps, steps + 1, spacing)[:-1]
    return make_timesteps(num_timesteps, steps, spacing)


def _alpha_bars(schedule: Schedule, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_bar at each visited timestep and at the next visited one (1.0 after the last: clean data)."""
    alpha_bar = schedule.float64["alpha_bar"]
    return alpha_bar[ts], np.append(alpha_bar[ts[1:]], 1.0)


# Every sampler is x_next = c_x0 x0 + c_x0_prev x0_prev + c_x x + c_eps eps + c_noise z with its own
# per-step coefficients (arrays over the visited timesteps); the functions below compute them.

def ddpm_coefficients(schedule: Schedule, ts: np.ndarray, variance: str) -> dict:
    """Ancestral sampling (Algorithm 2, Ho et al. 2020) over any timestep subsequence: the posterior
    q(x_next | x_t, x0) of the respaced process (`schedule.posterior`). Over all T steps these are
    exactly Eq. 6-7. 'small' variance is the posterior's beta_tilde, 'large' is the respaced
    beta' = 1 - alpha_bar_t / alpha_bar_next; the last step adds no noise."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    ab_t, ab_next = _alpha_bars(schedule, ts)
    c_x0, c_x, var = posterior(ab_t, ab_next)
    if variance == "large":
        var = 1.0 - ab_t / ab_next
    var[-1] = 0.0
    zeros = np.zeros_like(ab_t)
    return {"c_x0": c_x0, "c_x": c_x, "c_eps": zeros, "c_noise": np.sqrt(var), "c_x0_prev": zeros}


def ddim_coefficients(schedule: Schedule, ts: np.ndarray, eta: float) -> dict:
    """DDIM (Song et al. 2020, Eq. 12): x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next - s^2) eps + s z,
    s = eta sqrt((1 - ab_next) / (1 - ab_t) (1 - ab_t / ab_next)), ab = alpha_bar; eta 0 is deterministic,
    1 is DDPM-like."""
    ab_t, ab_next = _alpha_bars(schedule, ts)
    sigma = eta * np.sqrt((1.0 - ab_next) / (1.0 - ab_t) * (1.0 - ab_t / ab_next))
    zeros = np.zeros_like(ab_t)
    return {"c_x0": np.sqrt(ab_next), "c_x": zeros, "c_eps": np.sqrt(np.maximum(1 - ab_next - sigma**2, 0)),
            "c_noise": sigma, "c_x0_prev": zeros}


def dpmpp_2m_coefficients(schedule: Schedule, ts: np.ndarray) -> dict:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, multistep second order:
    x_next = (sigma_next / sigma_t) x + sqrt_ab_next (1 - e^-h) D, D = (1 - w) x0 + w x0_prev with
    w = -1/(2r), r = h_prev / h, h = lambda_next - lambda_t, lambda = log(sqrt_ab / sigma) (half the
    log-SNR), sqrt_ab = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). First order (w = 0) at the first
    step; the last step returns the data prediction (lambda is infinite at clean data)."""
    ab_t, ab_next = _alpha_bars(schedule, ts)
    sqrt_ab, sigma = np.sqrt(ab_t), np.sqrt(1.0 - ab_t)
    sqrt_ab_next, sigma_next = np.sqrt(ab_next), np.sqrt(1.0 - ab_next)
    lam = np.log(sqrt_ab / sigma)
    with np.errstate(divide="ignore"):
        lam_next = np.log(sqrt_ab_next / sigma_next)  # +inf at the end
    h = lam_next - lam
    c_x, c_d = sigma_next / sigma, sqrt_ab_next * -np.expm1(-h)  # c_d: the coefficient of D
    w = np.zeros_like(ab_t)
    if len(ts) > 2:
        r = h[:-2] / h[1:-1]  # h_prev / h for steps 1 .. K-2
        w[1:-1] = -1.0 / (2.0 * r)
    c_x[-1], c_d[-1], w[-1] = 0.0, 1.0, 0.0
    zeros = np.zeros_like(ab_t)
    return {"c_x0": c_d * (1.0 - w), "c_x": c_x, "c_eps": zeros, "c_noise": zeros, "c_x0_prev": c_d * w}


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its coefficient function, its default step count (None: every timestep),
    the options it takes with their defaults, and a few words for --help."""

    coefficients: Callable[..., dict]
    default_steps: int | None
    options: dict[str, Any] = field(default_factory=dict)
    help: str = ""


# Adding a sampler: its coefficient function above, one entry here, and its test in tests/test_samplers.py.
SAMPLERS = {
    "ddpm": SamplerSpec(ddpm_coefficients, None, {"variance": "small"}, "ancestral"),
    "ddim": SamplerSpec(ddim_coefficients, 50, {"eta": 0.0}),
    "dpmpp_2m": SamplerSpec(dpmpp_2m_coefficients, 20, {}, "DPM-Solver++ 2M"),
}
SAMPLER_NAMES = tuple(SAMPLERS)


def describe_samplers() -> str:
    """'ddpm (ancestral), ddim, dpmpp_2m (DPM-Solver++ 2M)', for --help."""
    return ", ".join(f"{name} ({spec.help})" if spec.help else name for name, spec in SAMPLERS.items())


def describe_default_steps() -> str:
    """'T, 50, 20 for ddpm, ddim, dpmpp_2m': each sampler's default steps, for --help and the config keys."""
    steps = ", ".join("T" if s.default_steps is None else str(s.default_steps) for s in SAMPLERS.values())
    return f"{steps} for {', '.join(SAMPLERS)}"


def sampler_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of sampler `name`: its defaults, updated with `given`; ValueError for one it does not take."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    options = SAMPLERS[name].options
    for key in given:
        if key not in options:
            takers = [n for n, spec in SAMPLERS.items() if key in spec.options]
            who = f" (only {', '.join(takers)} take{'s' if len(takers) == 1 else ''} it)" if takers else ""
            raise ValueError(f"the {name} sampler takes no {key}{who}")
    return {**options, **given}


def reverse_steps(denoise_fn, schedule: Schedule, state, seeds, start, stop, *, timesteps, coefficients,
                  clip_x0=True, prediction="eps"):
    """Steps [start, stop) of x_next = c_x0 x0 + c_x0_prev x0_prev + c_x x + c_eps eps + c_noise z.

    Every sampler above is this update with its own per-step coefficients; x0 and eps come from the
    network's `prediction` (x0 optionally clipped to [-1, 1], eps then made consistent with it).
    """
    from .compat import tf

    ts = tf.constant(timesteps)
    ab_t = tf.constant(schedule.float64["alpha_bar"][timesteps], tf.float32)
    coef = {k: tf.constant(v, tf.float32) for k, v in coefficients.items()}
    x, x0_prev = state
    batch, image_shape = tf.shape(x)[0], tf.shape(x)[1:]

    def body(i, x, x0_prev):
        t = ts[i]
        out = tf.cast(denoise_fn(x, tf.fill([batch], t)), tf.float32)
        x0, eps = split_prediction(prediction, out, x, tf.sqrt(ab_t[i]), tf.sqrt(1.0 - ab_t[i]))
        if clip_x0:
            x0 = tf.clip_by_value(x0, -1.0, 1.0)
            eps = (x - tf.sqrt(ab_t[i]) * x0) / tf.sqrt(1.0 - ab_t[i])
        x_next = (coef["c_x0"][i] * x0 + coef["c_x0_prev"][i] * x0_prev + coef["c_x"][i] * x
                  + coef["c_eps"][i] * eps)
        noise = tf.cond(coef["c_noise"][i] > 0, lambda: per_image_normal(seeds, t, image_shape),
                        lambda: tf.zeros_like(x))
        x_next = x_next + coef["c_noise"][i] * noise
        x_next.set_shape(x.shape)  # the per-image noise has an unknown batch size; the loop needs it fixed
        x0.set_shape(x.shape)
        return i + 1, x_next, x0

    _, x, x0_prev = tf.while_loop(lambda i, *_: i < stop, body, [tf.cast(start, tf.int32), x, x0_prev])
    return x, x0_prev


class Sampler:
    """A compiled reverse loop for one network, schedule, sampler, step count and options.

    The resolved settings are attributes: `name`, `num_steps`, `timesteps`, `spacing`, `clip_x0`,
    `prediction`, `guidance` and `options` (the sampler's own, e.g. ddim's eta or ddpm's variance; an option
    the sampler does not take is a ValueError). `num_labels` is the network's K (0 without labels); a call
    takes one (K,) multi-hot label row per image (none: unconditional). The loop runs in chunks, each one call of a single
    `tf.function` (traced once per batch shape), so Python does about 20 calls per image batch and the
    progress bar still moves.
    """

    def __init__(self, net, schedule: Schedule, name: str = "ddpm", steps: int | None = None, *,
                 spacing: str = "linspace", clip_x0: bool = True, prediction: str = "eps",
                 guidance: float = 1.0, jit_compile: bool = False, chunks: int = 20, **options):
        from .compat import tf
        from .unet import num_labels_of

        if guidance < 0:
            raise ValueError(f"guidance must be >= 0 (0 unconditional, 1 conditional), got {guidance}")
        self.options = sampler_options(name, options)
        self.num_labels, self.guidance = num_labels_of(net), float(guidance)
        self.name, self.spacing, self.clip_x0, self.prediction = name, spacing, bool(clip_x0), prediction
        if steps is None:  # the sampler's default, at most the run's T
            steps = min(SAMPLERS[name].default_steps or schedule.timesteps, schedule.timesteps)
        self.timesteps = sampler_timesteps(name, schedule.timesteps, steps, spacing)
        self.num_steps = len(self.timesteps)
        self.chunk = max(1, -(-self.num_steps // chunks))
        coefficients = SAMPLERS[name].coefficients(schedule, self.timesteps, **self.options)
        self.schedule = schedule

        guided = guided_denoiser(net, self.guidance)

        def run(x, x0_prev, seeds, labels, start, stop):
            return reverse_steps(lambda x_t, t: guided(x_t, t, labels), schedule, (x, x0_prev), seeds, start, stop,
                                 timesteps=self.timesteps, coefficients=coefficients, clip_x0=clip_x0,
                                 prediction=prediction)

        self._run = tf.function(run, jit_compile=jit_compile, reduce_retracing=True)

    @property
    def eta(self) -> float | None:
        """DDIM's eta; None for a sampler that takes none."""
        return self.options.get("eta")

    @property
    def variance(self) -> str | None:
        """DDPM's reverse variance; None for a sampler that takes none."""
        return self.options.get("variance")

    def metadata(self, start_index: int = 0) -> dict:
        """The settings as PNG text metadata ('ddpm_tf:sampler', ...), for images made from `start_index` on."""
        meta = {"ddpm_tf:sampler": self.name, "ddpm_tf:steps": self.num_steps - start_index,
                "ddpm_tf:spacing": self.spacing}
        meta.update({f"ddpm_tf:{key}": value for key, value in self.options.items()})
        meta.update({"ddpm_tf:clip_x0": self.clip_x0, "ddpm_tf:prediction": self.prediction})
        if self.num_labels:
            meta["ddpm_tf:guidance"] = self.guidance
        return meta

    def label_rows(self, labels, count: int) -> np.ndarray:
        """(count, K) float32 label rows: `labels` checked against the network's K, or all zero (unconditional)."""
        if labels is None:
            return np.zeros((count, self.num_labels), np.float32)
        labels = np.asarray(labels, np.float32).reshape(count, -1)
        if labels.shape[1] != self.num_labels:
            raise ValueError(f"labels have {labels.shape[1]} columns, the network takes {self.num_labels}")
        return labels

    def run_steps(self, x, x0_prev, seeds, start: int, stop: int, labels=None):
        """Steps [start, stop) of the compiled loop on tensors: (x, x0_prev) after them (for benchmarks too)."""
        from .compat import tf

        if labels is None:
            labels = self.label_rows(None, int(x.shape[0]))
        return self._run(x, x0_prev, tf.cast(seeds, tf.int32), tf.cast(labels, tf.float32),
                         tf.constant(start, tf.int32), tf.constant(stop, tf.int32))

    def __call__(self, seeds, image_shape, progress=None, x_start=None, start_index: int = 0,
                 labels=None) -> np.ndarray:
        """One image per seed, float32 (B, H, W, C) in about [-1, 1], image i conditioned on row i of `labels`
        (none: unconditional). `x_start` replaces the seeds' x_T and `start_index` skips the first steps
        (x_start must then be noised to that step's level)."""
        from .compat import tf

        labels = tf.constant(self.label_rows(labels, len(seeds)))
        seeds = tf.constant(np.asarray(seeds, dtype=np.int32))
        x = initial_noise(seeds, tf.constant(image_shape, dtype=tf.int32)) if x_start is None else \
            tf.constant(x_start, tf.float32)
        x0_prev = tf.zeros_like(x)
        for start in range(start_index, self.num_steps, self.chunk):
            stop = min(start + self.chunk, self.num_steps)
            x, x0_prev = self.run_steps(x, x0_prev, seeds, start, stop, labels)
            if progress is not None:
                progress(stop - start)
        return x.numpy()


def sampler_from_config(net, cfg, name: str | None = None, steps: int | None = None, *, eta: float | None = None,
                        spacing: str | None = None, guidance: float | None = None, defaults=None) -> Sampler:
    """The sampler a run's config describes, for its network `net`.

    `defaults` (the config's `sample` section unless given, e.g. `cfg.eval`) supplies the sampler, steps
    and eta; `sample` the spacing, variance and clip_x0. The arguments given here override them; one the
    sampler does not take (eta for ddpm) is a ConfigError, while a config default it does not take is
    left out. Steps beyond the run's T are a RunError.
    """
    defaults = cfg.sample if defaults is None else defaults
    name = name or defaults.sampler
    given = {"eta": eta} if eta is not None else {}
    try:
        taken = sampler_options(name, {})
        sampler_options(name, given)
    except ValueError as exc:
        raise ConfigError(f"sampler: {exc}") from None
    config = {"eta": defaults.eta, "variance": cfg.sample.variance}
    options = {**{k: v for k, v in config.items() if k in taken}, **given}
    from .precision import use_xla

    try:
        return Sampler(net, Schedule.from_config(cfg.diffusion), name, steps or defaults.steps or None,
                       spacing=spacing or cfg.sample.spacing, clip_x0=cfg.sample.clip_x0,
                       prediction=cfg.diffusion.prediction, jit_compile=use_xla(cfg.train.jit_compile),
                       guidance=cfg.sample.guidance if guidance is None else guidance, **options)
    except ValueError as exc:  # steps beyond the run's T
        raise RunError(f"sampler: {exc}") from None


def seeds_by_condition(seeds, vectors) -> tuple[np.ndarray, np.ndarray]:
    """Every seed under every condition, condition after condition: (R * N,) seeds and (R * N, K) label rows
    for R label vectors (R, K) and N seeds, so a grid with N columns has one row per condition."""
    seeds, vectors = np.asarray(seeds, np.int64), np.asarray(vectors, np.float32)
    return np.tile(seeds, len(vectors)), np.repeat(vectors, len(seeds), axis=0)


def preview_grid(label_set, first_seed: int, n: int):
    """(seeds, label rows or None, columns or None) of a preview of about `n` images: without labels n seeds
    in a near-square grid; with labels one row per label, the same seeds in every row. A run with more labels
    than fit gets an even spread of them (classes) or the most frequent (tags): about sqrt(n) rows."""
    if not label_set:
        return first_seed + np.arange(n), None, None
    k = len(label_set)
    rows = min(k, max(1, int(np.ceil(np.sqrt(n)))))
    picked = np.unique(np.round(np.linspace(0, k - 1, rows)).astype(int)) if label_set.mode == "folders" \
        else np.arange(rows)
    cols = max(1, n // len(picked))
    seeds, labels = seeds_by_condition(first_seed + np.arange(cols), np.eye(k, dtype=np.float32)[picked])
    return seeds, labels, cols


def sample_seeds(sampler, seeds, image_shape, batch_size: int, progress_factory=None, echo=print,
                 desc: str | None = None, beat=None, labels=None) -> np.ndarray:
    """uint8 images, one per seed (conditioned on the matching row of `labels`, (N, K), when given), in batches,
    with a progress bar over all their sampler steps; `beat(n)` (a stall watchdog's) is called with the steps
    of every finished chunk."""
    total = sampler.num_steps * -(-len(seeds) // batch_size)
    bar = progress_factory(total=total, desc=desc) if progress_factory else None
    hooks = [h for h in (bar.update if bar else None, beat) if h is not None]
    try:
        return _run_batches(sampler, seeds, sampler.label_rows(labels, len(seeds)), image_shape, batch_size,
                            lambda n: [h(n) for h in hooks], echo)
    finally:
        if bar is not None:
            bar.close()


def _run_batches(sampler, seeds, labels, image_shape, batch_size: int, progress, echo) -> np.ndarray:
    """Sample all seeds in batches; a batch that does not fit in memory is split in two and retried."""
    from .compat import tf
    from .images import to_uint8

    images, lo = [], 0
    while lo < len(seeds):
        batch = seeds[lo:lo + batch_size]
        try:
            x = sampler(batch, image_shape, progress=progress, labels=labels[lo:lo + len(batch)])
        except tf.errors.ResourceExhaustedError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            echo(f"out of memory: retrying with batches of {batch_size}")
            continue
        images.append(to_uint8(x))
        lo += len(batch)
    return np.concatenate(images)
