"""Config loading: defaults, overrides typed like the file, and one clear error per bad value."""

from __future__ import annotations

import pytest

from ddpm_tf.config import Config, from_dict, load_config, to_dict
from ddpm_tf.errors import ConfigError


def test_defaults_round_trip():
    cfg = load_config(None)
    assert cfg == Config()
    assert from_dict(to_dict(cfg), "x") == cfg


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nmodel:\n  channel_mult: [1, 2, 2, 2]\n", encoding="utf-8")
    cfg = load_config(path, ["train.learning_rate=1e-3", "data.flip=false", "run.dir=runs/x"])
    assert cfg.train.epochs == 7
    assert cfg.model.channel_mult == (1, 2, 2, 2)
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.data.flip is False
    assert cfg.run.dir == "runs/x"
    # An int where a float is expected is fine; the stored type is float.
    assert isinstance(load_config(None, ["train.learning_rate=1"]).train.learning_rate, float)


@pytest.mark.parametrize("text, overrides, needles", [
    ("train:\n  epochs: 0\n", [], ["train.epochs", ">= 1", "c.yaml"]),
    ("train:\n  epochs: ten\n", [], ["train.epochs", "wrong type", "an integer"]),
    ("train:\n  lr: 0.1\n", [], ["unknown key", "train.lr", "learning_rate"]),
    ("trian:\n  epochs: 1\n", [], ["unknown section", "trian"]),
    ("data:\n  channels: 2\n", [], ["data.channels", "one of 1, 3"]),
    ("train:\n  ema_decay: 1.5\n", [], ["train.ema_decay", "[0.0, 1.0]"]),
    ("data:\n  flip: 1\n", [], ["data.flip", "true or false"]),
    ("model:\n  norm_groups: 5\n", [], ["model.norm_groups", "does not divide"]),
    ("model:\n  attention_resolutions: [12]\n", [], ["model.attention_resolutions", "12"]),
    ("data:\n  image_size: 36\n", [], ["data.image_size", "divisible by 8"]),
    ("train: [1, 2\n", [], ["not valid YAML", "line"]),
    ("", ["train.epochs=-3"], ["--set", "train.epochs", ">= 1"]),
    ("", ["train.epochs"], ["--set", "section.key=value"]),
    ("", ["nosection.key=1"], ["--set", "unknown key"]),
    ("", ["sample.variance=huge"], ["sample.variance", "small, large"]),
])
def test_errors_name_the_key(tmp_path, text, overrides, needles):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        load_config(path)


def test_readme_documents_every_key_with_its_default():
    from pathlib import Path

    from ddpm_tf.config import describe_keys

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for key, default, _ in describe_keys():
        shown = str(list(default) if isinstance(default, tuple) else default)
        shown = shown.lower() if isinstance(default, bool) else shown
        assert f"| `{key}` | `{shown}` |" in readme, f"README's config table lacks {key} = {shown}"
