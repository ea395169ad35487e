"""Prepare a raw text corpus for training: split into documents, dedupe, hold out a split by
document, train (or load) a byte-level BPE tokenizer, and write token arrays.

python -m moejax.data.prepare --raw=data/shakespeare/raw --out=data/shakespeare/prepared \
    --vocab_size=4096 [--tokenizer=path/to/tokenizer.json] [--val_fraction=0.05] [--seed=0]

Outputs in --out: {train,val}.tokens.npy (token ids, each document followed by EOD),
{train,val}.docs.npy (int64 offsets [num_docs+1]), tokenizer.json, manifest.json.
"""

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when splitting/tokenization logic changes
MIN_DOC_CHARS = 200  # shorter sections (e.g. a bare "ACT II." line) merge into the next one
# Section headings: "ACT I.", "SCENE 2.", "ACT FIFTH.", folio "Actus Primus. Scoena Prima.",
# and bare roman-numeral lines (numbered sonnets / poems).
HEADING = re.compile(
    r"^[ \t]*(?:(?:ACT|Act)[ \t]+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
    r"|(?:SCENE|Scene)[ \t]+(?:[IVXL]+|\d+)\b|Actus\b|Scena\b|Scoena\b|[IVXLC]+\.?[ \t]*$)",
    re.M)


class PrepareError(Exception):
    """A user-facing problem with the inputs; reported as one line, exit code 2."""


def split_documents(text: str) -> list[str]:
    """Splits one raw text into documents at act/scene/numbered-section headings."""
    starts = [0] + [m.start() for m in HEADING.finditer(text)] + [len(text)]
    docs, pending = [], ""
    for a, b in zip(starts[:-1], starts[1:]):
        pending += text[a:b]
        if len(pending.strip()) >= MIN_DOC_CHARS:
            docs.append(pending)
            pending = ""
    if pending.strip():
        if docs:
            docs[-1] += pending
        else:
            docs.append(pending)
    return [re.sub(r"\n{3,}", "\n\n", d.strip()) for d in docs]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE tokenizer with EOD as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_inputs_hash(files: list[Path]) -> str:
    """Hashes the names and contents of the raw input files."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_bytes(f.read_bytes()).encode())
    return h.hexdigest()


def write_split(out: Path, split: str, tokenizer: Tokenizer, docs: list[str], eod_id: int,
                dtype: type) -> dict:
    """Tokenizes docs (each + EOD) and writes {split}.tokens.npy / {split}.docs.npy."""
    ids = [enc.ids + [eod_id] for enc in tokenizer.encode_batch(docs)]
    offsets_i64 = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets_i64[1:])
    tokens = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets_i64[-1]))
    np.save(out / f"{split}.tokens.npy", tokens)
    np.save(out / f"{split}.docs.npy", offsets_i64)
    return {"num_docs": len(ids), "num_tokens": int(offsets_i64[-1])}


def prepare(raw: Path, out: Path, vocab_size: int, tokenizer_path: Path | None,
            val_fraction: float, seed: int) -> str:
    """Runs the recipe; returns the one-line status message."""
    if not raw.is_dir():
        raise PrepareError(f"raw dir {raw} does not exist; run the fetch script first")
    files = sorted(raw.glob("*.txt"))
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer_path is not None and not tokenizer_path.is_file():
        raise PrepareError(f"--tokenizer {tokenizer_path} is not a file")
    args = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "seed": seed,
            "val_fraction": val_fraction,
            "tokenizer_sha256": tokenizer_path and sha256_bytes(tokenizer_path.read_bytes())}
    raw_sha256 = raw_inputs_hash(files)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("raw_sha256") == raw_sha256 and old.get("args") == args:
            return f"prepared data up to date: {out}"

    all_docs = [d for f in files for d in split_documents(f.read_text(encoding="utf-8"))]
    docs = list(dict.fromkeys(all_docs))  # exact dedup, first occurrence order
    if len(docs) < 2:
        raise PrepareError(f"corpus in {raw} is empty or has fewer than 2 documents "
                           f"({len(files)} .txt files, {len(docs)} documents)")
    perm = np.random.default_rng(seed).permutation(len(docs))
    num_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    splits = {"train": [docs[i] for i in train_idx], "val": [docs[i] for i in val_idx]}

    if tokenizer_path is None:
        tokenizer = train_tokenizer(splits["train"], vocab_size)
    else:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eod_id = tokenizer.token_to_id(EOD_TOKEN)
    if eod_id is None:
        raise PrepareError(f"tokenizer has no {EOD_TOKEN} token")
    actual_vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if actual_vocab < 2**16 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "prepared"
        staging.mkdir()
        tokenizer_json = tokenizer.to_str().encode()
        (staging / "tokenizer.json").write_bytes(tokenizer_json)
        split_stats = {name: write_split(staging, name, tokenizer, split_docs, eod_id, dtype)
                       for name, split_docs in splits.items()}
        manifest = {
            "raw_sha256": raw_sha256, "args": args, "num_raw_files": len(files),
            "tokenizer_sha256": sha256_bytes(tokenizer_json), "vocab_size": actual_vocab,
            "eod_id": eod_id, "token_dtype": np.dtype(dtype).name,
            "duplicate_docs_removed": len(all_docs) - len(docs), "splits": split_stats}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    stats = ", ".join(f"{k}: {v['num_docs']} docs / {v['num_tokens']} tokens"
                      for k, v in split_stats.items())
    return f"prepared {out} ({stats}; vocab {actual_vocab})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        msg = prepare(a.raw, a.out, a.vocab_size, a.tokenizer, a.val_fraction, a.seed)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(msg if "up to date" in msg else f"{msg} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
