"""Training/eval input pipeline over prepared sources (see moejax.data.prepare), on grain.MapDataset.

Per source, epoch e reads every document once, in an order shuffled with a seed derived from
(seed, source, e), each as the variant its policy picks (`original`: variant 0; `cycle`: variant
e mod n_variants; `random`: a seeded choice per document and epoch); the epochs follow each other
in one stream, cut into windows of seq_len+1 tokens with stride seq_len (every token is a target
exactly once; nothing is dropped at epoch ends), and the stream stops after `epochs` epochs.
A scored source (moejax.data.scoring) may keep only documents graded at least `min_score` and read
each grade `score_weights` times per epoch (moejax.data.score_mix; copy j of a document read k
times reads, under `cycle`, its (e*k + j)-th variant mod n_variants in epoch e).
Sources are mixed window by window with grain's deterministic weighted interleave; a source that
has spent its epoch budget drops out and the others go on with their weights renormalised
(`PhasedMix`), so the stream ends when every budget is spent.
Batches: dict(inputs, targets, loss_mask, segment_ids, positions) of shape [B, L]; segment ids
count documents within a row from 1 (an EOD token belongs to the document it ends), positions
restart at 0 at each document.

Reading the prepared shards is moejax.data.shards (whose DataError this module raises too); the
weighted mixture is moejax.data.mixture.
"""
import dataclasses
import zlib

import grain
import numpy as np

from moejax.data import score_mix, tokenizer as tokenizers
from moejax.data.mixture import PhasedMix
from moejax.data.shards import DataError, Split, load_manifest, load_split

POLICIES = ('original', 'cycle', 'random')
UNBOUNDED_EPOCHS = 1000   # epochs = 0 means "repeat": this many epochs


@dataclasses.dataclass(frozen=True)
class Source:
  """One prepared source in the training mixture (config: data.sources.<name>)."""
  name: str
  dir: str
  weight: float = 1.0
  epochs: int = 0               # 0 = repeat (UNBOUNDED_EPOCHS)
  variant_policy: str = 'original'
  doc_fraction: float = 1.0     # train on a seeded subset of this fraction of the documents
  min_score: float | None = None   # keep documents graded at least this (moejax.data.score_mix)
  score_weights: object = None  # {grade 0-5: weight} per-epoch reads by grade; normalized to [w0..w5]
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
    if self.min_score is not None and (isinstance(self.min_score, bool)
                                       or not isinstance(self.min_score, (int, float))):
      raise DataError(f'{field}.min_score: must be a number (grades are 0-5), got {self.min_score!r}')
    object.__setattr__(self, 'score_weights', score_mix.normalize_weights(self.score_weights, field))

  @property
  def scored(self) -> bool:
    """Whether this source reads its documents' scores (min_score or score_weights set)."""
    return self.min_score is not None or self.score_weights is not None


def sources_from_config(data_cfg) -> list[Source]:
  """`data.sources` (name -> dir/weight/epochs/variant_policy/doc_fraction), or by default one
  source `main` from data.dir with data.epochs / data.variant_policy."""
  specs = dict(data_cfg.get('sources') or {})
  if not specs:
    return [Source('main', data_cfg.dir, 1.0, data_cfg.get('epochs', 0),
                   data_cfg.get('variant_policy', 'original'), field='data')]
  out = []
  for name, s in sorted(specs.items()):
    s = {k: (v.to_dict() if hasattr(v, 'to_dict') else v) for k, v in dict(s).items()}
    settable = {f.name for f in dataclasses.fields(Source)} - {'name', 'field'}
    unknown = set(s) - settable
    if unknown:
      raise DataError(f'data.sources.{name}: unknown field(s) {sorted(unknown)}')
    if 'dir' not in s:
      raise DataError(f'data.sources.{name}.dir: missing')
    out.append(Source(name=name, **s))
  return out



class SourceWindows:
  """Random-access windows int32[seq_len+1] over one source's stream of epochs (see module doc)."""

  def __init__(self, split: Split, *, seq_len: int, seed: int, policy: str = 'original',
               epochs: int = 1, doc_fraction: float = 1.0, shuffle: bool = True, salt: int = 0,
               scores=None, min_score=None, score_weights=None, field: str = 'data', data_dir: str = ''):
    """scores: float32 [num_docs] of the split (moejax.data.scoring), needed by min_score /
    score_weights (moejax.data.score_mix); documents read with repeats then, each copy its own
    element of an epoch."""
    self._split, self._seq_len, self._policy, self._shuffle = split, seq_len, policy, shuffle
    self._seed = (seed, salt)
    self._entry_len = np.diff(split.offsets_i64)
    first_i64, self._num_variants = split.variants_i64[:-1], np.diff(split.variants_i64)
    num_docs = len(first_i64)
    docs = np.arange(num_docs)
    if doc_fraction < 1:
      k = max(1, round(doc_fraction * num_docs))
      docs = np.sort(np.random.default_rng([seed, salt, 7]).permutation(num_docs)[:k])
    copy = np.zeros(len(docs), np.int64)
    self.grades = None   # grade of each element of self.docs (scored sources)
    if scores is not None:
      if len(scores) != num_docs:
        raise DataError(f'{field}: {data_dir} has {len(scores)} scores for {num_docs} documents; '
                        'run judge score again')
      docs, copy = score_mix.select(docs, scores, min_score=min_score, weights=score_weights,
                                    seed=self._seed, field=field, data_dir=data_dir)
      self.grades = score_mix.grades(scores)[docs]
    self.docs = docs
    self._first = first_i64[docs]
    self._nvar = self._num_variants[docs]
    self._copy = copy
    _, counts = np.unique(docs, return_counts=True)   # docs is sorted: a document's copies are adjacent
    self._copies = np.repeat(counts, counts)
    self._bucket_epochs = {}
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
    if self._policy == 'cycle':   # copy j of a document read k times an epoch: its (e*k+j)-th variant
      return (epoch * self._copies + self._copy) % self._nvar
    return np.random.default_rng([*self._seed, epoch, 1]).integers(self._nvar)

  def epoch_entries(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry ids in read order, their variant indices, cumulative lengths [n+1]) of an epoch."""
    cached = self._cached  # one atomic read; safe under grain's reader threads
    if cached[0] == epoch:
      return cached[1]
    order = self._order(epoch)
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
    out = {'epoch': epoch + into / int(self.epoch_lens[epoch]), 'variant_docs': counts.tolist()}
    if self.grades is not None:
      out['grade_tokens'] = self._grade_tokens(epoch, into).tolist()
    return out

  def _grade_tokens(self, epoch: int, into: int) -> np.ndarray:
    """Tokens read per grade: whole epochs before `epoch`, then `into` tokens of it."""
    n = score_mix.NUM_GRADES
    total = np.zeros(n, np.int64)
    for e in range(epoch):
      if e not in self._bucket_epochs:
        lens = self._entry_len[self._first + self._variant(e)]
        self._bucket_epochs[e] = np.bincount(self.grades, weights=lens, minlength=n).astype(np.int64)
      total += self._bucket_epochs[e]
    entries, _, cum_i64 = self.epoch_entries(epoch)
    order_grades = self.grades[self._order(epoch)]
    done = int(np.searchsorted(cum_i64, into, side='right')) - 1   # elements read whole
    total += np.bincount(order_grades[:done], weights=np.diff(cum_i64[:done + 1]),
                         minlength=n).astype(np.int64)
    if done < len(entries):
      total[order_grades[done]] += into - int(cum_i64[done])
    return total

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.docs)
    return (np.random.default_rng([*self._seed, epoch]).permutation(n) if self._shuffle
            else np.arange(n))


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


def windows_to_batch(windows_i32: np.ndarray, eod_id: int = 0) -> dict:
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
      from moejax.data import scoring
      if s.scored:
        scores = scoring.load_scores(s.dir, 'train', f'{s.field}.{"min_score" if s.min_score is not None else "score_weights"}')
      else:   # scored but not filtered: read as before, the metrics count tokens per grade
        scores = scoring.current_scores(s.dir, 'train')
      w = SourceWindows(split, seq_len=seq_len, seed=seed, policy=s.variant_policy,
                        epochs=s.epochs or UNBOUNDED_EPOCHS, doc_fraction=s.doc_fraction,
                        salt=zlib.crc32(s.name.encode()), scores=scores, min_score=s.min_score,
                        score_weights=s.score_weights, field=s.field, data_dir=s.dir)
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
      for g, c in enumerate(p.get('grade_tokens', ())):
        out[f'data/{s.name}/grade{g}_tokens'] = c
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
  return ds.map(lambda w: windows_to_batch(w, eod_id)), data


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
  ds = ds.map(lambda w: windows_to_batch(w, eod_id))
  return [ds[i] for i in range(num_batches)]
