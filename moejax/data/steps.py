"""moejax's own datatrove pipeline steps: the plan every stage shares, its hashing and tokenizer
helpers, and the steps up to MinHash (RawReader, TrainTokenizer, TokenizeRecords). The later
stages, WriteShards (moejax.data.shard_writer) and Finish (moejax.data.finish), build on this.

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
import dataclasses
import hashlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from moejax.data import sources, tokenizer as tokenizers
from moejax.data.sources import ORIGINAL

FORMAT_VERSION = 3
EXACT_SPLIT_DOCS = 10_000        # partitions with fewer documents hold out an exact count
TOKENIZE_BATCH_CHARS = 4 << 20   # texts per encode_batch call (bounded memory, full batches)


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


def h64(data: str, person: bytes) -> int:
  """A keyed 64-bit hash (`person` names its use: partition, split key, join key)."""
  return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8, person=person).digest(), 'little')


def val_key(plan: Plan, doc_id: str) -> float:
  """A document's uniform [0, 1) split key: in val iff below val_fraction (seeded, per document:
  adding documents never moves another one across the split)."""
  return h64(f'{plan.seed}\0{doc_id}', b'moejax-split') / 2.0**64


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
  return h64(doc_id, b'moejax-part') % plan.num_partitions


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
