"""Splits stored as many shards (format 3): the same batches as one shard, lazily memory-mapped,
picklable for prefetch workers, and one-line errors naming the bad shard file."""

import json
import pickle
import random
import re
import shutil

import numpy as np
import pytest

from moejax.data import pipeline, shards

EOD, VOCAB = 0, 50
L, B = 16, 4


def make_docs(num_docs: int, seed: int, max_variants: int = 3) -> list[list[list[int]]]:
  """Documents, each a list of variants, each a list of token ids (no EOD, which is appended)."""
  rng = random.Random(seed)
  return [[[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 30))]
           for _ in range(rng.randint(1, max_variants))] for _ in range(num_docs)]


def _arrays(docs):
  entries = [v + [EOD] for d in docs for v in d]
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in entries])]).astype(np.int64)
  variants = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
  tokens = np.array([t for e in entries for t in e], np.uint16)
  return tokens, offsets, variants


def _stats(docs):
  tokens, offsets, variants = _arrays(docs)
  return {'num_docs': len(docs), 'num_entries': len(offsets) - 1, 'num_tokens': len(tokens),
          'num_original_tokens': int(np.diff(offsets)[variants[:-1]].sum())}


def write_prepared(out, splits: dict, shard_tokens: int | None = None, version: int = 3) -> str:
  """A prepared dir written by hand: `splits` maps a split to its documents; format 3 cuts each
  split into shards of about `shard_tokens` tokens (None: one shard), whole documents each;
  version 2 / 1 write today's top-level {split}.*.npy (1: no variants.npy, no `files`)."""
  out.mkdir(parents=True)
  files, split_stats = {}, {}
  for split, docs in splits.items():
    stats = _stats(docs)
    if version < 3:
      tokens, offsets, variants = _arrays(docs)
      np.save(out / f'{split}.tokens.npy', tokens)
      np.save(out / f'{split}.docs.npy', offsets)
      if version == 2:
        np.save(out / f'{split}.variants.npy', variants)
      split_stats[split] = stats
      continue
    shards, cur, size = [], [], 0
    for d in docs:
      cur.append(d)
      size += sum(len(v) + 1 for v in d)
      if shard_tokens is not None and size >= shard_tokens:
        shards.append(cur)
        cur, size = [], 0
    if cur:
      shards.append(cur)
    (out / split).mkdir()
    stats['shards'] = []
    for i, shard in enumerate(shards):
      name = f'{split}/00000-{i:05d}'
      for kind, a in zip(('tokens', 'docs', 'variants'), _arrays(shard)):
        np.save(out / f'{name}.{kind}.npy', a)
      s = _stats(shard)
      stats['shards'].append({'name': name, 'num_docs': s['num_docs'],
                              'num_entries': s['num_entries'], 'num_tokens': s['num_tokens']})
    split_stats[split] = stats
  if version >= 2:
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob('*.npy'))}
  manifest = {'eod_id': EOD, 'vocab_size': VOCAB, 'token_dtype': 'uint16',
              'tokenizer': {'kind': 'bpe', 'sha256': 'fake'}, 'tokenizer_sha256': 'fake',
              'splits': split_stats}
  if version >= 2:
    manifest['files'] = files
  if version == 3:
    manifest['format_version'] = 3
  else:
    manifest['args'] = {'format_version': version}
  (out / 'manifest.json').write_text(json.dumps(manifest, indent=2))
  return str(out)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('shards')
  splits = {'train': make_docs(40, 0), 'val': make_docs(9, 1)}
  out = {'docs': splits,
         'one': write_prepared(root / 'one', splits),
         'many': write_prepared(root / 'many', splits, shard_tokens=120),
         'six': write_prepared(root / 'six', splits, shard_tokens=sum(
             sum(len(v) + 1 for v in d) for d in splits['train']) // 6 + 1),
         'legacy': write_prepared(root / 'legacy', splits, version=2)}
  one_variant = {k: [d[:1] for d in v] for k, v in splits.items()}
  out['v1'] = write_prepared(root / 'v1', one_variant, version=1)
  out['v1_as_v3'] = write_prepared(root / 'v1_as_v3', one_variant, shard_tokens=100)
  return out


def num_shards(d, split='train') -> int:
  return len(shards.load_manifest(d)['splits'][split]['shards'])


def all_batches(d, seed, **kw):
  ds = pipeline.train_data([pipeline.Source('s', d, **kw)], seq_len=L, batch_size=B, seed=seed)[0]
  return [ds[i] for i in range(len(ds))]


def assert_same(xs, ys):
  assert len(xs) == len(ys) and len(xs) > 0
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_helper_cuts_whole_documents_into_several_shards(dirs):
  assert num_shards(dirs['one']) == 1 and num_shards(dirs['many']) >= 3 and num_shards(dirs['six']) == 6
  assert num_shards(dirs['many'], 'val') >= 2
  entries = [np.array(v + [EOD]) for d in dirs['docs']['train'] for v in d]
  for d in ('one', 'many', 'six', 'legacy'):
    got = shards.split_entries(dirs[d], 'train')
    assert len(got) == len(entries) and all(np.array_equal(a, b) for a, b in zip(got, entries))


@pytest.mark.parametrize('policy', pipeline.POLICIES)
def test_many_shards_give_the_batches_of_one_shard(dirs, policy):
  for seed in (0, 1, 5):
    for epochs in (1, 3):
      assert_same(all_batches(dirs['many'], seed, epochs=epochs, variant_policy=policy),
                  all_batches(dirs['one'], seed, epochs=epochs, variant_policy=policy))
  many, one = (shards.load_split(dirs[k], 'train') for k in ('many', 'one'))
  np.testing.assert_array_equal(many.offsets_i64, one.offsets_i64)
  np.testing.assert_array_equal(many.variants_i64, one.variants_i64)
  assert len(many.tokens) == len(one.tokens) and many.tokens.dtype == np.uint16
  w = [pipeline.SourceWindows(shards.load_split(dirs[k], 'train'), seq_len=L, seed=2, policy=policy,
                              epochs=2, doc_fraction=0.5) for k in ('many', 'one')]
  assert len(w[0]) == len(w[1])
  for i in range(len(w[0])):
    np.testing.assert_array_equal(w[0][i], w[1][i])
  assert w[0].progress(200) == w[1].progress(200)


def test_mixture_and_process_sharding_over_many_shards_match_one_shard(dirs):
  def run(d, p):
    srcs = [pipeline.Source('a', d, weight=2.0, epochs=2, variant_policy='random'),
            pipeline.Source('b', dirs['six'], weight=1.0, epochs=1, variant_policy='cycle')]
    ds, data = pipeline.train_data(srcs, seq_len=L, batch_size=B, seed=3, process_index=p, process_count=2)
    return [ds[i] for i in range(len(ds))], data.metrics(5)
  for p in (0, 1):
    (xs, mx), (ys, my) = run(dirs['many'], p), run(dirs['one'], p)
    assert_same(xs, ys)
    assert mx == my


def test_eval_batches_over_many_val_shards_match_one_shard(dirs):
  for max_batches in (1, 3, 100):
    assert_same(pipeline.eval_batches(dirs['many'], seq_len=L, batch_size=B, max_batches=max_batches),
                pipeline.eval_batches(dirs['one'], seq_len=L, batch_size=B, max_batches=max_batches))
  # stored order: the first row starts with the first val document's original
  first = pipeline.eval_batches(dirs['many'], seq_len=L, batch_size=1, max_batches=1)[0]
  doc0 = dirs['docs']['val'][0][0] + [EOD]
  n = min(L, len(doc0))
  np.testing.assert_array_equal(first['inputs'][0, :n], doc0[:n])


def test_legacy_layouts_still_load_and_match_format_3(dirs):
  for policy in ('original', 'cycle', 'random'):
    assert_same(all_batches(dirs['legacy'], 4, epochs=2, variant_policy=policy),
                all_batches(dirs['many'], 4, epochs=2, variant_policy=policy))
  assert_same(pipeline.eval_batches(dirs['legacy'], seq_len=L, batch_size=B, max_batches=3),
              pipeline.eval_batches(dirs['many'], seq_len=L, batch_size=B, max_batches=3))
  # format 1: no variants.npy, every entry its own document
  assert_same(all_batches(dirs['v1'], 0, epochs=2), all_batches(dirs['v1_as_v3'], 0, epochs=2))
  s = shards.load_split(dirs['v1'], 'train')
  np.testing.assert_array_equal(s.variants_i64, np.arange(len(s.offsets_i64)))


def test_shards_are_opened_lazily_and_at_most_the_cap_stay_open(dirs, monkeypatch):
  expected = all_batches(dirs['one'], 7, epochs=2, variant_policy='random')
  opened = []
  np_load = np.load

  def spy(path, *a, **kw):
    opened.append(str(path))
    return np_load(path, *a, **kw)

  monkeypatch.setattr(shards.np, 'load', spy)
  monkeypatch.setattr(shards, 'MAX_OPEN_SHARDS', 2)
  ds, data = pipeline.train_data([pipeline.Source('s', dirs['six'], epochs=2, variant_policy='random')],
                                 seq_len=L, batch_size=B, seed=7)
  tokens = data.windows[0]._split.tokens
  assert tokens.num_shards == 6 and tokens.num_open == 0
  assert not [p for p in opened if p.endswith('.tokens.npy')]   # only docs/variants were read
  got = []
  for i in range(len(ds)):
    got.append(ds[i])
    assert tokens.num_open <= 2
  assert_same(got, expected)
  assert len({p for p in opened if p.endswith('.tokens.npy')}) == 6   # every shard was read
  assert tokens.num_open == 2


def test_a_pickled_split_carries_paths_and_reads_the_same_tokens(dirs):
  split = shards.load_split(dirs['six'], 'train')
  entries = shards.split_entries(dirs['six'], 'train')
  assert np.array_equal(split.tokens[0:len(split.tokens)], np.concatenate(entries))   # spans shards
  assert split.tokens.num_open == 6
  blob = pickle.dumps(split)
  assert b'memmap' not in blob
  copy = pickle.loads(blob)
  assert copy.tokens.num_open == 0 and copy.manifest == split.manifest
  for k, want in enumerate(entries):
    np.testing.assert_array_equal(copy.tokens[copy.offsets_i64[k]:copy.offsets_i64[k + 1]], want)
  assert copy.tokens[int(copy.offsets_i64[3])] == entries[3][0]


def test_resume_over_many_shards_is_exact_with_and_without_prefetch_workers(dirs):
  srcs = lambda: [pipeline.Source('s', dirs['many'], epochs=3, variant_policy='cycle')]
  ds = pipeline.train_data(srcs(), seq_len=L, batch_size=B, seed=1)[0]
  uninterrupted = [ds[i] for i in range(12)]
  it = pipeline.train_iterator(ds)
  first = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  for workers in (0, 1):
    resumed = pipeline.train_iterator(pipeline.train_data(srcs(), seq_len=L, batch_size=B, seed=1)[0],
                                      workers=workers)
    resumed.set_state(state)
    assert_same(first + [next(resumed) for _ in range(7)], uninterrupted)
    resumed.close()


def _copy(dirs, tmp_path):
  d = tmp_path / 'copy'
  shutil.copytree(dirs['many'], d)
  return d


def _error(d, split='train') -> str:
  with pytest.raises(shards.DataError) as e:
    shards.load_split(str(d), split)
  msg = str(e.value)
  assert '\n' not in msg
  return msg


def test_bad_shards_are_one_line_errors_naming_the_file(dirs, tmp_path):
  d = _copy(dirs, tmp_path)
  (d / 'train/00000-00001.docs.npy').unlink()
  assert _error(d) == f'{d}/train/00000-00001.docs.npy: missing; prepare the data again'
  assert shards.load_split(str(d), 'val')   # the other split is fine
  shutil.rmtree(d)

  d = _copy(dirs, tmp_path)
  (d / 'train/00000-00002.variants.npy').unlink()
  assert _error(d).startswith(f'{d}/train/00000-00002.variants.npy: missing')
  shutil.rmtree(d)

  d = _copy(dirs, tmp_path)   # truncated: the manifest's size tells
  t = d / 'train/00000-00002.tokens.npy'
  t.write_bytes(t.read_bytes()[:-10])
  assert _error(d).startswith(f'{t}: ') and 'truncated or replaced' in _error(d)
  m = json.loads((d / 'manifest.json').read_text())   # ... and so does the header, without it
  m['files'][str(t.relative_to(d))] = t.stat().st_size
  (d / 'manifest.json').write_text(json.dumps(m))
  assert _error(d).startswith(f'{t}: truncated or unreadable')
  shutil.rmtree(d)

  for field, match in (('num_tokens', r'train/00000-00001.tokens.npy: \d+ tokens, manifest.json says'),
                       ('num_entries', r'train/00000-00001.docs.npy: offsets do not cover'),
                       ('num_docs', r'train/00000-00001.variants.npy: document index does not match')):
    d = _copy(dirs, tmp_path)
    m = json.loads((d / 'manifest.json').read_text())
    m['splits']['train']['shards'][1][field] += 1
    (d / 'manifest.json').write_text(json.dumps(m))
    msg = _error(d)
    assert re.search(match, msg), (field, msg)
    shutil.rmtree(d)

  d = _copy(dirs, tmp_path)   # split totals disagree with the shards
  m = json.loads((d / 'manifest.json').read_text())
  m['splits']['val']['num_tokens'] += 1
  (d / 'manifest.json').write_text(json.dumps(m))
  assert _error(d, 'val').startswith(f'{d}/manifest.json: split \'val\' totals')
  shutil.rmtree(d)

  d = _copy(dirs, tmp_path)   # a shard replaced by one of another length after opening
  split = shards.load_split(str(d), 'train')
  np.save(d / 'train/00000-00000.tokens.npy', np.zeros(3, np.uint16))
  with pytest.raises(shards.DataError, match=r'train/00000-00000.tokens.npy: 3 tokens, expected'):
    split.tokens[0:2]
