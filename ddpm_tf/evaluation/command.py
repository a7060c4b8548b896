"""`ddpm eval` and the in-training eval, orchestration only: a run's samples (generated, or a folder) and
its training images -> features -> KID, FID and the memorisation report -> eval.csv, TensorBoard, PNGs.

The maths is in metrics.py and memorization.py, the feature networks in report.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..compat import tf
from ..conditions import ALL, NO_LABELS, requested
from ..errors import EvalError, LabelError
from ..images import make_grid, save_png
from ..runs import RunDir, append_csv_row, load_run
from ..samplers import sample_seeds, sampler_from_config
from ..seeds import check_seed_range
from ..summaries import scalar_summary
from . import curve
from .memorization import save_pairs_png
from .per_class import ALL_ROWS, ClassReference, format_sweep, sampler_tag, sweep
from .probe import fit_labels_probe
from .report import (
    evaluate_images,
    load_features,
    load_image_folder,
    prepare_reference,
    save_memorization_csv,
    write_tensorboard,
)

PER_CLASS_MIN = 8  # samples per class of a per-class eval when --n is not given (eval.n spread over the classes)


def training_set(cfg, echo=print):
    """The run's training set as (N, S, S, C) uint8 and its Labels (None without labels), exactly as training
    reads them (from its data cache, which is brought up to date first, as `ddpm train` does)."""
    from ..data.prepare import prepare

    prepared = prepare(cfg.data, echo=lambda msg: None, only_changes=True)
    images = prepared.images(memory_mb=float("inf"))  # the features need every image in memory
    echo(f"reference: {len(images)} training images from {cfg.data.dir} (cache {prepared.cache_dir})")
    return images, prepared.labels


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
             labels=None, progress_factory=None, echo=print):
    """n uint8 images from `net` with the eval section's sampler (or the given one), conditioned on the label
    rows `labels` (n, K) when given; returns (images, tag, the sampler's PNG metadata)."""
    e = cfg.eval
    smp = sampler_from_config(net, cfg, sampler, steps, eta=eta, defaults=e)
    seeds = (e.seed if seed is None else seed) + np.arange(n)
    size, channels = cfg.data.image_size, cfg.data.channels
    images = sample_seeds(smp, seeds, (size, size, channels), batch_size or cfg.sample.batch_size,
                          progress_factory, echo, desc="sample", labels=labels)
    return images, sampler_tag(smp), smp.metadata()


def run_eval(run_dir: Path | None = None, *, runs_root: Path = Path("runs"), checkpoint: int | None = None,
             n: int | None = None, images: Path | None = None, features: str | None = None, samplers=((None, None),),
             eta=None, seed=None, batch_size=None, overrides: list[str] = (), memorization: bool = False,
             per_class: bool = False, classes=(), tags=(), guidances=None, echo=print, progress_factory=None):
    """Evaluate a run's samples (or a folder of images) against its training set, once per (sampler, steps) of
    `samplers`; returns the EvalResults. With `per_class` (implied by classes, tags or guidances), the per-class
    sweep instead (returns its eval.csv rows).

    `overrides` ("eval.key=value") change the run's eval section for this evaluation only.
    """
    run, cfg, net, step, label_set = load_run(run_dir, runs_root, checkpoint)
    cfg = with_eval_overrides(cfg, overrides)
    conditions = _per_class_conditions(label_set, per_class, classes, tags, guidances)
    if images is None:  # before the feature network loads: a bad --seed fails fast
        check_seed_range(cfg.eval.seed if seed is None else seed, n or cfg.eval.n,
                         "eval.seed" if seed is None else "--seed", "eval.n" if n is None else "--n")
    elif conditions:
        raise EvalError("--images: a folder has no classes to score; --per-class, --class, --tags and --guidance "
                        "evaluate samples the run generates")
    extractor = load_features(features or cfg.eval.features)  # before sampling: a missing file fails fast
    if conditions:
        return _run_per_class(run, cfg, net, step, label_set, extractor, conditions, samplers=samplers,
                              guidances=list(guidances or [None]), n=n, seed=seed, eta=eta, batch_size=batch_size,
                              memorization=memorization, echo=echo, progress_factory=progress_factory)
    train, _ = training_set(cfg, echo)
    reference = prepare_reference(train, extractor, flipped=memorization)
    if images is not None:
        samples = load_image_folder(Path(images), cfg.data.image_size, cfg.data.channels, warn=echo)
        return [_score_and_write(run, cfg, step, samples, f"folder:{images}", {}, reference, extractor, memorization,
                                 echo)]
    results = []
    for sampler, steps in samplers:
        count = n or cfg.eval.n
        echo(f"sampling {count} images from {run.path} (step {step}) for evaluation")
        samples, source, meta = generate(net, cfg, count, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                         batch_size=batch_size, progress_factory=progress_factory, echo=echo)
        results.append(_score_and_write(run, cfg, step, samples, source, meta, reference, extractor, memorization,
                                        echo))
    return results


def _score_and_write(run, cfg, step, samples, source, sampler_meta, reference, extractor, memorization, echo):
    """KID, FID (and near-copies) of one set of samples -> eval.csv, TensorBoard, a grid and the pairs PNG."""
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


def _per_class_conditions(label_set, per_class: bool, classes, tags, guidances) -> list:
    """The conditions of a per-class eval (every class, or those asked for); [] for a plain eval."""
    if not (per_class or classes or tags or guidances):
        return []
    if label_set is None:
        flags = [f for f, given in (("--per-class", per_class), ("--class", classes), ("--tags", tags),
                                    ("--guidance", guidances)) if given]
        raise LabelError(NO_LABELS.format(what=" and ".join(flags)))
    for w in guidances or ():
        requested(label_set, guidance=w)  # a negative scale: the one message of every command
    if classes or tags:
        return requested(label_set, classes, tags)
    if label_set.mode == "folders":
        return requested(label_set, [ALL])
    return requested(label_set, tags=list(label_set.names))  # one condition per tag


def _run_per_class(run, cfg, net, step, label_set, extractor, conditions, *, samplers, guidances, n, seed, eta,
                   batch_size, memorization, echo, progress_factory):
    """The per-class sweep: rows to eval.csv and TensorBoard, a table on screen; returns the rows."""
    train, labels = training_set(cfg, echo)
    if labels is None or labels.label_set != label_set:
        raise EvalError(f"{cfg.data.dir}: its labels are not the run's any more ({len(label_set)} "
                        f"{label_set.kind}s when it trained): evaluate with the data it was trained on")
    reference = ClassReference(train, labels, extractor, seed=cfg.eval.seed, memorization=memorization)
    echo(reference.describe())
    n = n or max(PER_CLASS_MIN, cfg.eval.n // len(conditions))
    rows = sweep(net, cfg, reference, conditions, samplers=samplers, guidances=guidances, n=n,
                 seed=cfg.eval.seed if seed is None else seed, eta=eta, batch_size=batch_size,
                 memorization=memorization, progress_factory=progress_factory, echo=echo)
    meta = {"step": step, "features": extractor.name, "kid_subsets": cfg.eval.kid_subsets}
    for row in rows:
        append_csv_row(run.eval_csv, {**meta, **row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if cfg.run.tensorboard:
        writer = tf.summary.create_file_writer(str(run.tensorboard))
        with writer.as_default():
            for row in (r for r in rows if r["class"] == ALL_ROWS):
                prefix = f"eval/per_class/{row['source']}/guidance{row['guidance']:g}/"
                for key in ("class_accuracy", "kid_mean", "mean_class_kid", "near_copy_share"):
                    if key in row:
                        scalar_summary(prefix + key, row[key], step)
        writer.close()
    echo(f"per-class eval of {run.path} at step {step}: {n} samples per {conditions[0].kind}, features "
         f"{extractor.name}\n{format_sweep(rows)}\n  rows per {conditions[0].kind} appended to {run.eval_csv}")
    return rows


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
    """The small eval `train.eval_every` runs: fixed seeds, the eval section's sampler, near-copy share too, and
    the memorisation curve RUN/eval/curve.png redrawn (evaluation/curve.py);
    on a run with labels the samples are spread over the classes (or tags), at sample.guidance, and their class
    accuracy is scored by the probe of the per-class eval.

    The feature network and the training features are computed once, at the start of training, so a
    missing features file stops the run before its first step, not hours later.
    """

    def __init__(self, run, cfg, ema_net, train_images: np.ndarray, writer=None, echo=print, labels=None):
        self.run, self.cfg, self.ema_net, self.writer, self.echo = run, cfg, ema_net, writer, echo
        self.extractor = load_features(cfg.eval.features)
        self.reference = prepare_reference(train_images, self.extractor, flipped=True)
        self.probe = self.label_rows = None
        if labels is not None:
            k = len(labels.label_set)
            self.label_rows = np.eye(k, dtype=np.float32)[np.arange(cfg.eval.n) % k]
            self.probe = fit_labels_probe(self.reference.features, labels, seed=cfg.eval.seed)

    def __call__(self, step: int, epoch: int):
        """Sample, score, append to eval.csv and TensorBoard; returns the EvalResult."""
        e = self.cfg.eval
        samples, source, _ = generate(self.ema_net, self.cfg, e.n, labels=self.label_rows, echo=self.echo)
        feats = self.extractor(samples)  # once: for the scores and the probe
        result = evaluate_images(samples, self.reference, self.extractor, kid_subsets=e.kid_subsets,
                                 kid_subset_size=e.kid_subset_size, seed=e.seed, memorization=True,
                                 sample_features=feats)
        row = {"step": step, "epoch": epoch, "source": source, **result.row()}
        if self.probe is not None:
            row["class_accuracy"] = self.probe.accuracy(feats, self.label_rows)
            row["probe_held_out_accuracy"] = self.probe.held_out_accuracy
        append_csv_row(self.run.eval_csv, row)
        self.run.eval_dir.mkdir(parents=True, exist_ok=True)
        curve.draw(curve.training_points(self.run.eval_csv), self.run.eval_curve)
        if self.writer is not None:
            write_tensorboard(self.writer, result, step)
            if self.probe is not None:
                with self.writer.as_default():
                    scalar_summary("eval/class_accuracy", row["class_accuracy"], step)
        return result
