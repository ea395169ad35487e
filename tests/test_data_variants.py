"""Tests for sources with variants, variant policies, epoch budgets, the weighted mixture, packing
metadata, exact resume and bad-input errors (moejax.data.sources / prepare / pipeline)."""
import collections
import json
import random

import grain
import numpy as np
import pytest

from moejax.data import pipeline, prepare, shards

WORDS = 'thou art the king of all my love and night doth fall upon the sea where lords speak'.split()
L, B = 16, 4


def _text(rng, n=40):
  return ' '.join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, docs):
  path.write_text(''.join(json.dumps(d) + '\n' for d in docs))


def make_source(root, name, num_docs, num_rephrasings, seed, tokenizer=None, capsys=None):
  """A JSONL source: num_docs originals, each with num_rephrasings variants, plus one duplicate."""
  rng = random.Random(seed)
  recs = []
  for d in range(num_docs):
    recs.append({'id': f'{name}{d}', 'text': f'{name} doc {d}. ' + _text(rng)})
    recs += [{'id': f'{name}{d}', 'variant': f'style{k}', 'text': f'{name} re{k} {d}. ' + _text(rng, 30)}
             for k in range(num_rephrasings)]
  recs.append({'id': 'dup', 'text': recs[0]['text']})
  raw = root / f'{name}.jsonl'
  write_jsonl(raw, recs)
  args = ['--workers=1', f'--raw={raw}', f'--out={root / name}', '--vocab_size=300', '--val_fraction=0.2']
  assert prepare.main(args + ([f'--tokenizer={tokenizer}'] if tokenizer else [])) == 0
  return str(root / name)


@pytest.fixture(scope='module')
def srcs(tmp_path_factory):
  root = tmp_path_factory.mktemp('variants')
  a = make_source(root, 'a', 20, 2, 0)
  b = make_source(root, 'b', 10, 1, 1, tokenizer=f'{a}/tokenizer.json')
  return {'a': a, 'b': b, 'root': root}


def windows_of(d, policy, epochs=4, **kw):
  return pipeline.SourceWindows(shards.load_split(d, 'train'), seq_len=L, seed=0, policy=policy,
                                epochs=epochs, **kw)


def test_jsonl_records_with_one_id_become_variants_and_duplicates_are_counted(srcs):
  m = shards.load_manifest(srcs['a'])
  assert m['duplicate_docs_removed'] == 1
  assert m['variants']['names'] == {'original': 20, 'style0': 20, 'style1': 20}
  assert m['splits']['train']['num_docs'] + m['splits']['val']['num_docs'] == 20
  split = shards.load_split(srcs['a'], 'train')
  assert (np.diff(split.variants_i64) == 3).all()
  tok = shards.load_tokenizer(srcs['a'])
  first = split.variants_i64[0]
  texts = [tok.decode(split.tokens[split.offsets_i64[k]:split.offsets_i64[k + 1] - 1].tolist())
           for k in range(first, first + 3)]
  assert texts[0].startswith('a doc') and texts[1].startswith('a re0') and texts[2].startswith('a re1')


@pytest.mark.parametrize('policy', pipeline.POLICIES)
def test_variant_policy_picks_original_cycle_or_seeded_random_per_document_and_epoch(srcs, policy):
  w = windows_of(srcs['a'], policy)
  split = shards.load_split(srcs['a'], 'train')
  picks = []
  for e in range(4):
    entries, variant, _ = w.epoch_entries(e)
    docs = np.searchsorted(split.variants_i64, entries, side='right') - 1
    assert sorted(docs) == list(range(len(split.variants_i64) - 1))  # each document once
    np.testing.assert_array_equal(entries - split.variants_i64[docs], variant)
    picks.append(dict(zip(docs.tolist(), variant.tolist())))
  if policy == 'original':
    assert all(v == 0 for p in picks for v in p.values())
  elif policy == 'cycle':
    assert all(v == e % 3 for e, p in enumerate(picks) for v in p.values())
  else:
    assert len({tuple(sorted(p.items())) for p in picks}) == 4
    again = windows_of(srcs['a'], policy)
    np.testing.assert_array_equal(again.epoch_entries(2)[0], w.epoch_entries(2)[0])


def test_windows_tile_the_concatenated_epochs_and_stop_at_the_epoch_budget(srcs):
  w = windows_of(srcs['a'], 'cycle', epochs=3)
  split = shards.load_split(srcs['a'], 'train')
  stream = np.concatenate([split.tokens[split.offsets_i64[k]:split.offsets_i64[k + 1]]
                           for e in range(3) for k in w.epoch_entries(e)[0]])
  assert len(w) == (len(stream) - 1) // L
  got = np.concatenate([w[i][:-1] for i in range(len(w))] + [w[len(w) - 1][-1:]])
  np.testing.assert_array_equal(got, stream[:len(got)])
  orders = [tuple(w.epoch_entries(e)[0]) for e in range(3)]
  assert len(set(orders)) == 3  # reshuffled every epoch
  with pytest.raises(IndexError):
    w[len(w)]


def test_mixture_follows_weights_then_continues_with_the_unfinished_source(srcs):
  sources = [pipeline.Source('a', srcs['a'], weight=3.0, epochs=1),
             pipeline.Source('b', srcs['b'], weight=1.0, epochs=4)]
  data = pipeline.TrainData(sources, seq_len=L, batch_size=B, seed=0)
  la, lb = (len(w) for w in data.windows)
  picks = [data.mix[i] for i in range(len(data.mix))]
  assert len(picks) == la + lb
  for s, n in ((0, la), (1, lb)):  # every window of every source exactly once, in order
    assert [k for i, k in picks if i == s] == list(range(n))
  first = collections.Counter(i for i, _ in picks[:40])
  assert first == {0: 30, 1: 10}
  ref = grain.MapDataset.mix([grain.MapDataset.range(la), grain.MapDataset.range(10**6, 10**6 + lb)], [3, 1])
  for i in range(len(ref)):
    assert picks[i] == ((0, ref[i]) if ref[i] < 10**6 else (1, ref[i] - 10**6))
  assert all(i == 1 for i, _ in picks[len(ref) + 1:])  # a exhausted, b goes on


def test_segment_ids_and_positions_match_a_per_token_loop():
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 4, size=(3, 21)).astype(np.int32)  # EOD = 0, frequent
  batch = pipeline.windows_to_batch(windows, eod_id=0)
  for r in range(3):
    seg, pos = 1, 0
    for t in range(20):
      assert (batch['segment_ids'][r, t], batch['positions'][r, t]) == (seg, pos)
      if batch['inputs'][r, t] == 0:
        seg, pos = seg + 1, 0
      else:
        pos += 1


def test_resuming_a_mixture_mid_epoch_yields_the_uninterrupted_batches(srcs):
  sources = [pipeline.Source('a', srcs['a'], weight=2.0, epochs=2, variant_policy='random'),
             pipeline.Source('b', srcs['b'], weight=1.0, epochs=3, variant_policy='cycle')]
  make = lambda: pipeline.train_iterator(pipeline.train_data(sources, seq_len=L, batch_size=B, seed=3)[0])
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  resumed = make()
  resumed.set_state(state)
  for x, y in zip(expected, [next(resumed) for _ in range(6)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_metrics_count_tokens_epochs_and_variant_docs_per_source(srcs):
  sources = [pipeline.Source('a', srcs['a'], weight=1.0, epochs=3, variant_policy='cycle'),
             pipeline.Source('b', srcs['b'], weight=1.0, epochs=3)]
  data = pipeline.TrainData(sources, seq_len=L, batch_size=B, seed=0)
  n = len(data.mix) // B
  m = data.metrics(n)
  assert m['data/a/source_tokens'] + m['data/b/source_tokens'] == n * B * L
  assert 2.9 < m['data/a/epoch'] <= 3 and 2.9 < m['data/b/epoch'] <= 3
  num_a = shards.load_manifest(srcs['a'])['splits']['train']['num_docs']
  assert [m[f'data/a/variant{v}_docs'] for v in range(3)] == [num_a] * 3
  assert m['data/b/variant1_docs'] == 0
  assert data.metrics(0)['data/a/source_tokens'] == 0


def test_sources_with_another_tokenizer_are_refused_naming_the_source(srcs, tmp_path):
  other = make_source(tmp_path, 'c', 8, 0, 5)  # trains its own tokenizer
  with pytest.raises(pipeline.DataError, match=r'data.sources.c.dir: .* another tokenizer'):
    pipeline.TrainData([pipeline.Source('a', srcs['a']), pipeline.Source('c', other)],
                       seq_len=L, batch_size=B, seed=0)


@pytest.mark.parametrize('field,value,match', [
    ('weight', 0.0, 'data.sources.x.weight: must be > 0'),
    ('weight', -1.0, 'data.sources.x.weight: must be > 0'),
    ('variant_policy', 'sometimes', 'data.sources.x.variant_policy: unknown policy'),
    ('epochs', -2, 'data.sources.x.epochs'),
])
def test_bad_source_config_is_one_line_naming_the_field(field, value, match):
  with pytest.raises(pipeline.DataError, match=match) as e:
    pipeline.Source('x', 'd', **{field: value})
  assert '\n' not in str(e.value)


def _prepare_err(capsys, *args):
  code = prepare.main(['--workers=1', *args])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1, err
  return err


def test_bad_raw_inputs_give_one_line_naming_the_file_and_keep_prepared_data(srcs, tmp_path, capsys):
  out = tmp_path / 'out'
  good = tmp_path / 'good.jsonl'
  write_jsonl(good, [{'id': i, 'text': _text(random.Random(i))} for i in range(5)])
  assert prepare.main(['--workers=1', f'--raw={good}', f'--out={out}', '--vocab_size=300']) == 0
  before = _files(out)
  capsys.readouterr()
  empty = tmp_path / 'empty.jsonl'
  write_jsonl(empty, [{'id': 1, 'text': 'x y z'}, {'id': 2, 'text': '  '}])
  bad_bytes = tmp_path / 'latin.txt'
  bad_bytes.write_bytes(b'ACT I.\n caf\xe9 ' * 50)
  no_field = tmp_path / 'nofield.jsonl'
  write_jsonl(no_field, [{'id': 1, 'body': 'x'}])
  for raw, match in ((tmp_path / 'missing.txt', 'missing.txt: no such file'),
                     (empty, 'empty.jsonl:2: empty document'),
                     (bad_bytes, 'latin.txt: undecodable bytes at offset'),
                     (no_field, "nofield.jsonl:1: field 'text' missing"),
                     (tmp_path / '*.nothing', 'glob matches no')):
    assert match in _prepare_err(capsys, f'--raw={raw}', f'--out={out}')
  assert _files(out) == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]   # no work folder left


def _files(d) -> dict:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


def test_truncated_shard_and_manifest_mismatch_are_one_line_errors_naming_the_file(srcs, tmp_path):
  import shutil
  d = tmp_path / 'copy'
  shutil.copytree(srcs['a'], d)
  tokens = d / 'train/00000-00000.tokens.npy'
  tokens.write_bytes(tokens.read_bytes()[:-100])
  with pytest.raises(shards.DataError, match='train/00000-00000.tokens.npy: .*truncated') as e:
    shards.load_split(str(d), 'train')
  assert '\n' not in str(e.value)
  shutil.rmtree(d)
  shutil.copytree(srcs['a'], d)
  m = json.loads((d / 'manifest.json').read_text())
  m['splits']['train']['shards'][0]['num_tokens'] += 1
  (d / 'manifest.json').write_text(json.dumps(m))
  with pytest.raises(shards.DataError, match='train/00000-00000.tokens.npy: .* manifest.json says'):
    shards.load_split(str(d), 'train')


def test_txt_files_named_by_variant_regex_become_one_document_with_variants(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  rng = random.Random(0)
  for w in ('x', 'y', 'z'):
    (raw / f'{w}_gut.txt').write_text('ACT I.\n' + _text(rng, 80) + '\nACT II.\n' + _text(rng, 80))
  (raw / 'x_gut_f.txt').write_text('Actus Primus.\n' + _text(rng, 90))
  assert prepare.main(['--workers=1', f'--raw={raw}/*.txt', f"--out={tmp_path / 'p'}", '--vocab_size=300',
                       '--variant_regex=(?P<doc>.+?)_gut(?:_(?P<variant>f))?']) == 0
  m = shards.load_manifest(str(tmp_path / 'p'))
  assert m['variants'] == {'names': {'original': 3, 'f': 1},
                           'docs_with_n_variants': {'1': 2, '2': 1}}


def _mixture(srcs, **changes):
  a = dict(name='a', dir=srcs['a'], weight=2.0, epochs=2, variant_policy='random')
  a.update(changes)
  return [pipeline.Source(**a), pipeline.Source('b', srcs['b'], weight=1.0, epochs=3, variant_policy='cycle')]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_resume_with_prefetch_workers_yields_the_uninterrupted_batches(srcs):
  """workers=2 (grain mp_prefetch): the batches of the in-process run, and a state saved with
  workers=2 resumes exactly with workers=2 or with none."""
  ds = pipeline.train_data(_mixture(srcs), seq_len=L, batch_size=B, seed=3)[0]
  uninterrupted = [ds[i] for i in range(12)]
  it = pipeline.train_iterator(ds, workers=2)
  first = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  assert state == {'next_index': 5}
  for workers in (2, 0):
    resumed = pipeline.train_iterator(pipeline.train_data(_mixture(srcs), seq_len=L, batch_size=B, seed=3)[0],
                                      workers=workers)
    resumed.set_state(state)
    _assert_same_batches(first + [next(resumed) for _ in range(7)], uninterrupted)
    resumed.close()


def test_bad_worker_count_is_one_line_naming_data_workers(srcs):
  ds = pipeline.train_data(_mixture(srcs), seq_len=L, batch_size=B, seed=3)[0]
  with pytest.raises(pipeline.DataError, match=r'^data.workers: must be an integer >= 0, got -1$'):
    pipeline.train_iterator(ds, workers=-1)


def test_data_fingerprint_names_each_changed_field_and_is_stable(srcs, tmp_path):
  from moejax.data import fingerprint
  fp = lambda sources, **kw: fingerprint.fingerprint(sources, **{'seq_len': L, 'batch_size': B, 'seed': 3, **kw})
  base = fp(_mixture(srcs))
  assert fp(_mixture(srcs)) == base and json.loads(json.dumps(base)) == base
  assert fingerprint.changes(base, fp(_mixture(srcs, weight=3.0))) == ['data.sources.a.weight 2.0 -> 3.0']
  assert fingerprint.changes(base, fp(_mixture(srcs, variant_policy='cycle'), seq_len=2 * L)) == [
      "data.sources.a.variant_policy 'random' -> 'cycle'", f'train.seq_len {L} -> {2 * L}']
  assert fingerprint.changes(base, fp(_mixture(srcs)[:1])) == [
      f'data.sources.b.{f} {v} -> absent' for f, v in (
          ('dir', repr(srcs['b'])), ('dir/manifest.json sha256', base['data.sources.b.dir/manifest.json sha256'][:12]),
          ('doc_fraction', '1.0'), ('epochs', '3'), ('variant_policy', "'cycle'"), ('weight', '1.0'))]
  # The same directory prepared again from other raw data: only its manifest hash tells.
  import shutil
  copy = tmp_path / 'a'
  shutil.copytree(srcs['a'], copy)
  before = fp(_mixture(srcs, dir=str(copy)))
  make_source(tmp_path, 'a', 12, 1, 9, tokenizer=f"{srcs['a']}/tokenizer.json")
  c = fingerprint.changes(before, fp(_mixture(srcs, dir=str(copy))))
  assert len(c) == 1 and c[0].startswith('data.sources.a.dir/manifest.json sha256 ')


def test_resume_state_refuses_another_data_config_in_one_line_unless_allowed(srcs):
  from moejax.data import fingerprint
  fp = lambda sources: fingerprint.fingerprint(sources, seq_len=L, batch_size=B, seed=3)
  saved = {'iterator': {'next_index': 7}, 'fingerprint': fp(_mixture(srcs))}
  logs = []
  assert fingerprint.resume_state(saved, fp(_mixture(srcs)), False, logs.append) == {'next_index': 7}
  assert logs == []
  changed = fp(_mixture(srcs, epochs=4))
  with pytest.raises(shards.DataError) as e:
    fingerprint.resume_state(saved, changed, False, logs.append)
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith("data: config differs from the checkpoint's: "
                                            'data.sources.a.epochs 2 -> 4;')
  assert '--allow_data_change' in msg and 'batch 7' in msg
  assert fingerprint.resume_state(saved, changed, True, logs.append) == {'next_index': 7}
  assert len(logs) == 1 and 'data.sources.a.epochs 2 -> 4' in logs[0]
  # a checkpoint from before fingerprints holds the bare iterator state
  assert fingerprint.resume_state({'next_index': 3}, changed, False, logs.append) == {'next_index': 3}


def test_a_prepare_failing_while_writing_leaves_the_prepared_dir_and_resumes(srcs, tmp_path, capsys,
                                                                           monkeypatch):
  from moejax.data import shard_writer
  raw = tmp_path / 'good.jsonl'
  write_jsonl(raw, [{'id': i, 'text': _text(random.Random(i))} for i in range(5)])
  out = tmp_path / 'out'
  assert prepare.main(['--workers=1', f'--raw={raw}', f'--out={out}', '--vocab_size=300', '--workers=1']) == 0
  before = _files(out)
  write_shard = shard_writer.WriteShards._write_shard

  def full_disk(self, work, readers, name, *args):
    if name.startswith('val/'):   # train is already written into the work folder
      raise OSError(28, 'No space left on device', f'{name}.tokens.npy')
    return write_shard(self, work, readers, name, *args)

  monkeypatch.setattr(shard_writer.WriteShards, '_write_shard', full_disk)
  capsys.readouterr()
  args = (f'--raw={raw}', f'--out={out}', '--vocab_size=300', '--seed=5', '--workers=1')
  err = _prepare_err(capsys, *args)
  assert 'val/00000-00000.tokens.npy: No space left on device' in err
  assert _files(out) == before
  [work] = [p for p in tmp_path.iterdir() if p.name.startswith('.out.prepare-')]   # kept to resume
  monkeypatch.undo()
  assert prepare.main(list(args)) == 0   # the same command finishes the remaining tasks
  assert not work.exists() and shards.load_manifest(str(out))['args']['seed'] == 5


def test_missing_shard_file_is_one_line_naming_it(srcs, tmp_path):
  import shutil
  d = tmp_path / 'copy'
  shutil.copytree(srcs['a'], d)
  (d / 'train/00000-00000.variants.npy').unlink()
  with pytest.raises(shards.DataError, match=r'train/00000-00000.variants.npy: missing; prepare the data again$') as e:
    shards.load_split(str(d), 'train')
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('overrides,field', [
    ({'data.variant_policy': 'sometimes'}, "data.variant_policy: unknown policy 'sometimes'"),
    ({'data.sources': {'x': {'dir': 'D', 'weight': 0.0}}}, 'data.sources.x.weight: must be > 0, got 0.0'),
    ({'data.sources': {'x': {'dir': 'D', 'weight': -2}}}, 'data.sources.x.weight: must be > 0, got -2'),
    ({'data.sources': {'x': {'dir': 'D', 'variant_policy': 'shuffle'}}}, 'data.sources.x.variant_policy: unknown'),
    ({'data.sources': {'x': {'dir': 'D', 'wieght': 1.0}}}, "data.sources.x: unknown field(s) ['wieght']"),
    ({'data.workers': -1}, 'data.workers: must be an integer >= 0'),
])
def test_bad_data_config_is_a_config_error_naming_the_field(srcs, overrides, field):
  from moejax.configs import base_config
  from moejax.validate import ConfigError, validate_data
  c = base_config()
  c.data.dir = srcs['a']
  for key, value in overrides.items():
    sub, name = key.split('.')
    c[sub][name] = {k: {**v, 'dir': v['dir'].replace('D', srcs['a'])} for k, v in value.items()} \
        if name == 'sources' else value
  with pytest.raises(ConfigError) as e:
    validate_data(c)
  assert str(e.value).startswith(field) and '\n' not in str(e.value), str(e.value)


def test_training_setup_leaves_a_data_dir_prepared_from_other_inputs_alone(srcs, tmp_path):
  """ensure_data (run before training) prepares data.dir from data.raw, but never overwrites a
  data.dir made from other inputs or with a given tokenizer (e.g. originals + rephrasings)."""
  from moejax.configs import base_config
  from moejax.data.ensure import ensure_data
  raw = tmp_path / 'raw'
  raw.mkdir()
  write_jsonl(raw / 'x.jsonl', [{'id': i, 'text': _text(random.Random(i))} for i in range(6)])
  c = base_config()
  c.data.raw, c.data.dir, c.data.vocab_size, c.data.variant_regex = str(raw), str(tmp_path / 'p'), 300, ''
  ensure_data(c)   # missing: prepared from data.raw
  assert shards.load_manifest(c.data.dir)['inputs'] == [str(raw)]
  for made_otherwise in ([f'--raw={raw}', f"--raw={srcs['root'] / 'a.jsonl'}"],
                         [f'--raw={raw}', f"--tokenizer={srcs['a']}"]):
    assert prepare.main(['--workers=1', *made_otherwise, f'--out={c.data.dir}', '--vocab_size=300']) == 0
    before = (tmp_path / 'p' / 'manifest.json').read_bytes()
    ensure_data(c)
    assert (tmp_path / 'p' / 'manifest.json').read_bytes() == before
