"""Config loading: defaults, overrides typed like the file, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpm_tf.config import Config, from_dict, load_config, to_dict
from ddpm_tf.errors import ConfigError


def test_a_choice_named_true_or_false_is_taken_as_yaml_writes_it(tmp_path):
    # train.jit_compile is `auto`, `true` or `false`: YAML reads an unquoted true as a bool, in a file and in --set.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  jit_compile: true\n", encoding="utf-8")
    assert load_config(path).train.jit_compile == "true"
    assert load_config(path, ["train.jit_compile=false"]).train.jit_compile == "false"
    assert load_config(None, ["train.jit_compile=auto"]).train.jit_compile == "auto"
    with pytest.raises(ConfigError, match="train.distribute = True has the wrong type"):  # no true among its choices
        load_config(None, ["train.distribute=true"])


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


ROOT = Path(__file__).parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"


def _config_table():
    """scripts/config_table.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_documents_every_key_with_its_default():
    from ddpm_tf.config import describe_keys

    # Rendered here, independently of the generator: YAML spellings, tuples as lists.
    page = REFERENCE.read_text(encoding="utf-8")
    for key, default, _ in describe_keys():
        shown = str(list(default) if isinstance(default, tuple) else default)
        shown = shown.lower() if isinstance(default, bool) else shown
        assert f"| `{key}` | `{shown}` |" in page, f"{REFERENCE.name}'s config table lacks {key} = {shown}"


def test_configuration_table_is_the_one_generated_from_the_specs(tmp_path, capsys):
    tool = _config_table()
    page = REFERENCE.read_text(encoding="utf-8")
    problem = tool.first_difference(page, tool.render_table())
    assert problem is None, f"{problem}\nrun `python scripts/config_table.py --write`"
    assert tool.replace_block(page, tool.render_table()) == page
    assert tool.main(["--check", "--file", str(REFERENCE)]) == 0
    # A drifted default, a key the code no longer has and a lost marker are each caught, by line.
    for stale, needle in [(page.replace("| `train.epochs` | `500` |", "| `train.epochs` | `400` |"), "train.epochs"),
                          (page.replace(tool.END, "| `train.gone` | `1` | a removed key |\n" + tool.END), "extra"),
                          (page.replace(tool.END, ""), "config-table:end")]:
        path = tmp_path / "configuration.md"
        path.write_text(stale, encoding="utf-8")
        assert tool.main(["--check", "--file", str(path)]) == 1
        assert needle in capsys.readouterr().err
    # --write repairs a stale table and leaves the hand-written text around it alone.
    path.write_text(page.replace("| `train.epochs` | `500` |", "| `train.epochs` | `400` |"), encoding="utf-8")
    assert tool.main(["--write", "--file", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == page


# --- numbers and parsing (issue 11, section 5) ---------------------------------------------------------

SEED_MAX = 2**31 - 1  # the int32 seeds of the stateless TF generators

def _keys_of_kind(kind):
    import dataclasses

    from ddpm_tf.config import SECTIONS

    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if type(f.default) is kind]


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _message(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    # One line, short whatever the value: only the file's own path and the list of valid keys may be long.
    assert "\n" not in message and len(message) - len(str(path or "")) < 300, message
    return message


@pytest.mark.parametrize("key", _keys_of_kind(float))
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999", "1" + "0" * 400])
def test_every_float_key_refuses_non_finite_numbers(tmp_path, key, text):
    section, name = key.split(".")
    path = _write(tmp_path, f"{section}:\n  {name}: {text}\n")
    for source, overrides in ((path, []), (None, [f"{key}={text}"])):
        message = _message(source, overrides)
        assert key in message and "not a finite number" in message
        assert ("c.yaml" if source else "--set") in message


@pytest.mark.parametrize("key", _keys_of_kind(int))
@pytest.mark.parametrize("text", ["4.0", "true", "1" + "0" * 30])
def test_every_integer_key_refuses_floats_booleans_and_huge_values(key, text):
    # 10**30 went through every key without an upper bound (epochs, warmup_steps, ...) into numpy and TF.
    assert key in _message(None, [f"{key}={text}"])


def test_integers_too_long_to_parse_are_one_line(tmp_path):
    # Python >= 3.10.7 refuses int() of more than 4300 digits with a ValueError, not a YAMLError.
    path = _write(tmp_path, "train:\n  epochs: 1" + "0" * 5000 + "\n")
    message = _message(path)
    assert "c.yaml" in message and "line 2" in message and "too many digits" in message
    assert "train.epochs" in _message(None, ["train.epochs=1" + "0" * 5000])


@pytest.mark.parametrize("seed_key, n_key", [("sample.seed", "sample.n"), ("eval.seed", "eval.n"),
                                             ("run.preview_seed", "run.preview_n")])
def test_seed_keys_and_their_counts_stay_in_the_seed_range(seed_key, n_key):
    # The last seed used is seed + n - 1: exactly SEED_MAX is fine, one more is refused before any work.
    cfg = load_config(None, [f"{seed_key}={SEED_MAX - 3}", f"{n_key}=4"])
    section, name = seed_key.split(".")
    assert getattr(getattr(cfg, section), name) == SEED_MAX - 3
    message = _message(None, [f"{seed_key}={SEED_MAX - 3}", f"{n_key}=5"])
    assert message.startswith("--set: ") and seed_key in message and n_key in message
    assert str(SEED_MAX + 1) in message and f"0..{SEED_MAX}" in message
    assert seed_key in _message(None, [f"{seed_key}={SEED_MAX + 1}", f"{n_key}=1"])


def test_the_seed_range_is_the_one_the_cli_accepts():
    from ddpm_tf import seeds
    from ddpm_tf.cli import _parse_seeds

    assert seeds.SEED_MAX == SEED_MAX
    assert _parse_seeds(str(SEED_MAX)) == [SEED_MAX]
    assert load_config(None, [f"train.seed={SEED_MAX}"]).train.seed == SEED_MAX
    assert "train.seed" in _message(None, [f"train.seed={SEED_MAX + 1}"])


BILLION_LAUGHS = """eval:
  a: &a [x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
run:
  dir: [*e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


def test_aliases_that_repeat_lists_or_mappings_are_refused(tmp_path):
    # Unchecked, run.dir's error message echoed 9**6 items (and 157 MB with two more levels).
    message = _message(_write(tmp_path, BILLION_LAUGHS))
    assert "c.yaml" in message and "line 3" in message and "alias *a" in message
    merge = _write(tmp_path, "sample: &s\n  n: 4\neval:\n  <<: *s\n", "merge.yaml")
    assert "alias *s" in _message(merge)
    # An alias of a single value cannot grow the file and stays allowed.
    cfg = load_config(_write(tmp_path, "train:\n  seed: &s 5\nsample:\n  seed: *s\n", "ok.yaml"))
    assert cfg.train.seed == cfg.sample.seed == 5


@pytest.mark.parametrize("text, needles", [
    ("train:\n  epochs: 1\n  batch_size: 2\n  epochs: 3\n", ["duplicate key 'train.epochs'", "line 4"]),
    ("train:\n  epochs: 1\nsample:\n  n: 2\ntrain:\n  batch_size: 2\n", ["duplicate section 'train'", "line 5"]),
])
def test_duplicate_keys_and_sections_are_errors(tmp_path, text, needles):
    message = _message(_write(tmp_path, text))
    for needle in ["c.yaml", *needles]:
        assert needle in message


@pytest.mark.parametrize("text, overrides, key", [
    ("", ["model.norm_groups=5"], "model.norm_groups"),
    ("model:\n  norm_groups: 8\n", ["model.base_channels=20"], "model.norm_groups"),
    ("", ["model.attention_heads=3"], "model.attention_heads"),
    ("diffusion:\n  beta_end: 0.02\n", ["diffusion.beta_start=0.1"], "diffusion.beta_end"),
    ("diffusion:\n  timesteps: 50\n", ["sample.steps=60"], "sample.steps"),
    ("model:\n  channel_mult: [1, 2]\n", ["data.image_size=17"], "data.image_size"),
    ("data:\n  image_size: 16\n  channels: 3\n", ["model.attention_resolutions=[3]"], "model.attention_resolutions"),
    ("", ["data.background=nocolour"], "data.background"),
])
def test_cross_key_errors_caused_by_a_set_name_the_set(tmp_path, text, overrides, key):
    message = _message(_write(tmp_path, text), overrides)
    assert message.startswith("--set: ") and key in message and "c.yaml" not in message


def test_cross_key_errors_of_the_file_name_the_file(tmp_path):
    message = _message(_write(tmp_path, "model:\n  norm_groups: 5\n"), ["train.epochs=3"])
    assert message.startswith(f"{tmp_path / 'c.yaml'}: ") and "model.norm_groups" in message


@pytest.mark.parametrize("text, overrides, needle", [
    ("train:\n  " + "k" * 500 + ": 1\n", [], "unknown key"),
    ("data:\n  background: " + "x" * 500 + "\n", [], "not a colour"),
    ("train: [" + ", ".join(["1"] * 500) + "]\n", [], "must be a mapping"),
    ("[" + ", ".join(["1"] * 500) + "]\n", [], "got list"),
    ("", ["sample.sampler=" + "y" * 500], "sample.sampler"),
    ("", ["x" * 500], "section.key=value"),
    ("train:\n  epochs: 1\x00\n", [], "not valid YAML"),  # PyYAML's own message spans two lines
])
def test_error_lines_are_short_whatever_the_value(tmp_path, text, overrides, needle):
    assert needle in _message(_write(tmp_path, text), overrides)


def test_bad_config_files(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  epochs: 3  # caf\xe9\n".encode("latin-1"))
    assert "latin1.yaml" in _message(latin1) and "not UTF-8" in _message(latin1)
    assert "is a folder" in _message(tmp_path)
    assert "expected a mapping of sections" in _message(_write(tmp_path, "- train\n- sample\n"))
    assert "expected a mapping of sections" in _message(_write(tmp_path, "42\n"))
    assert "not found" in _message(tmp_path / "missing.yaml")
    # A UTF-8 byte-order mark (Windows editors) is fine.
    bom = tmp_path / "bom.yaml"
    bom.write_text("\ufefftrain:\n  epochs: 3\n", encoding="utf-8")
    assert load_config(bom).train.epochs == 3
