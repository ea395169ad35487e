"""moejax's own datatrove pipeline steps: the stages of `moejax.data.prepare` between datatrove's
readers/filters/MinHash steps.

Every stage reads and writes files in one work folder (any fsspec URL), named so that a task
killed at any moment and run again writes the same bytes:

    tokenizer/                    the tokenizer (trained by TrainTokenizer or copied from --tokenizer)
    tok/{t:05d}.tokens            task t's token ids (each record's ids + EOD), raw, in record order
    meta/{p:05d}/{t:05d}.jsonl    [id, variant, rec, offset, length, orig, val key] of task t's records
                                  whose document hashes to partition p (orig: index among t's
                                  originals, -1 for a rephrasing)
    sig/bucket_{b:03d}/{t:05d}.minhash.sig   dedup signatures of t's originals (datatrove's format)
    dups/, remove/{t:06d}.remove  datatrove's MinHash stages 2 and 3 (originals of t to drop)
    shards/{p:05d}.json           what partition p wrote
    final/                        the prepared directory; the last step moves it to --out

Task t reads raw file t. A document is the records with one id (its variants); it lives in
partition hash(id) % P, where WriteShards joins its variants, drops it if dedup removed its
original, sends it to val when hash(seed, id) < val_fraction, and writes it whole into one shard.
"""
import collections
import dataclasses
import hashlib
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from moejax.data import sources, tokenizer as tokenizers
from moejax.data.sources import ORIGINAL, SourceError

FORMAT_VERSION = 3
EXACT_SPLIT_DOCS = 10_000        # partitions with fewer documents hold out an exact count
TOKENIZE_BATCH_CHARS = 4 << 20   # texts per encode_batch call (bounded memory, full batches)
OPEN_TOKEN_FILES = 64            # token files WriteShards keeps open at once


class PrepareError(Exception):
  """A user-facing problem with the inputs; reported as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the stages need to know (the same on every task and machine)."""
  files: tuple[str, ...]          # raw file URLs; task t reads files[t]
  read: sources.ReadOptions
  work: str                       # the work folder (URL)
  out: str                        # --out (URL)
  num_partitions: int
  dedup: str                      # exact | minhash | none
  seed: int
  val_fraction: float
  shard_tokens: int
  vocab_size: int                 # for a trained BPE
  tokenizer_sample_bytes: int
  manifest: dict                  # fields the manifest copies (args, raw_sha256, inputs, fingerprint)


def _h64(data: str, person: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8, person=person).digest(), 'little')


def val_key(plan: Plan, doc_id: str) -> float:
  """A document's uniform [0, 1) split key: in val iff below val_fraction (seeded, per document:
  adding documents never moves another one across the split)."""
  return _h64(f'{plan.seed}\0{doc_id}', b'moejax-split') / 2.0**64


def val_flags(plan: Plan, keys) -> list[bool]:
  """Which of a partition's documents (in stored order; `keys`: their val_key) go to val. Below EXACT_SPLIT_DOCS an exact
  count, round(val_fraction * n) (at least 1, at most n - 1), chosen by a permutation seeded with
  --seed, as small corpora need; above, each document by its own key (val_key), which needs no
  count and never moves a document when others are added."""
  n = len(keys)
  if n < 2:
    return [False] * n
  if n < EXACT_SPLIT_DOCS:
    num_val = min(max(1, round(plan.val_fraction * n)), n - 1)
    flags = np.zeros(n, bool)
    flags[np.random.default_rng(plan.seed).permutation(n)[:num_val]] = True
    return flags.tolist()
  keys = np.asarray(keys)
  flags = (keys < plan.val_fraction).tolist()
  if not any(flags):
    flags[int(np.argmin(keys))] = True
  if all(flags):
    flags[int(np.argmax(keys))] = False
  return flags


def partition(plan: Plan, doc_id: str) -> int:
  return _h64(doc_id, b'moejax-part') % plan.num_partitions


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def load_tokenizer(work) -> tuple:
  """(tokenizer, its info) saved in the work folder's tokenizer/."""
  work = get_datafolder(work)
  info = json.loads(work.open('tokenizer/manifest.json', 'rt').read())
  if work.is_local():
    return tokenizers.from_prepared(Path(work.path) / 'tokenizer', info), info
  with tempfile.TemporaryDirectory() as tmp:   # tokenizers and tiktoken read local files
    for name in work.list_files('tokenizer'):
      (Path(tmp) / Path(name).name).write_bytes(work.open(name, 'rb').read())
    return tokenizers.from_prepared(tmp, info), info


def save_tokenizer(work, tok):
  work = get_datafolder(work)
  with tempfile.TemporaryDirectory() as tmp:
    tok.save(Path(tmp))
    for f in Path(tmp).iterdir():
      with work.open(f'tokenizer/{f.name}', 'wb') as out:
        out.write(f.read_bytes())
  with work.open('tokenizer/manifest.json', 'wt') as f:
    json.dump({'tokenizer': tok.info, 'tokenizer_sha256': tok.info['sha256']}, f)


class RawReader(PipelineStep):
  """Reads raw file `rank` (of world_size tasks: files rank, rank+world_size, ...) into datatrove
  Documents with metadata variant, task and rec (the record's index in the task)."""
  name = 'moejax raw files'
  type = '📖 - READER'

  def __init__(self, plan: Plan):
    super().__init__()
    self.plan = plan

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    for t in range(rank, len(self.plan.files), world_size):
      bad = []
      for rec, r in enumerate(sources.records(self.plan.files[t], self.plan.read, bad)):
        self.stat_update('records')
        yield Document(text=r.text, id=r.id, metadata={'variant': r.variant, 'task': t, 'rec': rec})
      if bad:
        self.stat_update('bad_records', value=len(bad))


class TrainTokenizer(PipelineStep):
  """Trains the byte-level BPE (one task) on train text, every variant of each document.

  A corpus within the sample budget is read whole: documents joined by id, exact duplicates
  dropped (first kept), split as WriteShards splits one partition (val_flags), and the BPE trained
  on the train documents in stored order -- the text the shards' train split holds (with exact
  dedup and no MinHash). A larger corpus gives its first `tokenizer_sample_bytes` of text, in file
  order, of documents whose split key puts them on the train side."""
  name = 'moejax train tokenizer'
  type = '🔢 - TOKENIZER'

  def __init__(self, plan: Plan):
    super().__init__()
    self.plan = plan

  def run(self, data, rank: int = 0, world_size: int = 1):
    plan = self.plan
    if plan.manifest['raw_bytes'] <= plan.tokenizer_sample_bytes:
      texts = self._whole_corpus_train_texts(data)
    else:
      texts = self._sample(data, plan.tokenizer_sample_bytes)
    save_tokenizer(plan.work, tokenizers.train_bpe(texts, plan.vocab_size))
    return iter(())

  def _whole_corpus_train_texts(self, data) -> list[str]:
    docs: dict[str, dict] = {}
    for doc in data:
      variants = docs.setdefault(doc.id, {})
      variants[doc.metadata['variant']] = doc.text
    seen, kept = set(), []
    for doc_id, variants in docs.items():
      if ORIGINAL in variants:
        key = hashlib.sha256(variants[ORIGINAL].encode()).digest()
        if key in seen:
          continue
        seen.add(key)
      kept.append(doc_id)
    texts = []
    for doc_id, val in zip(kept, val_flags(self.plan, [val_key(self.plan, d) for d in kept])):
      if not val:
        v = docs[doc_id]
        texts += ([v[ORIGINAL]] if ORIGINAL in v else []) + [t for n, t in v.items() if n != ORIGINAL]
    return texts

  def _sample(self, data, budget: int):
    for doc in data:
      if budget <= 0:
        return
      if val_key(self.plan, doc.id) >= self.plan.val_fraction:
        budget -= len(doc.text.encode())
        yield doc.text


class _SimplifiedWords:
  """MinHash's word splitter: the text it gets is datatrove's simplify_text (lower case, no
  punctuation, single spaces), so splitting on spaces gives the words; datatrove's English default
  (spaCy) finds nearly the same ones about 20x slower."""

  def word_tokenize(self, text: str) -> list[str]:
    return text.split()


class _Signatures:
  """Writes dedup signatures of one task's originals in datatrove's MinHash stage-1 format, so
  that datatrove's bucket and cluster stages find the duplicates. Exact dedup is the same machinery
  with one bucket holding the content's hash (2 x 61 bits: no false matches in practice)."""

  def __init__(self, plan: Plan, rank: int):
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    self.method, self.rank = plan.dedup, rank
    self.step = MinhashDedupSignature(f'{plan.work}/sig', config=dedup_config(plan.dedup),
                                      skip_existing_sigs=True)
    self.step.word_tokenizer = _SimplifiedWords()
    cfg = self.step.config
    self.fmt = f'<{cfg.hashes_per_bucket}{cfg.hash_config.struct_format}I'
    self.files = [self.step.output_folder.open(f'bucket_{b:03d}/{rank:05d}.minhash.sig', 'wb')
                  for b in range(cfg.num_buckets)]

  def add(self, orig_idx: int, text: str):
    if self.method == 'exact':
      digest = hashlib.sha256(text.encode()).digest()
      m = (1 << 61) - 1   # datatrove reads 64-bit signatures below the Mersenne prime 2^61-1
      sig = [[int.from_bytes(digest[:8], 'little') % m, int.from_bytes(digest[8:16], 'little') % m]]
    else:
      shingles = self.step.get_shingles(text)
      if not shingles.size:   # fewer words than an n-gram: no signature, never a duplicate
        return
      sig = self.step.get_signature(shingles)
    for f, bucket_sig in zip(self.files, sig):
      f.write(struct.pack(self.fmt, *bucket_sig, orig_idx))

  def close(self, world_size: int):
    for f in self.files:
      f.close()
    self.step.run(iter(()), self.rank, world_size)   # existing files: datatrove only sorts them


def dedup_config(method: str):
  from datatrove.pipeline.dedup.minhash import MinhashConfig
  from datatrove.utils.hashing import HashConfig
  if method == 'exact':
    return MinhashConfig(num_buckets=1, hashes_per_bucket=2, hash_config=HashConfig(precision=64))
  return MinhashConfig()   # datatrove's (FineWeb's) defaults: 5-grams, 14 buckets x 8 hashes


class TokenizeRecords(PipelineStep):
  """Tokenizes every record (+ EOD) into tok/{t}.tokens, indexes it in meta/{p}/{t}.jsonl and
  signs the originals for dedup. Terminal step of the tokenize stage."""
  name = 'moejax tokenize'
  type = '🔢 - TOKENIZER'

  def __init__(self, plan: Plan):
    super().__init__()
    self.plan = plan

  def run(self, data, rank: int = 0, world_size: int = 1):
    import orjson
    plan, work = self.plan, get_datafolder(self.plan.work)
    tok, _ = load_tokenizer(work)
    dtype = token_dtype(tok.vocab_size)
    signer = _Signatures(plan, rank) if plan.dedup != 'none' else None
    metas, offset, num_orig = {}, 0, 0
    batch, chars = [], 0
    with work.open(f'tok/{rank:05d}.tokens', 'wb') as tokens_f:
      def flush():
        nonlocal offset, num_orig
        for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
          arr = np.asarray(ids + [tok.eod_id], dtype=dtype)
          tokens_f.write(arr.tobytes())
          orig = -1
          if doc.metadata['variant'] == ORIGINAL:
            orig, num_orig = num_orig, num_orig + 1
            if signer:
              signer.add(orig, doc.text)
          p = partition(plan, doc.id)
          if p not in metas:
            metas[p] = work.open(f'meta/{p:05d}/{rank:05d}.jsonl', 'wb')
          metas[p].write(orjson.dumps([doc.id, doc.metadata['variant'], doc.metadata['rec'],
                                       offset, len(arr), orig, val_key(plan, doc.id)]) + b'\n')
          offset += len(arr)
          self.stat_update('tokens', value=len(arr))
        batch.clear()

      for doc in data:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= TOKENIZE_BATCH_CHARS:
          flush()
          chars = 0
      flush()
    for f in metas.values():
      f.close()
    if signer:
      signer.close(world_size)
    return iter(())


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
          for field, v in zip(self.FIELDS, (_h64(doc_id, b'moejax-doc') - 2**63, t, rec, offset, length,
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
            if _h64(doc_id, b'moejax-doc') - 2**63 == key:
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


def _count(v) -> int:
  return int(v['total'] if isinstance(v, dict) else v)


class Finish(PipelineStep):
  """Writes manifest.json (shards, counts, filter and dedup drops) and the tokenizer into final/,
  then puts final/ at --out (a previous --out is replaced only now, by a finished one)."""
  name = 'moejax manifest'
  type = '💽 - WRITER'

  def __init__(self, plan: Plan, filters: tuple[str, ...]):
    super().__init__()
    self.plan, self.filters = plan, filters

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    plan, work = self.plan, get_datafolder(self.plan.work)
    if not work.exists('final/manifest.json') and finished(plan):   # moved before a kill
      return iter(())
    parts = [json.loads(work.open(f'shards/{p:05d}.json', 'rt').read())
             for p in range(plan.num_partitions)]
    splits = {}
    for split in ('train', 'val'):
      shards = [s for part in parts for s in part['splits'][split]]
      splits[split] = {k: sum(s[k] for s in shards)
                       for k in ('num_docs', 'num_entries', 'num_tokens', 'num_original_tokens')}
      splits[split]['shards'] = shards
    num_docs = sum(s['num_docs'] for s in splits.values())
    if not splits['train']['num_docs'] or not splits['val']['num_docs']:
      raise PrepareError(f"inputs {','.join(plan.manifest['inputs'])} are empty or hold fewer than "
                         f'2 documents ({num_docs} documents after filters and dedup)')
    tok, info = load_tokenizer(work)
    for name in work.list_files('tokenizer'):
      if not name.endswith('manifest.json'):
        with work.open(f'final/{Path(name).name}', 'wb') as f:
          f.write(work.open(name, 'rb').read())
    filters, bad_records = self._filter_stats(work)
    merged = lambda key: dict(sum((collections.Counter(p[key]) for p in parts), collections.Counter()))
    removed = sum(p['docs_removed'] for p in parts)
    manifest = {
        'format_version': FORMAT_VERSION, **plan.manifest,
        'tokenizer': info['tokenizer'], 'tokenizer_sha256': info['tokenizer_sha256'],
        'vocab_size': tok.vocab_size, 'eod_id': tok.eod_id,
        'token_dtype': token_dtype(tok.vocab_size).name,
        'duplicate_docs_removed': removed,
        'dedup': {'method': plan.dedup, 'docs_removed': removed},
        'filters': filters, 'bad_records_skipped': bad_records,
        'variants': {'names': merged('variant_names'),
                     'docs_with_n_variants': dict(sorted(merged('docs_with_n_variants').items()))},
        'files': {f'{s["name"]}.{suffix}.npy': work.size(f'final/{s["name"]}.{suffix}.npy')
                  for split in splits.values() for s in split['shards']
                  for suffix in ('tokens', 'docs', 'variants')},
        'splits': splits}
    with work.open('final/manifest.json', 'wt') as f:
      f.write(json.dumps(manifest, indent=2) + '\n')
    put_in_place(work, plan.out)
    return iter(())

  def _filter_stats(self, work) -> tuple[dict, int]:
    """Documents each filter dropped (with datatrove's reasons) and malformed records skipped,
    from the tokenize stage's task stats."""
    filters = {name: {'dropped': 0} for name in self.filters}
    bad = 0
    for name in work.list_files('logs/tokenize/stats', glob_pattern='*.json'):
      steps = json.loads(work.open(name, 'rt').read())
      bad += _count(steps[0]['stats'].get('bad_records', 0))
      for fname, step in zip(self.filters, steps[1:]):
        for key, value in step['stats'].items():
          if key not in ('total', 'forwarded'):
            filters[fname][key] = filters[fname].get(key, 0) + _count(value)
    return filters, bad


def finished(plan: Plan) -> bool:
  """Whether --out already holds what this plan makes (same inputs, arguments and code)."""
  try:
    fs, path = _fs(plan.out)
    with fs.open(f'{path}/manifest.json', 'rt') as f:
      return json.load(f).get('fingerprint') == plan.manifest['fingerprint']
  except (OSError, ValueError):
    return False


def _fs(url: str):
  import fsspec
  return fsspec.core.url_to_fs(url)


def put_in_place(work, out_url: str):
  """final/ becomes --out: local directories are swapped by rename (the previous one removed
  afterwards); other file systems move the tree."""
  fs, out = _fs(out_url)
  final = f'{work.path}/final'
  if work.is_local():
    import shutil
    out_path, trash = Path(out), Path(work.path) / 'trash'
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
      trash.mkdir(exist_ok=True)
      out_path.rename(trash / 'previous')
    Path(final).rename(out_path)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    if fs.exists(out):
      fs.rm(out, recursive=True)
    work.fs.mv(final, out, recursive=True)
