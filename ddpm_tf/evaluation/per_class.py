"""`ddpm eval --per-class`: for each class (or tag set) asked for, samples against that class's own training
images (KID, near-copies) and the class accuracy of a linear probe, over a sweep of samplers and guidance
scales: the trade-off a person needs to pick the guidance W and the sampler.

Orchestration over engines: samplers.py draws, probe.py classifies, metrics.py and memorization.py score.
"""

from __future__ import annotations

import numpy as np

from ..conditions import Condition
from ..errors import EvalError
from ..samplers import sample_seeds, sampler_from_config, seeds_by_condition
from .memorization import flip_images, memorization_report
from .metrics import fid, kid
from .probe import Probe, fit_labels_probe

ALL_ROWS = "(all)"  # the `class` of a sweep point's summary row: every sample against every training image


def sampler_tag(smp) -> str:
    """'ddim-50-eta1': a sampler and its settings, as eval.csv's `source`."""
    return f"{smp.name}-{smp.num_steps}" + (f"-eta{smp.eta:g}" if smp.eta is not None else "")


def members(matrix, condition: Condition) -> np.ndarray:
    """The training rows of a condition: images of its class, or images carrying every one of its tags."""
    asked = condition.vector > 0
    return np.flatnonzero((np.asarray(matrix)[:, asked] > 0).all(axis=1))


class ClassReference:
    """The labelled training set, its features (and mirrors' for near-copies) and the probe, computed once."""

    def __init__(self, images, labels, extractor, *, seed: int, memorization: bool):
        self.images, self.matrix, self.extractor = np.asarray(images), labels.matrix, extractor
        self.features = extractor(self.images)
        self.flipped = extractor(flip_images(self.images)) if memorization else None
        self.probe: Probe = fit_labels_probe(self.features, labels, seed=seed)

    def describe(self) -> str:
        held = self.probe.held_out_accuracy
        return (f"class-accuracy probe: linear, on {self.probe.n_fit} labelled training images; on real images "
                f"it did not see it gets {'n/a' if np.isnan(held) else f'{100 * held:.1f} %'} right")


def score(samples, feats, rows, reference: ClassReference, condition: Condition | None, eval_cfg, *,
          memorization: bool) -> dict:
    """One eval.csv row's numbers: KID against the condition's training images (all of them for None), the
    class accuracy of the samples (conditioned on `rows`), and with `memorization` the near-copy share."""
    train = np.arange(len(reference.images)) if condition is None else members(reference.matrix, condition)
    if len(train) < 2:
        raise EvalError(f"class {condition.text}: {len(train)} training image, KID needs at least 2")
    e = eval_cfg
    kid_mean, kid_std = kid(feats, reference.features[train], subsets=e.kid_subsets, subset_size=e.kid_subset_size,
                            seed=e.seed)
    out = {"n": len(samples), "n_train": len(train), "kid_mean": kid_mean, "kid_std": kid_std,
           "kid_subset_size": min(e.kid_subset_size, len(samples), len(train)),
           "class_accuracy": reference.probe.accuracy(feats, rows),
           "probe_held_out_accuracy": reference.probe.held_out_accuracy}
    if condition is None:
        out["fid"] = fid(feats, reference.features)
    if memorization:
        report = memorization_report(samples, reference.images[train], feats, reference.features[train],
                                     reference.flipped[train], seed=e.seed)
        out["near_copy_share"] = report.share
    return out


def sweep(net, cfg, reference: ClassReference, conditions: list[Condition], *, samplers, guidances, n: int,
          seed: int, eta=None, batch_size=None, memorization=False, progress_factory=None, echo=print):
    """Rows for eval.csv, one per (sampler, guidance, condition) plus one summary per (sampler, guidance);
    the same seeds under every condition and setting, so the settings differ by nothing else."""
    shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    seeds, rows = seeds_by_condition(seed + np.arange(n), np.stack([c.vector for c in conditions]))
    out = []
    for name, steps in samplers:
        for w in guidances:
            smp = sampler_from_config(net, cfg, name, steps, eta=eta, guidance=w, defaults=cfg.eval)
            setting = {"source": sampler_tag(smp), "sampler": smp.name, "steps": smp.num_steps,
                       "guidance": smp.guidance}
            echo(f"sampling {n} images for each of {len(conditions)} {conditions[0].kind} conditions with "
                 f"{setting['source']}, guidance {smp.guidance:g}")
            samples = sample_seeds(smp, seeds, shape, batch_size or cfg.sample.batch_size, progress_factory, echo,
                                   desc="sample", labels=rows)
            feats = reference.extractor(samples)
            for i, condition in enumerate(conditions):
                part = slice(i * n, (i + 1) * n)
                out.append({**setting, "class": condition.text,
                            **score(samples[part], feats[part], rows[part], reference, condition, cfg.eval,
                                    memorization=memorization)})
            summary = score(samples, feats, rows, reference, None, cfg.eval, memorization=memorization)
            per_condition = out[-len(conditions):]
            summary["mean_class_kid"] = float(np.mean([r["kid_mean"] for r in per_condition]))
            out.append({**setting, "class": ALL_ROWS, **summary})
    return out


def format_sweep(rows: list[dict]) -> str:
    """The summary rows as a small table: one line per (sampler, guidance)."""
    lines = [f"  {'sampler':<22} {'guidance':>8} {'class acc':>9} {'KID (all)':>10} {'KID per class':>13}"
             + (f" {'near-copies':>11}" if "near_copy_share" in rows[0] else "")]
    for r in (r for r in rows if r["class"] == ALL_ROWS):
        line = (f"  {r['source']:<22} {r['guidance']:>8g} {100 * r['class_accuracy']:>8.1f}% {r['kid_mean']:>10.5f} "
                f"{r['mean_class_kid']:>13.5f}")
        if "near_copy_share" in r:
            line += f" {100 * r['near_copy_share']:>10.1f}%"
        lines.append(line)
    return "\n".join(lines)
