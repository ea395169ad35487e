"""The write_shards stage (one task per partition of documents): joins each document's variants
from the tokenize stage's index, drops the documents dedup removed, splits train/val by document,
and copies their tokens into shards under final/ (work folder layout: moejax.data.steps)."""
import collections
import io
import json
from pathlib import Path

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from moejax.data.sources import ORIGINAL, SourceError
from moejax.data.steps import Plan, h64, load_tokenizer, token_dtype, val_flags

OPEN_TOKEN_FILES = 64            # token files WriteShards keeps open at once


def _write_npy_header(f, dtype: np.dtype, n: int):
  np.lib.format.write_array_header_1_0(
      f, {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': (n,)})


class _Records:
  """A partition's records as columns (8 bytes a field, no object per record: the shard writer's
  memory is a few dozen bytes per record, bounded by the partition's size)."""
  FIELDS = ('key', 't', 'rec', 'offset', 'length', 'orig', 'variant', 'split_key')

  def __init__(self, work, plan: Plan, p: int):
    import array
    import orjson
    cols = {f: array.array('d' if f == 'split_key' else 'q') for f in self.FIELDS}
    self.variant_names = [ORIGINAL]   # code -> name; the original is 0
    codes = {ORIGINAL: 0}
    for t in range(len(plan.files)):
      name = f'meta/{p:05d}/{t:05d}.jsonl'
      if not work.exists(name):
        continue
      with work.open(name, 'rb') as f:
        for line in f:
          doc_id, variant, rec, offset, length, orig, split_key = orjson.loads(line)
          if variant not in codes:
            codes[variant] = len(self.variant_names)
            self.variant_names.append(variant)
          for field, v in zip(self.FIELDS, (h64(doc_id, b'moejax-doc') - 2**63, t, rec, offset, length,
                                            orig, codes[variant], split_key)):
            cols[field].append(v)
    for field, col in cols.items():
      setattr(self, field, np.frombuffer(col, dtype=np.float64 if field == 'split_key' else np.int64))


class WriteShards(PipelineStep):
  """Partition p: joins each document's variants, drops deduplicated ones, splits train/val by
  document, and writes shards of about shard_tokens tokens (whole documents) under final/."""
  name = 'moejax write shards'
  type = '💽 - WRITER'

  def __init__(self, plan: Plan):
    super().__init__()
    self.plan = plan

  def _removed(self, work) -> dict[int, np.ndarray]:
    out = {}
    if self.plan.dedup != 'none':
      for name in work.list_files('remove', glob_pattern='*.remove'):
        out[int(Path(name).stem)] = np.frombuffer(work.open(name, 'rb').read(), dtype='<u4').astype(np.int64)
    return out

  def _doc_id(self, work, p: int, key: int) -> str:
    """The id behind a join key (only to name it in an error)."""
    import orjson
    for t in range(len(self.plan.files)):
      name = f'meta/{p:05d}/{t:05d}.jsonl'
      if work.exists(name):
        with work.open(name, 'rb') as f:
          for line in f:
            doc_id = orjson.loads(line)[0]
            if h64(doc_id, b'moejax-doc') - 2**63 == key:
              return doc_id
    return '?'

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    plan, work = self.plan, get_datafolder(self.plan.work)
    tok, _ = load_tokenizer(work)
    dtype = token_dtype(tok.vocab_size)
    r = _Records(work, plan, rank)
    # records of one document next to each other, each document's in first-seen order
    order = np.lexsort((r.rec, r.t, r.key))
    key = r.key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    doc_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(key)]))   # per sorted record
    var = r.variant[order]
    by_variant = np.lexsort((r.variant, r.key))
    same = np.flatnonzero((r.key[by_variant][1:] == r.key[by_variant][:-1])
                          & (r.variant[by_variant][1:] == r.variant[by_variant][:-1]))
    if len(same):
      i = by_variant[same[0] + 1]
      raise SourceError(f'{plan.files[r.t[i]]}: document {self._doc_id(work, rank, int(r.key[i]))!r} '
                        f'already has variant {r.variant_names[r.variant[i]]!r}')
    # a document is removed when dedup removed its original
    removed = self._removed(work)   # one lookup of (task, original index) pairs, not one pass per task
    removed_keys = np.concatenate([(t << 32) | idx for t, idx in removed.items()] or [np.zeros(0, np.int64)])
    removed_rec = (var == 0) & np.isin((r.t[order] << 32) | r.orig[order], removed_keys)
    removed_doc = np.bincount(doc_of, weights=removed_rec, minlength=len(starts)) > 0
    kept = np.flatnonzero(~removed_doc)
    first = order[starts[kept]]                                 # each kept doc's first record
    kept = kept[np.lexsort((r.rec[first], r.t[first]))]          # documents in first-seen order
    is_val = np.array(val_flags(plan, r.split_key[order[starts[kept]]]), bool)
    rank_of = np.full(len(starts), -1)
    rank_of[kept] = np.arange(len(kept))
    stats = {'docs_removed': int(removed_doc.sum()), 'splits': {}, 'variant_names': collections.Counter(),
             'docs_with_n_variants': collections.Counter()}
    readers = _TokenReaders(work)
    for split, flag in (('train', False), ('val', True)):
      docs = kept[is_val == flag]
      stats['splits'][split] = self._write_split(work, readers, r, order, doc_of, rank_of, docs,
                                                 f'{split}/{rank:05d}', dtype, stats)
    readers.close()
    stats['variant_names'] = dict(stats['variant_names'])
    stats['docs_with_n_variants'] = {str(k): v for k, v in sorted(stats['docs_with_n_variants'].items())}
    with work.open(f'shards/{rank:05d}.json', 'wt') as f:
      json.dump(stats, f)
    return iter(())

  def _write_split(self, work, readers, r, order, doc_of, rank_of, docs, prefix, dtype, stats):
    """Writes the documents `docs` (in that order), each as its entries: the original first, then
    its rephrasings in first-seen order."""
    in_split = np.isin(doc_of, docs)
    recs = order[in_split]
    doc_rank = rank_of[doc_of[in_split]]
    entries = recs[np.lexsort((r.rec[recs], r.t[recs], r.variant[recs] != 0, doc_rank))]
    sizes = np.unique(doc_rank, return_counts=True)[1]   # entries per document, in document order
    bounds = np.r_[0, np.cumsum(sizes)]
    doc_tokens = np.add.reduceat(r.length[entries], bounds[:-1]) if len(sizes) else sizes
    for d in range(len(sizes)):
      names = [r.variant_names[v] for v in r.variant[entries[bounds[d]:bounds[d + 1]]]]
      if names[0] != ORIGINAL:   # seen only as rephrasings: the first stands as the original
        names[0] = f'{names[0]} (as original)'
      stats['variant_names'].update(names)
      stats['docs_with_n_variants'][len(names)] += 1
    shards, start, ntok = [], 0, 0
    for d in range(len(sizes)):   # cut after the document that reaches shard_tokens
      ntok += int(doc_tokens[d])
      if ntok >= self.plan.shard_tokens or d == len(sizes) - 1:
        shards.append((start, d + 1))
        start, ntok = d + 1, 0
    return [self._write_shard(work, readers, f'{prefix}-{k:05d}', r, entries[bounds[a]:bounds[b]],
                              sizes[a:b], dtype) for k, (a, b) in enumerate(shards)]

  def _write_shard(self, work, readers, name, r, entries, sizes, dtype) -> dict:
    lengths = r.length[entries]
    offsets_i64 = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets_i64[1:])
    variants_i64 = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=variants_i64[1:])
    with work.open(f'final/{name}.tokens.npy', 'wb') as f:
      _write_npy_header(f, dtype, int(offsets_i64[-1]))
      for i in entries:
        f.write(readers.read(int(r.t[i]), int(r.offset[i]) * dtype.itemsize, int(r.length[i]) * dtype.itemsize))
    for suffix, arr in (('docs', offsets_i64), ('variants', variants_i64)):
      buf = io.BytesIO()
      np.save(buf, arr)
      with work.open(f'final/{name}.{suffix}.npy', 'wb') as f:
        f.write(buf.getvalue())
    first = offsets_i64[variants_i64[:-1]]
    return {'name': name, 'num_docs': len(sizes), 'num_entries': len(lengths),
            'num_tokens': int(offsets_i64[-1]),
            'num_original_tokens': int((offsets_i64[variants_i64[:-1] + 1] - first).sum())}


class _TokenReaders:
  """Positioned reads from the tasks' token files (a bounded set kept open)."""

  def __init__(self, work):
    self.work, self.open_files = work, collections.OrderedDict()

  def read(self, t: int, start: int, size: int) -> bytes:
    f = self.open_files.pop(t, None)
    if f is None:
      f = self.work.open(f'tok/{t:05d}.tokens', 'rb')
      if len(self.open_files) >= OPEN_TOKEN_FILES:
        self.open_files.popitem(last=False)[1].close()
    self.open_files[t] = f
    f.seek(start)
    data = f.read(size)
    if len(data) != size:
      raise OSError(f'tok/{t:05d}.tokens: short read (work folder damaged; delete it and rerun)')
    return data

  def close(self):
    for f in self.open_files.values():
      f.close()
