"""The seed range, once: what the stateless TF generators take (seeds are cast to int32 in
`samplers.per_image_normal` and `data.make_dataset`), so what every option and config key accepts.

TF-free, so the CLI and the config check seeds before TensorFlow is imported.
"""

from __future__ import annotations

SEED_MAX = 2**31 - 1


def seed_range_problem(first: int, n: int) -> str | None:
    """Why the seeds first .. first + n - 1 do not all fit 0..SEED_MAX, or None when they do."""
    last = first + n - 1
    if first < 0 or last > SEED_MAX:
        return f"would use seeds {first}..{last}: expected seeds in 0..{SEED_MAX}"
    return None


def check_seed_range(first: int, n: int, first_name: str, n_name: str) -> None:
    """A ConfigError (exit 2) naming the option or key of the first seed and of the count when the seeds
    first .. first + n - 1 leave 0..SEED_MAX: checked before any sampling, so no image has a seed that
    `--seeds` would refuse."""
    problem = seed_range_problem(first, n)
    if problem:
        from .config import ConfigError

        def named(name, value):
            return f"{name} {value}" if name.startswith("--") else f"{name} = {value}"

        raise ConfigError(f"{named(first_name, first)} with {named(n_name, n)} {problem}")


def parse_seeds(text: str | None) -> list[int] | None:
    """'17, 42' -> [17, 42] (None for None); a ConfigError for anything but integers in 0..SEED_MAX. The one
    parser of a seed list, for `ddpm sample --seeds` and the web page's seed box."""
    if text is None:
        return None
    from .errors import ConfigError

    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"{text[:80]!r}: expected comma-separated integers, e.g. 17,42") from None
    if not seeds or any(not 0 <= s <= SEED_MAX for s in seeds):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(f"{shown!r}: expected seeds in 0..{SEED_MAX}")
    return seeds
