"""Training/eval input pipeline over prepared sources (see moejax.data.prepare), on grain.MapDataset.

Per source, epoch e reads every document once, in an order shuffled with a seed derived from
(seed, source, e), each as the variant its policy picks (`original`: variant 0; `cycle`: variant
e mod n_variants; `random`: a seeded choice per document and epoch); the epochs follow each other
in one stream, cut into windows of seq_len+1 tokens with stride seq_len (every token is a target
exactly once; nothing is dropped at epoch ends), and the stream stops after `epochs` epochs.
Sources are mixed window by window with grain's deterministic weighted interleave; a source that
has spent its epoch budget drops out and the others go on with their weights renormalised
(`PhasedMix`), so the stream ends when every budget is spent.
Batches: dict(inputs, targets, loss_mask, segment_ids, positions) of shape [B, L]; segment ids
count documents within a row from 1 (an EOD token belongs to the document it ends), positions
restart at 0 at each document.

Storage: a split is a list of shards in manifest order (format 3: `splits.<split>.shards`, files
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
import zlib
from pathlib import Path

import grain
import numpy as np

from moejax.data import tokenizer as tokenizers

POLICIES = ('original', 'cycle', 'random')
UNBOUNDED_EPOCHS = 1000   # epochs = 0 means "repeat": this many epochs
MIX_RESOLUTION = 100      # weights become integer proportions, the smallest scaled to this
MAX_OPEN_SHARDS = 64      # memory-mapped token shards kept open per split (LRU)


class DataError(ValueError):
  """Missing or inconsistent prepared data, or invalid pipeline arguments (one line, names it)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One prepared source in the training mixture (config: data.sources.<name>)."""
  name: str
  dir: str
  weight: float = 1.0
  epochs: int = 0               # 0 = repeat (UNBOUNDED_EPOCHS)
  variant_policy: str = 'original'
  doc_fraction: float = 1.0     # train on a seeded subset of this fraction of the documents
  field: str = ''               # config path in messages; '' = data.sources.<name>

  def __post_init__(self):
    if not self.field:
      object.__setattr__(self, 'field', f'data.sources.{self.name}')
    field = self.field
    if not isinstance(self.weight, (int, float)) or not self.weight > 0:
      raise DataError(f'{field}.weight: must be > 0, got {self.weight!r}')
    if self.variant_policy not in POLICIES:
      raise DataError(f'{field}.variant_policy: unknown policy {self.variant_policy!r}; '
                      f'choose one of {list(POLICIES)}')
    if not isinstance(self.epochs, int) or self.epochs < 0:
      raise DataError(f'{field}.epochs: must be an integer >= 0, got {self.epochs!r}')
    if not 0 < self.doc_fraction <= 1:
      raise DataError(f'{field}.doc_fraction: must be in (0, 1], got {self.doc_fraction!r}')


def sources_from_config(data_cfg) -> list[Source]:
  """`data.sources` (name -> dir/weight/epochs/variant_policy/doc_fraction), or by default one
  source `main` from data.dir with data.epochs / data.variant_policy."""
  specs = dict(data_cfg.get('sources') or {})
  if not specs:
    return [Source('main', data_cfg.dir, 1.0, data_cfg.get('epochs', 0),
                   data_cfg.get('variant_policy', 'original'), field='data')]
  out = []
  for name, s in sorted(specs.items()):
    s = dict(s)
    settable = {f.name for f in dataclasses.fields(Source)} - {'name', 'field'}
    unknown = set(s) - settable
    if unknown:
      raise DataError(f'data.sources.{name}: unknown field(s) {sorted(unknown)}')
    if 'dir' not in s:
      raise DataError(f'data.sources.{name}.dir: missing')
    out.append(Source(name=name, **s))
  return out


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


class SourceWindows:
  """Random-access windows int32[seq_len+1] over one source's stream of epochs (see module doc)."""

  def __init__(self, split: Split, *, seq_len: int, seed: int, policy: str = 'original',
               epochs: int = 1, doc_fraction: float = 1.0, shuffle: bool = True, salt: int = 0):
    self._split, self._seq_len, self._policy, self._shuffle = split, seq_len, policy, shuffle
    self._seed = (seed, salt)
    self._entry_len = np.diff(split.offsets_i64)
    first_i64, self._num_variants = split.variants_i64[:-1], np.diff(split.variants_i64)
    num_docs = len(first_i64)
    docs = np.arange(num_docs)
    if doc_fraction < 1:
      k = max(1, round(doc_fraction * num_docs))
      docs = np.sort(np.random.default_rng([seed, salt, 7]).permutation(num_docs)[:k])
    self.docs = docs
    self._first = first_i64[docs]
    self._nvar = self._num_variants[docs]
    self.max_variants = int(self._nvar.max())
    lens = [int(self._entry_len[self._first + self._variant(e)].sum()) for e in
            (range(epochs) if policy != 'original' else range(1))]
    self.epoch_lens = np.array(lens * epochs if policy == 'original' else lens, np.int64)
    self.cum_i64 = np.concatenate([[0], np.cumsum(self.epoch_lens)])
    self._len = int(max(0, (self.cum_i64[-1] - 1) // seq_len))
    self._cached = (-1, None)

  def __len__(self) -> int:
    return self._len

  def _variant(self, epoch: int) -> np.ndarray:
    """Variant index of each document (in self.docs order) in `epoch`."""
    if self._policy == 'original':
      return np.zeros(len(self.docs), np.int64)
    if self._policy == 'cycle':
      return epoch % self._nvar
    return np.random.default_rng([*self._seed, epoch, 1]).integers(self._nvar)

  def epoch_entries(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry ids in read order, their variant indices, cumulative lengths [n+1]) of an epoch."""
    cached = self._cached  # one atomic read; safe under grain's reader threads
    if cached[0] == epoch:
      return cached[1]
    n = len(self.docs)
    order = (np.random.default_rng([*self._seed, epoch]).permutation(n) if self._shuffle
             else np.arange(n))
    variant = self._variant(epoch)[order]
    entries = self._first[order] + variant
    cum_i64 = np.concatenate([[0], np.cumsum(self._entry_len[entries])])
    self._cached = (epoch, (entries, variant, cum_i64))
    return entries, variant, cum_i64

  def _read(self, epoch: int, start: int, stop: int) -> np.ndarray:
    """Tokens at positions [start, stop) of one epoch's stream."""
    entries, _, cum_i64 = self.epoch_entries(epoch)
    parts = []
    k = int(np.searchsorted(cum_i64, start, side='right')) - 1
    while start < stop:
      shift = self._split.offsets_i64[entries[k]] - cum_i64[k]
      end = min(stop, int(cum_i64[k + 1]))
      parts.append(self._split.tokens[shift + start:shift + end])
      start, k = end, k + 1
    return np.concatenate(parts)

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self._len:
      raise IndexError(index)
    start = index * self._seq_len
    stop = start + self._seq_len + 1
    parts = []
    while start < stop:
      epoch = int(np.searchsorted(self.cum_i64, start, side='right')) - 1
      end = min(stop, int(self.cum_i64[epoch + 1]))
      parts.append(self._read(epoch, start - int(self.cum_i64[epoch]), end - int(self.cum_i64[epoch])))
      start = end
    return np.concatenate(parts).astype(np.int32)

  def progress(self, num_tokens: int) -> dict:
    """Epoch (fractional) and documents read per variant index after `num_tokens` of the stream."""
    epoch = min(int(np.searchsorted(self.cum_i64, num_tokens, side='right')) - 1,
                len(self.epoch_lens) - 1)
    into = num_tokens - int(self.cum_i64[epoch])
    counts = np.zeros(self.max_variants, np.int64)
    for e in range(epoch):   # whole epochs: every document once
      counts += np.bincount(self._variant(e), minlength=self.max_variants)
    _, variant, cum_i64 = self.epoch_entries(epoch) if epoch != self._cached[0] else self._cached[1]
    started = int(np.searchsorted(cum_i64, into, side='left'))
    counts += np.bincount(variant[:started], minlength=self.max_variants)
    return {'epoch': epoch + into / int(self.epoch_lens[epoch]), 'variant_docs': counts.tolist()}


def _interleave_count(k: int, props: tuple[int, ...], i: int) -> int:
  """How many of the first k elements of grain's weighted interleave come from input i."""
  rem, c = sum(props), k
  for p in props[:i]:
    c, rem = c * (rem - p) // rem, rem - p
  return c - c * (rem - props[i]) // rem


class PhasedMix(grain.transforms.DatasetSelectionMap):
  """Weighted interleave of sources with finite lengths: while every source has elements left the
  order is grain's `MapDataset.mix` interleave; when one runs out the rest continue with their
  weights renormalised. Stateless and O(sources) per index (the phases are precomputed)."""

  def __init__(self, lengths: list[int], weights: list[float]):
    scale = MIX_RESOLUTION / min(weights)
    props = [max(1, int(round(w * scale))) for w in weights]
    remaining = list(lengths)
    self.phases = []   # (start, length, active source ids, their proportions, offsets)
    start = 0
    while any(remaining):
      act = [i for i, r in enumerate(remaining) if r > 0]
      p = tuple(props[i] for i in act)
      fits = lambda n: all(_interleave_count(n, p, j) <= remaining[i] for j, i in enumerate(act))
      n = min(remaining[i] * sum(p) // p[j] for j, i in enumerate(act))
      while n > 0 and not fits(n):
        n -= 1
      while fits(n + 1):
        n += 1
      offsets = [lengths[i] - remaining[i] for i in act]
      self.phases.append((start, n, act, p, offsets))
      for j, i in enumerate(act):
        remaining[i] -= _interleave_count(n, p, j)
      start += n
    self._len = start
    self._starts = [ph[0] for ph in self.phases]

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> tuple[int, int]:
    if not 0 <= index < self._len:
      raise IndexError(index)
    start, _, act, p, offsets = self.phases[int(np.searchsorted(self._starts, index, 'right')) - 1]
    k = index - start
    for j, i in enumerate(act):
      before = _interleave_count(k, p, j)
      if _interleave_count(k + 1, p, j) > before:
        return i, offsets[j] + before
    raise AssertionError('unreachable')

  def counts(self, k: int) -> list[int]:
    """Elements taken from each source among the first k of the mixture."""
    out = [0] * (max(i for ph in self.phases for i in ph[2]) + 1)
    for start, n, act, p, offsets in self.phases:
      if k <= start:
        break
      m = min(k - start, n)
      for j, i in enumerate(act):
        out[i] = offsets[j] + _interleave_count(m, p, j)
    return out


def _segments(inputs_BL: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids (documents within a row, from 1) and positions within them."""
  B, L = inputs_BL.shape
  eod = inputs_BL == eod_id
  segment_ids = 1 + np.cumsum(eod, axis=1) - eod
  boundary = np.ones((B, L), bool)
  boundary[:, 1:] = eod[:, :-1]
  t = np.broadcast_to(np.arange(L), (B, L))
  positions = t - np.maximum.accumulate(np.where(boundary, t, 0), axis=1)
  return segment_ids.astype(np.int32), positions.astype(np.int32)


def _to_batch(windows_i32: np.ndarray, eod_id: int = 0) -> dict:
  """int32[B, L+1] windows -> dict(inputs, targets, loss_mask, segment_ids, positions) [B, L]."""
  inputs = windows_i32[:, :-1]
  segment_ids, positions = _segments(inputs, eod_id)
  return {'inputs': inputs, 'targets': windows_i32[:, 1:],
          'loss_mask': np.ones(inputs.shape, np.float32),
          'segment_ids': segment_ids, 'positions': positions}


class TrainData:
  """The sources' windows, their mixture, and per-source progress metrics."""

  def __init__(self, sources: list[Source], *, seq_len: int, batch_size: int, seed: int,
               tokenizer_dir: str | None = None):
    """tokenizer_dir: the prepared directory whose tokenizer every source must share (default:
    the first source's)."""
    self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
    self.windows, eod_ids = [], set()
    ref_dir = tokenizer_dir or sources[0].dir
    ref = load_manifest(ref_dir)
    for s in sources:
      split = load_split(s.dir, 'train')
      if split.manifest.get('tokenizer_sha256') != ref.get('tokenizer_sha256'):
        raise DataError(f'{s.field}.dir: {s.dir} was tokenized with another tokenizer, '
                        f'{tokenizers.describe(split.manifest)}, not {tokenizers.describe(ref)} '
                        f'of {ref_dir}; prepare it again with --tokenizer={ref_dir}')
      eod_ids.add(split.manifest['eod_id'])
      w = SourceWindows(split, seq_len=seq_len, seed=seed, policy=s.variant_policy,
                        epochs=s.epochs or UNBOUNDED_EPOCHS, doc_fraction=s.doc_fraction,
                        salt=zlib.crc32(s.name.encode()))
      if len(w) == 0:
        raise DataError(f'{s.field}.dir: {s.dir} has fewer than seq_len+1 tokens')
      self.windows.append(w)
    self.eod_id = eod_ids.pop()
    self.mix = PhasedMix([len(w) for w in self.windows], [s.weight for s in sources])

  def metrics(self, num_batches: int) -> dict:
    """Per source after `num_batches` global batches: tokens, epoch, documents per variant."""
    out = {}
    for s, w, n in zip(self.sources, self.windows, self.mix.counts(num_batches * self.batch_size)):
      p = w.progress(n * self.seq_len)
      out[f'data/{s.name}/source_tokens'] = n * self.seq_len
      out[f'data/{s.name}/epoch'] = round(p['epoch'], 4)
      for v, c in enumerate(p['variant_docs']):
        out[f'data/{s.name}/variant{v}_docs'] = c
    return out


def train_data(sources: list[Source] | str, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               tokenizer_dir: str | None = None) -> tuple[grain.MapDataset, TrainData]:
  """Per-process training batches (process p gets rows [p*B:(p+1)*B] of each global batch,
  B = batch_size // process_count) and the TrainData behind them."""
  if seq_len < 1 or batch_size < 1:
    raise DataError(f'seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}')
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise DataError(f'batch_size {batch_size} / process {process_index} of {process_count}'
                    ' is not a valid sharding')
  if isinstance(sources, str):
    sources = [Source('main', sources)]
  data = TrainData(sources, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   tokenizer_dir=tokenizer_dir)
  parents = [grain.MapDataset.source(w) for w in data.windows]
  ds = grain.MapDataset.select_from_datasets(parents, data.mix)
  num_global_batches = len(ds) // batch_size
  if num_global_batches == 0:
    raise DataError(f'data: the sources hold fewer than one batch of {batch_size} windows')
  local_batch = batch_size // process_count
  ds = ds[:num_global_batches * batch_size]
  # Consecutive chunks of local_batch rows; process p owns chunks p, p+P, p+2P, ...
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  eod_id = data.eod_id
  return ds.map(lambda w: _to_batch(w, eod_id)), data


def train_dataset(data_dir: str, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Batches of one source (`data_dir`), repeated; see `train_data`."""
  return train_data(data_dir, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    process_index=process_index, process_count=process_count)[0]


class BatchIterator:
  """Iterates a MapDataset of batches, optionally prefetched by `workers` processes (grain
  `mp_prefetch`; 0 = in-process threads). The state is the index of the next batch,
  {'next_index': n} (grain's own state for an in-process iterator over a MapDataset): every batch
  is a pure function of its index, so a state resumes exactly whatever the number of workers.
  """

  def __init__(self, ds: grain.MapDataset, workers: int = 0):
    if not isinstance(workers, int) or workers < 0:
      raise DataError(f'data.workers: must be an integer >= 0, got {workers!r}')
    self._ds, self._workers, self._next, self._it = ds, workers, 0, None

  def _open(self):
    ds = self._ds[self._next:].to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    if self._workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app use defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:   # opened lazily: set_state right after creation starts no workers
      self._open()
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {'next_index': self._next}

  def set_state(self, state: dict):
    self.close()
    self._next = int(state['next_index'])

  def close(self):
    """Stops the prefetch threads/processes (also done at garbage collection)."""
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def train_iterator(ds: grain.MapDataset, workers: int = 0) -> BatchIterator:
  """Iterator over `ds`; get_state()/set_state() are JSON-serialisable (see BatchIterator)."""
  return BatchIterator(ds, workers)


def eval_batches(data_dir: str, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
  """Deterministic batches of the originals of 'val' in stored document order, no shuffling.

  Returns min(max_batches, batches in one pass over val) batches, at least one; a val split
  shorter than one batch wraps around.
  """
  if seq_len < 1 or batch_size < 1 or max_batches < 1:
    raise DataError('seq_len, batch_size and max_batches must be >= 1')
  split = load_split(data_dir, 'val')
  # Enough passes for one full batch even if val is a single token.
  windows = SourceWindows(split, seq_len=seq_len, seed=0, shuffle=False,
                          epochs=batch_size * (seq_len + 1) + 1)
  epoch_tokens = int(windows.epoch_lens[0])
  num_batches = max(1, min(max_batches, (epoch_tokens - 1) // seq_len // batch_size))
  eod_id = split.manifest['eod_id']
  ds = grain.MapDataset.source(windows).batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda w: _to_batch(w, eod_id))
  return [ds[i] for i in range(num_batches)]
