"""Typed, validated configuration: YAML file + `--set section.key=value` overrides -> frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.decode import CHANNELS, CROPS
from .data.labels import LABEL_MODES
from .distribute import MODES as DISTRIBUTE_MODES
from .errors import ConfigError
from .precision import JIT_MODES, PRECISIONS
from .samplers import (
    GUIDANCE_DEFAULT,
    GUIDANCE_MAX,
    SAMPLER_NAMES,
    SPACINGS,
    VARIANCES,
    describe_default_steps,
)
from .schedule import BETA_SCHEDULES, LOSS_WEIGHTINGS, PREDICTIONS
from .seeds import SEED_MAX, seed_range_problem

INT_MAX = 2**63 - 1  # every integer key: beyond int64, numpy and TF overflow
ECHO_MAX = 80  # characters of a value echoed in an error message


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = ECHO_MAX


def _short(value: Any) -> str:
    """repr(value) in at most ECHO_MAX characters, computed without building the whole repr first."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= ECHO_MAX else text[:ECHO_MAX - 3] + "..."


class _Refused(yaml.YAMLError):
    """Valid YAML that a config file may not use; `problem` and `problem_mark` like PyYAML's errors."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what makes a small file a huge or an ambiguous value: aliases of lists and
    mappings (a 350-byte 'billion laughs' file expands to millions of items) and duplicate keys (PyYAML
    silently keeps the last one). Aliases of single values stay allowed: they cannot grow the file."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.CollectionNode):
                raise _Refused(f"the alias *{event.anchor[:ECHO_MAX]} repeats a list or mapping, which a "
                               "config file may not do: write the values out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        prefix = self._names.get(id(node))  # None for the top level (sections)
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            name = _short(key if prefix is None else f"{prefix}.{key}")
            if duplicate:
                what = "section" if prefix is None else "key"
                raise _Refused(f"duplicate {what} {name}: expected each {what} once (YAML would silently keep "
                               "the last)", key_node.start_mark)
            seen.add(key)
            self._names[id(value_node)] = str(key) if prefix is None else f"{prefix}.{key}"
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python >= 3.11 refuses to parse integers of more than 4300 digits
            raise _Refused(f"the integer {_short(node.value)} has too many digits ({len(node.value)})",
                           node.start_mark) from None

    def __init__(self, stream):
        super().__init__(stream)
        self._names: dict[int, str] = {}


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _spec(default, *, lo=None, hi=None, choices=None, help=""):
    """A config field with its allowed range or choices, checked by `validate`."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "help": help})


@dataclass(frozen=True)
class RunConfig:
    dir: str = _spec("runs/default", help="the run directory: config, checkpoints, exports, previews")
    checkpoint_every: int = _spec(5, lo=1, help="save a checkpoint (and an EMA export) every N epochs")
    keep_last: int = _spec(3, lo=1, help="checkpoints kept on disk")
    preview_every: int = _spec(5, lo=0, help="write a preview grid every N epochs (0: never)")
    preview_n: int = _spec(16, lo=1, hi=256, help="images in a preview grid")
    preview_seed: int = _spec(1234, lo=0, hi=SEED_MAX, help="fixed seed of the preview grid, so the same faces form")
    tensorboard: bool = _spec(True, help="write TensorBoard logs to RUN/tensorboard")
    stall_timeout: float = _spec(900.0, lo=0.0, hi=604800.0,
                                 help="seconds without a finished train step or sampler chunk before a warning "
                                      "with every thread's stack (0: off; the first step or chunk, which traces "
                                      "and compiles, gets 4x)")


@dataclass(frozen=True)
class DataConfig:
    dir: str = _spec("data/portraits", help="folder of training images, searched recursively")
    image_size: int = _spec(64, lo=8, hi=1024, help="training resolution (square)")
    channels: int = _spec(3, choices=CHANNELS, help="1 = grayscale, 3 = RGB")
    min_side: int = _spec(16, lo=1, help="images whose shorter side is below this are skipped")
    flip: bool = _spec(True, help="random horizontal flips")
    cache: str = _spec("auto", help="folder of the prepared cache; `auto`: `data/cache/NAME-KEY` under the working "
                                    "directory, KEY from the folder's path and the settings")
    crop: str = _spec("center", choices=CROPS,
                      help="`center` (square), `face` (centred on the largest face, needs the `face` extra), "
                           "`none` (pad to square)")
    background: str = _spec("white", help="colour under transparency and padding: a name or `#rrggbb`")
    max_pixels: int = _spec(100_000_000, lo=1, help="images with more pixels are skipped as decompression bombs")
    near_duplicate_threshold: int = _spec(6, lo=-1, hi=64,
                                          help="perceptual-hash bits (of 64) within which an image is a "
                                               "near-duplicate candidate (-1: off)")
    near_duplicate_rms: float = _spec(4.0, lo=0.0, hi=255.0,
                                      help="...confirmed when the 16x16 grayscale thumbnails are within this many "
                                           "grey levels RMS (a re-encoded or resized copy is about 1)")
    workers: int = _spec(0, lo=0, hi=256, help="decoding processes (0: one per CPU core)")
    memory_mb: int = _spec(1024, lo=0,
                           help="caches up to this size are loaded into memory, larger ones read memory-mapped")
    labels: str = _spec("none", choices=LABEL_MODES,
                        help="what to condition on: `none`, `folders` (the first-level subfolder of data.dir is the "
                             "class; images directly in it are unlabelled) or `tags` (`img001.txt` beside "
                             "`img001.png`: comma-separated tags)")
    min_tag_count: int = _spec(2, lo=1, help="the tag vocabulary is the tags on at least this many used images; "
                                             "rarer ones are reported, not conditioned on")
    min_class_images: int = _spec(5, lo=1, help="`ddpm prepare` warns about classes (or tags) with fewer used images")


@dataclass(frozen=True)
class ModelConfig:
    base_channels: int = _spec(64, lo=8, hi=1024, help="width of the first level")
    channel_mult: tuple = _spec((1, 2, 4, 8), lo=1, hi=64, help="width multiplier per level")
    num_res_blocks: int = _spec(2, lo=1, hi=8, help="residual blocks per level going down (+1 going up)")
    attention_resolutions: tuple = _spec((16, 8), lo=1, hi=1024,
                                         help="feature-map sizes with self-attention (the middle always has it)")
    attention_heads: int = _spec(1, lo=1, hi=64, help="heads in every self-attention block")
    dropout: float = _spec(0.1, lo=0.0, hi=0.9, help="dropout inside residual blocks")
    norm_groups: int = _spec(32, lo=1, hi=1024, help="GroupNorm groups; must divide every width")
    recompute: bool = _spec(False, help="gradient checkpointing: residual blocks keep only their inputs for the "
                                        "backward pass and run again in it (less activation memory, about a quarter "
                                        "more compute); the same weights, so a run may turn it on or off")


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = _spec(1000, lo=2, hi=100000, help="T, the number of diffusion steps")
    beta_start: float = _spec(1e-4, lo=1e-8, hi=0.5, help="first beta of the linear schedule")
    beta_end: float = _spec(0.02, lo=1e-8, hi=0.999, help="last beta of the linear schedule")
    schedule: str = _spec("linear", choices=tuple(BETA_SCHEDULES),
                          help="beta schedule: `linear` (Ho et al. 2020) or `cosine` (Nichol & Dhariwal 2021, "
                               "betas clipped at 0.999)")
    cosine_s: float = _spec(0.008, lo=0.0, hi=0.5, help="offset s of the cosine schedule")
    prediction: str = _spec("eps", choices=PREDICTIONS,
                            help="what the network predicts: `eps` (noise), `v` (Salimans & Ho 2022) or `x0` "
                                 "(clean image); every sampler works with each")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _spec(500, lo=1, help="passes over the data set (every image once per epoch)")
    batch_size: int = _spec(64, lo=1, hi=65536, help="images per step (per micro-batch with train.accumulate)")
    accumulate: int = _spec(1, lo=1, hi=1024,
                            help="gradient accumulation: a step takes accumulate x batch_size images in micro-batches "
                                 "of batch_size, one update of the whole batch's mean loss; memory of one micro-batch")
    learning_rate: float = _spec(2e-4, lo=1e-8, hi=1.0, help="Adam learning rate")
    ema_decay: float = _spec(0.999, lo=0.0, hi=1.0, help="EMA decay of the sampling weights")
    ema_warmup: bool = _spec(True, help="EMA decay min(decay, (1+step)/(10+step)) so early samples work")
    seed: int = _spec(0, lo=0, hi=SEED_MAX, help="seed of initial weights, data order, flips, timesteps and noise")
    warmup_steps: int = _spec(0, lo=0, help="linear learning-rate warm-up over this many steps (0: off)")
    grad_clip: float = _spec(1.0, lo=0.0, help="global gradient-norm clip (0: off)")
    deterministic: bool = _spec(False, help="TF op determinism: a resumed run equals an uninterrupted one")
    precision: str = _spec("float32", choices=PRECISIONS,
                           help="`float32`, `mixed_float16` (dynamic loss scaling) or `mixed_bfloat16`; the loss and "
                                "EMA stay float32")
    loss_weighting: str = _spec("none", choices=LOSS_WEIGHTINGS,
                                help="per-timestep loss weights: `none`, or `min_snr` (Hang et al. 2023), the "
                                     "x0-space error weighted by min(SNR, gamma), converted for each prediction")
    min_snr_gamma: float = _spec(5.0, lo=0.01, hi=1000.0, help="gamma of min-SNR weighting")
    jit_compile: str = _spec("auto", choices=JIT_MODES,
                             help="XLA for the train step and the sampler: `auto` = on with a GPU, off on a CPU")
    label_dropout: float = _spec(0.1, lo=0.0, hi=1.0,
                                 help="with labels (data.labels): share of images trained with the null label, "
                                      "the unconditional branch classifier-free guidance needs (Ho & Salimans 2022)")
    augment_p: float = _spec(0.0, lo=0.0, hi=1.0,
                             help="non-leaky augmentation (EDM, Karras et al. 2022): the probability of each transform "
                                  "(x-flip, integer translation, scaling, rotation, anisotropic scaling), given to the "
                                  "network as conditioning that sampling sets to zero; 0.12-0.15 in EDM (0: off)")
    init_from: str = _spec("", help="a new run starts from another run's EMA weights: `RUN` (its newest export) or "
                                    "`RUN@STEP`; fresh optimizer and step counter, the same network required")
    eval_every: int = _spec(0, lo=0, help="KID/FID/near-copies (the `eval` section's settings) every N epochs, "
                                          "to `RUN/eval.csv` and TensorBoard (0: never)")
    distribute: str = _spec("none", choices=DISTRIBUTE_MODES,
                            help="tf.distribute: `none` (one device), `mirrored` (every GPU of this machine), "
                                 "`multi_worker` (several machines, from TF_CONFIG or Slurm) or `auto` (multi_worker "
                                 "when a cluster is described, mirrored with more than one GPU, else none); "
                                 "batch_size is per replica, the global batch batch_size x accumulate x replicas")

    @property
    def images_per_step(self) -> int:
        """Images of one optimizer step: batch_size x accumulate."""
        return self.batch_size * self.accumulate


@dataclass(frozen=True)
class SampleConfig:
    n: int = _spec(64, lo=1, hi=100000, help="images to generate")
    batch_size: int = _spec(64, lo=1, hi=4096, help="images per sampler batch")
    seed: int = _spec(0, lo=0, hi=SEED_MAX, help="image i uses seed + i")
    sampler: str = _spec("ddpm", choices=SAMPLER_NAMES,
                         help="reverse sampler: " + ", ".join(f"`{name}`" for name in SAMPLER_NAMES))
    steps: int = _spec(0, lo=0, hi=100000, help=f"sampler steps (0: the sampler's default: {describe_default_steps()})")
    eta: float = _spec(0.0, lo=0.0, hi=1.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    spacing: str = _spec("linspace", choices=SPACINGS,
                         help="which timesteps a short sampler visits: `linspace` or `trailing`")
    variance: str = _spec("small", choices=VARIANCES,
                          help="DDPM reverse variance: `small` (posterior) or `large` (beta)")
    clip_x0: bool = _spec(True, help="clip the predicted x0 to [-1, 1] at every step")
    guidance: float = _spec(GUIDANCE_DEFAULT, lo=0.0, hi=GUIDANCE_MAX,
                            help="classifier-free guidance scale W of a run with labels: uncond + W (cond - uncond); "
                                 "1 plain conditional, 0 unconditional, above 1 more typical of the class")


@dataclass(frozen=True)
class EvalConfig:
    features: str = _spec("imagenet", help="feature network of `ddpm eval`: `imagenet` (Keras' Inception-V3, "
                                           "downloaded once) or a `.h5`/`.keras` file")
    n: int = _spec(256, lo=2, hi=100000, help="samples generated for `ddpm eval` and `train.eval_every`")
    sampler: str = _spec("ddim", choices=SAMPLER_NAMES, help="sampler of the evaluated images")
    steps: int = _spec(0, lo=0, hi=100000, help=f"its steps (0: the sampler's default: {describe_default_steps()})")
    eta: float = _spec(1.0, lo=0.0, hi=1.0, help="its DDIM eta")
    seed: int = _spec(100000, lo=0, hi=SEED_MAX,
                      help="first seed of the evaluated samples (fixed, so runs compare on the same noise)")
    kid_subsets: int = _spec(100, lo=1, hi=10000, help="KID is averaged over this many random subsets")
    kid_subset_size: int = _spec(100, lo=2, hi=100000,
                                 help="images per KID subset (at most the set sizes; below them, so the std means something)")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig,
            "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig}


def _describe(meta: dict, kind: str) -> str:
    """Human text for what a field accepts, e.g. 'an integer >= 1' or 'one of linear, cosine'."""
    if meta["choices"] is not None:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    rng = ""
    if lo is not None and hi is not None:
        rng = f" in [{lo}, {hi}]"
    elif lo is not None:
        rng = f" >= {lo}"
    elif hi is not None:
        rng = f" <= {hi}"
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "tuple": "a list of integers"}[kind] + rng


KNOWN_KEYS_SHOWN = 10  # keys named by an unknown-key message, the closest to the typo first


def _known_keys(fields, name) -> str:
    """A section's keys for an unknown-key message: the closest to `name` first, at most KNOWN_KEYS_SHOWN."""
    import difflib

    names = list(fields)
    close = difflib.get_close_matches(str(name)[:100], names, n=3, cutoff=0.5)
    ordered = close + [n for n in names if n not in close]
    more = len(ordered) - KNOWN_KEYS_SHOWN
    return ", ".join(ordered[:KNOWN_KEYS_SHOWN]) + (f" and {more} more (docs/configuration.md)" if more > 0 else "")


def _check_value(where: str, key: str, value: Any, default: Any, meta: dict) -> Any:
    """Coerce `value` to the type of `default` and check its range; raise ConfigError naming the key."""
    kind = type(default).__name__
    expected = _describe(meta, kind)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {_short(value)} {why}: expected {expected}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("has the wrong type")
        items = [value]
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("has the wrong type")
        if abs(value) > INT_MAX:
            raise bad("is too large")
        items = [value]
    elif kind == "float":
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string; users write it anyway
            try:
                value = float(value)
            except ValueError:
                raise bad("has the wrong type") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("has the wrong type")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            raise bad("is not a finite number") from None
        # NaN passes any `v < lo or v > hi` check (comparisons with NaN are false): refuse it by name.
        if not math.isfinite(value):
            raise bad("is not a finite number")
        items = [value]
    elif kind == "str":  # empty only where the default is (train.init_from: "" is "none")
        if isinstance(value, bool) and meta["choices"] and {"true", "false"} <= set(meta["choices"]):
            value = "true" if value else "false"  # YAML reads `jit_compile: true` (and --set ...=true) as a bool
        if not isinstance(value, str) or (not value and default):
            raise bad("has the wrong type")
        items = [value]
    else:  # tuple of ints
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or \
                any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad("has the wrong type")
        if any(abs(v) > INT_MAX for v in value):
            raise bad("is too large")
        value = tuple(value)
        items = list(value)
    for v in items:
        if meta["choices"] is not None and v not in meta["choices"]:
            raise bad("is not allowed")
        if meta["lo"] is not None and v < meta["lo"] or meta["hi"] is not None and v > meta["hi"]:
            raise bad("is out of range")
    return value


def _check_colour(text: str, where: str) -> None:
    """A colour Pillow understands, e.g. white, gray, #202020."""
    from PIL import ImageColor

    try:
        ImageColor.getrgb(text)
    except ValueError:
        raise ConfigError(f"{where}: data.background = {_short(text)} is not a colour: expected a name (white, "
                          "black, gray, ...) or #rrggbb") from None


def _cross_checks(cfg: Config, at) -> None:
    """Checks that involve several keys at once; `at(*keys)` names where those keys were set."""
    m, d = cfg.model, cfg.data
    widths = [m.base_channels * k for k in m.channel_mult]
    width_keys = ("model.base_channels", "model.channel_mult")
    for w in widths:
        if w % m.norm_groups:
            raise ConfigError(f"{at('model.norm_groups', *width_keys)}: model.norm_groups = {m.norm_groups} does "
                              f"not divide the width {w} (model.base_channels x model.channel_mult): expected a "
                              "divisor of every width")
        if w % m.attention_heads:
            raise ConfigError(f"{at('model.attention_heads', *width_keys)}: model.attention_heads = "
                              f"{m.attention_heads} does not divide the width {w}")
    down = 2 ** (len(widths) - 1)
    if d.image_size % down:
        raise ConfigError(f"{at('data.image_size', 'model.channel_mult')}: data.image_size = {d.image_size} is not "
                          f"divisible by {down}: expected a multiple of 2**(levels-1) for {len(widths)} levels in "
                          "model.channel_mult")
    sizes = [d.image_size // 2**i for i in range(len(widths))]
    for r in m.attention_resolutions:
        if r not in sizes:
            raise ConfigError(f"{at('model.attention_resolutions', 'data.image_size', 'model.channel_mult')}: "
                              f"model.attention_resolutions contains {r}, which is not a feature-map size of this "
                              f"network: expected some of {_short(sizes)}")
    for key in ("sample", "eval"):
        steps = getattr(cfg, key).steps
        if steps > cfg.diffusion.timesteps:
            raise ConfigError(f"{at(f'{key}.steps', 'diffusion.timesteps')}: {key}.steps = {steps} is more than "
                              f"diffusion.timesteps = {cfg.diffusion.timesteps}: expected 0 (the sampler's "
                              f"default) to {cfg.diffusion.timesteps}")
    for seed_key, n_key in (("sample.seed", "sample.n"), ("eval.seed", "eval.n"), ("run.preview_seed", "run.preview_n")):
        seed, n = (getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in (seed_key, n_key))
        problem = seed_range_problem(seed, n)
        if problem:
            raise ConfigError(f"{at(seed_key, n_key)}: {seed_key} = {seed} with {n_key} = {n} {problem}")
    _check_colour(d.background, at("data.background"))
    if cfg.diffusion.beta_end <= cfg.diffusion.beta_start:
        raise ConfigError(f"{at('diffusion.beta_end', 'diffusion.beta_start')}: diffusion.beta_end = "
                          f"{cfg.diffusion.beta_end} must be greater than diffusion.beta_start = "
                          f"{cfg.diffusion.beta_start}")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5), the value typed by YAML like in the file."""
    if "=" not in text:
        raise ConfigError(f"--set {_short(text)}: expected section.key=value, e.g. --set train.epochs=10")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_dict(raw: dict, where: str, overrides: list[tuple[str, Any]] = ()) -> Config:
    """Build and validate a Config from a nested dict; `where` names the source in error messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got "
                          f"{type(raw).__name__} {_short(raw)}")
    merged: dict[str, dict] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {_short(section)}: expected one of {', '.join(SECTIONS)}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {_short(body)}")
        merged[section] = {k: (v, where) for k, v in body.items()}
    for key, value in overrides:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"--set {_short(key)}: unknown key: expected section.key with a section among "
                              f"{', '.join(SECTIONS)}")
        merged.setdefault(section, {})[name] = (value, "--set")
    sections, sources = {}, {}
    for section, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for name, (value, src) in merged.get(section, {}).items():
            key = f"{section}.{name}" if isinstance(name, str) else f"{section}.{_short(name)}"
            if name not in fields:
                raise ConfigError(f"{src}: unknown key {_short(key)}: {section} has {_known_keys(fields, name)}")
            f = fields[name]
            values[name] = _check_value(src, key, value, f.default, f.metadata)
            sources[key] = src
        sections[section] = cls(**values)
    cfg = Config(**sections)

    def at(*keys: str) -> str:
        """Where the keys of a cross-key error were set: --set when one of them was (the likely cause)."""
        found = {sources[k] for k in keys if k in sources}
        return "--set" if "--set" in found else where

    _cross_checks(cfg, at)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply `section.key=value` overrides."""
    parsed = [parse_override(o) for o in overrides]
    if path is None:
        return from_dict({}, "defaults", parsed)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder: expected a YAML config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                          "expected a YAML config file saved as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        raw = _load_yaml(text)
    except _Refused as exc:
        mark = exc.problem_mark
        raise ConfigError(f"{path}: line {mark.line + 1}, column {mark.column + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if isinstance(exc, yaml.reader.ReaderError):  # its str() spans two lines
            pos, why = f" at offset {exc.position}", f"{exc.reason} (#x{exc.character if isinstance(exc.character, int) else ord(exc.character):04x})"
        raise ConfigError(f"{path}: not valid YAML{pos}: {why[:2 * ECHO_MAX]}") from None
    return from_dict(raw, str(path), parsed)


def to_dict(cfg: Config) -> dict:
    """A plain nested dict (tuples as lists) that `from_dict` reads back to an equal Config."""
    out = {}
    for section in SECTIONS:
        body = dataclasses.asdict(getattr(cfg, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}
    return out


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every config key: docs/configuration.md's table (scripts/config_table.py)."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", f.default, f.metadata["help"]))
    return rows
