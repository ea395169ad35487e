"""Reading a prepared directory (moejax.data.prepare's output): its manifest, its tokenizer, and
each split's tokens and document index over its shards.

A split is a list of shards in manifest order (format 3: `splits.<split>.shards`, files
`<split>/NNNNN-NNNNN.{tokens,docs,variants}.npy` with offsets starting at 0 within the shard, no
document across two shards; format <= 2: one shard, the top-level `<split>.*.npy`). `load_split`
checks every shard's files against the manifest from their .npy headers and small docs/variants
arrays, never reading token data, and concatenates the offsets into one global index; `Split.tokens`
(`ShardedTokens`) slices the shard a range falls in, memory-mapping shards lazily on first use and
keeping at most MAX_OPEN_SHARDS open (least recently used closed first). A pickled Split (grain's
prefetch workers) carries paths and reopens shards lazily.
"""
import collections
import dataclasses
import json
import threading
from pathlib import Path

import numpy as np

from moejax.data import tokenizer as tokenizers

MAX_OPEN_SHARDS = 64      # memory-mapped token shards kept open per split (LRU)


class DataError(ValueError):
  """Missing or inconsistent prepared data, or invalid pipeline arguments (one line, names it)."""


def load_manifest(data_dir: str) -> dict:
  """Reads `data_dir/manifest.json` written by `python -m moejax.data.prepare`."""
  path = Path(data_dir) / 'manifest.json'
  if not path.is_file():
    raise DataError(f'data_dir: {data_dir} has no manifest.json; run `make data`')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e.msg})') from None


def load_tokenizer(data_dir: str):
  """The tokenizer the data in `data_dir` was tokenized with (moejax.data.tokenizer: encode,
  decode, eod_id, vocab_size)."""
  try:
    return tokenizers.from_prepared(data_dir, load_manifest(data_dir))
  except tokenizers.TokenizerError as e:
    raise DataError(str(e)) from None


class ShardedTokens:
  """A split's tokens over its shards: `tokens[a:b]` (a range may span shards, though an entry
  never does), `len(tokens)`, `.dtype`. Shards are memory-mapped on first use and at most
  MAX_OPEN_SHARDS stay open (least recently used closed first); pickling keeps only the paths."""

  def __init__(self, paths: list[str], lengths: list[int], dtype):
    self.paths = [str(p) for p in paths]
    self.bases_i64 = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)
    self.dtype = np.dtype(dtype)
    self._init_cache()

  def _init_cache(self):
    self._open = collections.OrderedDict()   # shard index -> memmap, most recently used last
    self._lock = threading.Lock()            # grain reads with several threads

  def __getstate__(self):
    return {'paths': self.paths, 'bases_i64': self.bases_i64, 'dtype': self.dtype}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return int(self.bases_i64[-1])

  @property
  def num_shards(self) -> int:
    return len(self.paths)

  @property
  def num_open(self) -> int:
    """Shards memory-mapped right now."""
    return len(self._open)

  def shard(self, i: int) -> np.ndarray:
    """Shard i's tokens (a memmap), opened if needed."""
    with self._lock:
      mm = self._open.get(i)
      if mm is not None:
        self._open.move_to_end(i)
        return mm
      mm = _load_npy(Path(self.paths[i]), mmap=True)
      if len(mm) != self.bases_i64[i + 1] - self.bases_i64[i]:
        raise DataError(f'{self.paths[i]}: {len(mm)} tokens, expected '
                        f'{self.bases_i64[i + 1] - self.bases_i64[i]}: replaced since the split '
                        'was opened; prepare the data again')
      self._open[i] = mm
      while len(self._open) > max(1, MAX_OPEN_SHARDS):
        self._open.popitem(last=False)
      return mm

  def __getitem__(self, key):
    n = len(self)
    if not isinstance(key, slice):
      k = int(key)
      k = k + n if k < 0 else k
      if not 0 <= k < n:
        raise IndexError(key)
      i = int(np.searchsorted(self.bases_i64, k, side='right')) - 1
      return self.shard(i)[k - int(self.bases_i64[i])]
    start, stop, step = key.indices(n)
    if step != 1:
      raise IndexError('ShardedTokens: only contiguous slices')
    parts = []
    while start < stop:
      i = int(np.searchsorted(self.bases_i64, start, side='right')) - 1
      base, end = int(self.bases_i64[i]), min(stop, int(self.bases_i64[i + 1]))
      parts.append(self.shard(i)[start - base:end - base])
      start = end
    if not parts:
      return np.zeros(0, self.dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclasses.dataclass
class Split:
  tokens: ShardedTokens     # [T], over the shards (or any array)
  offsets_i64: np.ndarray   # [num_entries + 1]: entry k = tokens[offsets[k]:offsets[k+1]]
  variants_i64: np.ndarray  # [num_docs + 1]: doc d = entries variants[d]..variants[d+1]-1
  manifest: dict

  def __getstate__(self):  # prefetch workers reopen a memmap rather than get a copy of it
    state = dict(self.__dict__)
    if isinstance(self.tokens, np.memmap):
      state['tokens'] = str(self.tokens.filename)
    return state

  def __setstate__(self, state):
    if isinstance(state['tokens'], str):
      state['tokens'] = np.load(state['tokens'], mmap_mode='r')
    self.__dict__.update(state)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
  if not path.is_file():
    raise DataError(f'{path}: missing; prepare the data again')
  try:
    return np.load(path, mmap_mode='r' if mmap else None)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f'{path}: truncated or unreadable ({str(e).splitlines()[0]})') from None


def _npy_header(path: Path) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of an .npy file from its header, checking the file holds all the data."""
  if not path.is_file():
    raise DataError(f'{path}: missing; prepare the data again')
  fmt = np.lib.format
  try:
    with open(path, 'rb') as f:
      version = fmt.read_magic(f)
      read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
      shape, _, dtype = read(f)
      data_start = f.tell()
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f'{path}: truncated or unreadable ({str(e).splitlines()[0]})') from None
  size, want = path.stat().st_size, data_start + int(np.prod(shape)) * dtype.itemsize
  if size < want:
    raise DataError(f'{path}: truncated or unreadable ({size} bytes, its header needs {want})')
  return shape, dtype


def _shard_list(d: Path, split: str, stats: dict) -> list[tuple[Path, Path, Path | None, dict]]:
  """(tokens, docs, variants or None for format 1, counts) per shard, in order."""
  if 'shards' not in stats:   # format <= 2: the split is one shard of top-level files
    return [(d / f'{split}.tokens.npy', d / f'{split}.docs.npy', d / f'{split}.variants.npy', stats)]
  shards = stats['shards']
  if not shards:
    raise DataError(f'{d}/manifest.json: split {split!r} lists no shards')
  return [(d / f"{s['name']}.tokens.npy", d / f"{s['name']}.docs.npy",
           d / f"{s['name']}.variants.npy", s) for s in shards]


def load_split(data_dir: str, split: str) -> Split:
  """Loads a split and checks it against the manifest (sizes, counts; from the .npy headers and
  the offsets, reading no token data); DataError names the file."""
  manifest = load_manifest(data_dir)
  if split not in manifest.get('splits', {}):
    raise DataError(f'data_dir: {data_dir} has no {split!r} split')
  d = Path(data_dir)
  stats = manifest['splits'][split]
  sharded = 'shards' in stats
  files = manifest.get('files', {})
  shards = _shard_list(d, split, stats)
  if sharded:   # this split's files (many); the other splits' are checked when they are loaded
    names = {str(p.relative_to(d)) for t, o, v, _ in shards for p in (t, o, v)}
    checked = [(name, size) for name, size in files.items() if name in names]
  else:
    checked = list(files.items())
  for name, size in checked:
    if (d / name).is_file() and (d / name).stat().st_size != size:
      raise DataError(f'{d / name}: {(d / name).stat().st_size} bytes, manifest.json says '
                      f'{size}: truncated or replaced; prepare the data again')
  want_dtype = np.dtype(manifest['token_dtype']) if 'token_dtype' in manifest else None
  paths, lengths, offsets, variants = [], [], [], []
  token_base = entry_base = 0
  for tpath, opath, vpath, counts in shards:
    shape, dtype = _npy_header(tpath)
    if len(shape) != 1 or dtype.kind not in 'ui':
      raise DataError(f'{tpath}: shape {shape} {dtype}, expected 1-D integer token ids')
    if want_dtype is not None and dtype != want_dtype:
      raise DataError(f'{tpath}: {dtype} tokens, manifest.json says {want_dtype}')
    want_dtype = dtype
    num_tokens = shape[0]
    if num_tokens != counts['num_tokens']:
      raise DataError(f'{tpath}: {num_tokens} tokens, manifest.json says {counts["num_tokens"]}')
    offsets_i64 = _load_npy(opath, mmap=False).astype(np.int64, copy=False)
    if (len(offsets_i64) < 2 or offsets_i64[-1] != num_tokens or offsets_i64[0] != 0
        or (sharded and len(offsets_i64) != counts['num_entries'] + 1)):
      raise DataError(f'{opath}: offsets do not cover {tpath.name}')
    if vpath.is_file() or 'files' in manifest or sharded:
      variants_i64 = _load_npy(vpath, mmap=False).astype(np.int64, copy=False)
    else:   # format 1: no variants, every entry its own document
      variants_i64 = np.arange(len(offsets_i64), dtype=np.int64)
    if (len(variants_i64) < 1 or variants_i64[-1] != len(offsets_i64) - 1
        or variants_i64[0] != 0 or len(variants_i64) != counts['num_docs'] + 1):
      raise DataError(f'{vpath}: document index does not match {opath.name} / manifest.json')
    paths.append(tpath)
    lengths.append(num_tokens)
    offsets.append(offsets_i64[:-1] + token_base)
    variants.append(variants_i64[:-1] + entry_base)
    token_base += num_tokens
    entry_base += len(offsets_i64) - 1
  num_docs = sum(len(v) for v in variants)
  if sharded and (token_base, entry_base, num_docs) != (
      stats.get('num_tokens'), stats.get('num_entries'), stats.get('num_docs')):
    raise DataError(f'{d}/manifest.json: split {split!r} totals {stats.get("num_tokens")} tokens / '
                    f'{stats.get("num_entries")} entries / {stats.get("num_docs")} docs, its shards '
                    f'hold {token_base} / {entry_base} / {num_docs}')
  offsets_i64 = np.concatenate([*offsets, [token_base]]).astype(np.int64)
  variants_i64 = np.concatenate([*variants, [entry_base]]).astype(np.int64)
  return Split(ShardedTokens(paths, lengths, want_dtype), offsets_i64, variants_i64, manifest)


def split_entries(data_dir: str, split: str) -> list[np.ndarray]:
  """Every entry's tokens (each variant of each document, EOD included) in stored order."""
  s = load_split(data_dir, split)
  return [np.asarray(s.tokens[a:b]) for a, b in zip(s.offsets_i64[:-1], s.offsets_i64[1:])]
