"""`ddpm train --init-from RUN[@STEP]`: the new run's first weights are the source's export, its optimizer and step
counter start fresh, the source run is only read, a different network is refused naming the layer, and other
labels get a fresh label embedding."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import class_images, write_config, write_images

from ddpm_tf.callbacks import RunState
from ddpm_tf.cli import main
from ddpm_tf.compat import variable_key
from ddpm_tf.config import load_config
from ddpm_tf.errors import ConfigError, RunError
from ddpm_tf.runs import RunDir, read_export


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(folder):
    """Every file under `folder` with its bytes' sha256 and mtime: what 'only read' must leave as it is."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(root, RunDir) of a tiny unlabelled run trained for 2 epochs."""
    from ddpm_tf.train import train

    root = tmp_path_factory.mktemp("source")
    write_images(root / "images", 6)
    cfg = write_config(root / "a.yaml", {"run": {"dir": str(root / "runs" / "a")}, "data": {"dir": str(root / "images")}})
    train(load_config(cfg), echo=lambda m: None, log=lambda m: None)
    return root, RunDir(root / "runs" / "a")


def new_config(root, source_run, name, **sections):
    body = {"run": {"dir": str(root / "runs" / name)}, "data": {"dir": str(root / "images")},
            "train": {"init_from": f"{source_run.path}@{source_run.latest_export()[0]}"}}
    for section, values in sections.items():
        body.setdefault(section, {}).update(values)
    return load_config(write_config(root / f"{name}.yaml", body))


def build(cfg, echo=print, label_set=None):
    from ddpm_tf.distribute import make_placement
    from ddpm_tf.train import _build_and_restore

    state = RunState(6, cfg.train.batch_size, cfg.train.precision)
    return _build_and_restore(cfg, RunDir(cfg.run.dir), state, label_set, make_placement("none"), echo,
                              lambda m: None)


def test_the_first_weights_are_the_source_export_and_the_counters_start_fresh(source):
    root, run = source
    step, export = run.latest_export()
    arrays, _ = read_export(export)
    messages = []
    model, _, meta = build(new_config(root, run, "b"), echo=messages.append)
    for net in (model.net, model.ema_net):
        for v in net.weights:
            np.testing.assert_array_equal(v.numpy(), arrays[variable_key(v)])
    assert int(model.optimizer.iterations.numpy()) == 0 and int(model.ema_updates.numpy()) == 0
    assert meta["init_from"] == {"run": str(run.path), "step": step}
    assert messages[-1] == (f"initialised from {run.path} at step {step} (its EMA weights); fresh optimizer and "
                            "step counter")


def test_through_the_cli_the_run_records_where_it_started_and_the_source_is_only_read(source):
    root, run = source
    before = tree_digest(run.path)
    cfg = write_config(root / "c.yaml", {"run": {"dir": str(root / "runs" / "c")}, "data": {"dir": str(root / "images")},
                                         "train": {"epochs": 1}})
    result = invoke("train", "--config", cfg, "--init-from", run.path)  # no @STEP: the newest export
    assert result.exit_code == 0, result.output
    assert f"initialised from {run.path} at step {run.latest_export()[0]}" in result.output
    new = RunDir(root / "runs" / "c")
    saved = yaml.safe_load(new.config_path.read_text(encoding="utf-8"))
    assert saved["train"]["init_from"] == str(run.path)
    step, export = new.latest_export()
    assert step == 2  # its own 6 images / batch 4 = 2 steps, counted from 0
    assert read_export(export, weights=False)[1]["init_from"] == {"run": str(run.path), "step": run.latest_export()[0]}
    assert tree_digest(run.path) == before


def test_a_different_network_is_refused_naming_the_layer(source):
    root, run = source
    with pytest.raises(ConfigError) as info:
        build(new_config(root, run, "wide", model={"base_channels": 32}))
    message = str(info.value)
    assert message.startswith(f"train.init_from {run.path}@") and "layer " in message
    assert "the same network (model.* and data.channels) is required" in message
    result = invoke("train", "--config", root / "wide.yaml", "--set", f"run.dir={root / 'runs' / 'wide-cli'}")
    assert result.exit_code == 2 and "layer " in result.output and "Traceback" not in result.output


def test_other_labels_get_a_fresh_label_embedding(source):
    from ddpm_tf.data.labels import LabelSet

    root, run = source
    class_images(root / "labelled" / "bright", 210)
    class_images(root / "labelled" / "dark", 40)
    messages = []
    cfg = new_config(root, run, "lab", data={"dir": str(root / "labelled"), "labels": "folders"})
    model, _, _ = build(cfg, echo=messages.append, label_set=LabelSet("folders", ("bright", "dark")))
    assert messages[-1].endswith("; the label embedding starts fresh: this run's labels are not the source's")
    arrays, _ = read_export(run.latest_export()[1])
    shared = [v for v in model.net.weights if not variable_key(v).startswith("label_emb/")]
    assert len(shared) == len(arrays)
    assert all(np.array_equal(v.numpy(), arrays[variable_key(v)]) for v in shared)


def test_turning_augmentation_on_starts_its_embedding_at_zero_and_off_leaves_it_out(source):
    root, run = source
    messages = []
    model, _, _ = build(new_config(root, run, "aug", train={"augment_p": 0.15}), echo=messages.append)
    assert messages[-1].endswith("; the augmentation embedding starts at zero: the source trained without "
                                 "augmentation")
    arrays, _ = read_export(run.latest_export()[1])
    for v in model.net.weights:
        want = np.zeros(v.shape) if variable_key(v) == "augment_emb/kernel" else arrays[variable_key(v)]
        np.testing.assert_array_equal(v.numpy(), want)
    # Back: an augmented source into a plain run (a saved export of the run just built).
    from ddpm_tf.callbacks import export_ema

    aug_cfg = new_config(root, run, "aug", train={"augment_p": 0.15})
    aug_run = RunDir(aug_cfg.run.dir)
    aug_run.path.mkdir(parents=True, exist_ok=True)
    aug_run.save_config(aug_cfg)
    kernel = model.net.get_layer("augment_emb").kernel
    kernel.assign(np.ones(kernel.shape, np.float32))
    export_ema(aug_run, model.net, 7, {"config": {}})
    messages = []
    plain = {"run": {"dir": str(root / "runs" / "plain-again")}, "data": {"dir": str(root / "images")},
             "train": {"init_from": f"{aug_run.path}@7"}}
    build(load_config(write_config(root / "plain-again.yaml", plain)), echo=messages.append)
    assert messages[-1].endswith("; the source's augmentation embedding is left out: this run trains without "
                                 "augmentation")


def test_sources_that_are_not_usable_are_named(source, tmp_path):
    from ddpm_tf.warm_start import find_source

    root, run = source
    target = RunDir(tmp_path / "new")
    with pytest.raises(RunError, match="is not a run"):
        find_source(str(tmp_path), target)
    with pytest.raises(RunError, match="no checkpoint at step 999; available: 2, 4"):
        find_source(f"{run.path}@999", target)
    with pytest.raises(ConfigError, match="that is this run itself"):
        find_source(str(run.path), run)
