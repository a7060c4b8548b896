"""`ddpm eval` and the in-training eval, orchestration only: a run's samples (generated, or a folder) and
its training images -> features -> KID, FID and the memorisation report -> eval.csv, TensorBoard, PNGs.

The maths is in metrics.py and memorization.py, the feature networks in report.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compat import tf
from ..images import make_grid, save_png
from ..runs import RunDir, append_csv_row, load_run
from ..samplers import sample_seeds, sampler_from_config
from ..seeds import check_seed_range
from .memorization import save_pairs_png
from .report import (
    evaluate_images,
    load_features,
    load_image_folder,
    prepare_reference,
    save_memorization_csv,
    write_tensorboard,
)


def training_images(cfg, echo=print) -> np.ndarray:
    """The run's training set as (N, S, S, C) uint8, exactly as training reads it (from its data cache,
    which is brought up to date first, as `ddpm train` does)."""
    from ..data.prepare import prepare

    prepared = prepare(cfg.data, echo=lambda msg: None, only_changes=True)
    images = prepared.images(memory_mb=float("inf"))  # the features need every image in memory
    echo(f"reference: {len(images)} training images from {cfg.data.dir} (cache {prepared.cache_dir})")
    return images


def with_eval_overrides(cfg, overrides: list[str]):
    """The run's config with `eval.key=value` overrides applied (other sections belong to the run)."""
    from ..config import from_dict, parse_override, to_dict
    from ..errors import ConfigError

    parsed = [parse_override(o) for o in overrides]
    for key, _ in parsed:
        if not key.startswith("eval."):
            raise ConfigError(f"--set {key}: ddpm eval only overrides eval.* keys (the rest is the run's)")
    return from_dict(to_dict(cfg), "the run's config.yaml", parsed) if parsed else cfg


def generate(net, cfg, n: int, *, sampler=None, steps=None, eta=None, seed=None, batch_size=None,
             progress_factory=None, echo=print):
    """n uint8 images from `net` with the eval section's sampler (or the given one); returns (images, tag,
    the sampler's PNG metadata)."""
    e = cfg.eval
    smp = sampler_from_config(net, cfg, sampler, steps, eta=eta, defaults=e)
    seeds = (e.seed if seed is None else seed) + np.arange(n)
    size, channels = cfg.data.image_size, cfg.data.channels
    images = sample_seeds(smp, seeds, (size, size, channels), batch_size or cfg.sample.batch_size,
                          progress_factory, echo, desc="sample")
    tag = f"{smp.name}-{smp.num_steps}" + (f"-eta{smp.eta:g}" if smp.eta is not None else "")
    return images, tag, smp.metadata()


def run_eval(run_dir: Path | None = None, *, runs_root: Path = Path("runs"), checkpoint: int | None = None,
             n: int | None = None, images: Path | None = None, features: str | None = None, sampler=None,
             steps=None, eta=None, seed=None, batch_size=None, overrides: list[str] = (),
             memorization: bool = False, echo=print, progress_factory=None):
    """Evaluate a run's samples (or a folder of images) against its training set; returns the EvalResult.

    `overrides` ("eval.key=value") change the run's eval section for this evaluation only.
    """
    run, cfg, net, step, label_set = load_run(run_dir, runs_root, checkpoint)
    cfg = with_eval_overrides(cfg, overrides)
    if images is None:  # before the feature network loads: a bad --seed fails fast
        check_seed_range(cfg.eval.seed if seed is None else seed, n or cfg.eval.n,
                         "eval.seed" if seed is None else "--seed", "eval.n" if n is None else "--n")
    extractor = load_features(features or cfg.eval.features)  # before sampling: a missing file fails fast
    size, channels = cfg.data.image_size, cfg.data.channels
    if images is not None:
        samples, source = load_image_folder(Path(images), size, channels, warn=echo), f"folder:{images}"
        sampler_meta = {}
    else:
        n = n or cfg.eval.n
        echo(f"sampling {n} images from {run.path} (step {step}) for evaluation")
        samples, source, sampler_meta = generate(net, cfg, n, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                                 batch_size=batch_size, progress_factory=progress_factory,
                                                 echo=echo)
    reference = prepare_reference(training_images(cfg, echo), extractor, flipped=memorization)
    e = cfg.eval
    result = evaluate_images(samples, reference, extractor, kid_subsets=e.kid_subsets,
                             kid_subset_size=e.kid_subset_size, seed=e.seed, memorization=memorization)
    out_dir = run.eval_dir
    tag = f"step{step}-{source.replace('/', '_').replace(':', '-')}-n{len(samples)}"
    save_png(out_dir / f"samples-{tag}.png", make_grid(samples[:64]),
             {"ddpm_tf:step": step, "ddpm_tf:source": source, **sampler_meta})
    pairs = None
    if memorization:
        pairs = save_pairs_png(out_dir / f"closest-pairs-{tag}.png", samples, reference.images, result.memorization)
        save_memorization_csv(out_dir / f"memorization-{tag}.csv", result.memorization)
    append_csv_row(run.eval_csv, {"step": step, "source": source, **result.row()})
    if cfg.run.tensorboard:
        writer = tf.summary.create_file_writer(str(run.tensorboard))
        write_tensorboard(writer, result, step, pairs)
        writer.close()
    echo(format_result(result, step, source, run.path, pairs))
    return result


def format_result(result, step: int, source: str, run_path: Path, pairs: Path | None) -> str:
    """A few readable lines: KID, FID, near-copies and where everything was written."""
    lines = [f"eval of {run_path} at step {step}: {result.n} images ({source}) against {result.n_train} "
             f"training images, features {result.features}",
             f"  KID  {result.kid_mean:.5f} +- {result.kid_std:.5f}  ({result.kid_subsets} subsets of "
             f"{result.kid_subset_size}; the main figure at small N)",
             f"  FID  {result.fid:.2f}  (biased upwards at small N; compare only at equal N and features)"]
    if result.memorization is not None:
        summary = result.memorization.summary()
        copies = int(np.sum(result.memorization.near_copy))
        lines.append(f"  near-copies of training images: {copies} of {result.n} "
                     f"({100 * result.memorization.share:.1f} %)")
        for space in result.memorization.spaces:
            lines.append(f"  {space} space: median nearest distance sample->train "
                         f"{summary[f'{space}_sample_to_train_p50']:.4f}, train->train "
                         f"{summary[f'{space}_train_to_train_p50']:.4f}, near-copy below "
                         f"{summary[f'{space}_threshold']:.4f}")
        lines.append(f"  closest pairs: {pairs}")
    lines.append(f"  appended to {RunDir(run_path).eval_csv}")
    return "\n".join(lines)


class TrainingEval:
    """The small eval `train.eval_every` runs: fixed seeds, the eval section's sampler, near-copy share too.

    The feature network and the training features are computed once, at the start of training, so a
    missing features file stops the run before its first step, not hours later.
    """

    def __init__(self, run, cfg, ema_net, train_images: np.ndarray, writer=None, echo=print):
        self.run, self.cfg, self.ema_net, self.writer, self.echo = run, cfg, ema_net, writer, echo
        self.extractor = load_features(cfg.eval.features)
        self.reference = prepare_reference(train_images, self.extractor, flipped=True)

    def __call__(self, step: int, epoch: int):
        """Sample, score, append to eval.csv and TensorBoard; returns the EvalResult."""
        e = self.cfg.eval
        samples, source, _ = generate(self.ema_net, self.cfg, e.n, echo=self.echo)
        result = evaluate_images(samples, self.reference, self.extractor, kid_subsets=e.kid_subsets,
                                 kid_subset_size=e.kid_subset_size, seed=e.seed, memorization=True)
        append_csv_row(self.run.eval_csv, {"step": step, "epoch": epoch, "source": source,
                                                     **result.row()})
        if self.writer is not None:
            write_tensorboard(self.writer, result, step)
        return result
