"""Score-aware sources: data.sources.<name>.min_score and score_weights over a source scored by
`judge score` (moejax.data.score_mix / pipeline), tokens per grade in the metrics, the fingerprint."""
import json
import random

import numpy as np
import pytest

from moejax.data import classifier, fingerprint, judge, pipeline, prepare, scoring, shards
from moejax.tools import fake_llm

L, B = 16, 4


@pytest.fixture(scope='module')
def src(tmp_path_factory):
  """A source of 120 documents with 0-5 marker words, each with one rephrasing, scored."""
  root = tmp_path_factory.mktemp('scored')
  rng = random.Random(0)
  words = 'thou art the king of all my love and night doth fall upon the sea where lords speak'.split()
  recs, texts = [], []
  for d in range(120):
    body = [rng.choice(words) for _ in range(rng.randint(20, 60))]
    for m in rng.sample(fake_llm.MARKERS, d % 6):
      body.insert(rng.randrange(len(body)), m)
    texts.append(' '.join(body))
    recs.append({'id': f'd{d}', 'text': texts[-1]})
    recs.append({'id': f'd{d}', 'variant': 'simple', 'text': 'simply ' + texts[-1]})
  (root / 'raw.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  m = classifier.fit(texts, [fake_llm.grade_markers(t) for t in texts])
  m.save(str(root / 'clf'))
  assert prepare.main(['--workers=1', f'--raw={root / "raw.jsonl"}', f'--out={root / "data"}',
                       '--vocab_size=300', '--val_fraction=0.1', '--shard_tokens=2000']) == 0
  assert judge.main(['score', f'--model_dir={root / "clf"}', f'--data={root / "data"}', '--workers=1']) == 0
  return str(root / 'data')


def grades_of(d):
  return classifier.grades(scoring.load_scores(d, 'train', 'x'))


def windows(d, **kw):
  s = pipeline.Source('web', d, **{k: v for k, v in kw.items() if k in ('min_score', 'score_weights')})
  return pipeline.SourceWindows(shards.load_split(d, 'train'), seq_len=L, seed=0,
                                policy=kw.get('policy', 'original'), epochs=kw.get('epochs', 3),
                                scores=scoring.load_scores(d, 'train', 'x'), min_score=s.min_score,
                                score_weights=s.score_weights, field=s.field, data_dir=d)


def docs_read(w, split, epoch):
  entries, _, _ = w.epoch_entries(epoch)
  return np.searchsorted(split.variants_i64, entries, side='right') - 1


def test_grades_span_every_bucket(src):
  assert set(grades_of(src)) == set(range(6))


def test_min_score_keeps_exactly_the_documents_graded_at_least_it(src):
  g, split = grades_of(src), shards.load_split(src, 'train')
  w = windows(src, min_score=3)
  for e in range(3):
    assert sorted(docs_read(w, split, e)) == np.flatnonzero(g >= 3).tolist()   # each once, every epoch


def test_score_weights_read_each_grade_that_often_per_epoch(src):
  g, split = grades_of(src), shards.load_split(src, 'train')
  w = windows(src, score_weights={'0': 0, '1': 0.5, '5': 3})
  counts = [np.bincount(docs_read(w, split, e), minlength=len(g)) for e in range(3)]
  for c in counts:
    np.testing.assert_array_equal(c, counts[0])   # the same multiset every epoch
    assert (c[g == 0] == 0).all() and (c[g == 5] == 3).all() and (c[(g >= 2) & (g <= 4)] == 1).all()
    assert set(c[g == 1]) == {0, 1}
  assert 0.2 < counts[0][g == 1].mean() < 0.8
  assert [d for d in docs_read(w, split, 0)] != [d for d in docs_read(w, split, 1)]   # reshuffled


def test_copies_of_a_document_read_different_variants_under_cycle(src):
  g, split = grades_of(src), shards.load_split(src, 'train')
  w = windows(src, score_weights=[1, 1, 1, 1, 1, 2], policy='cycle')
  entries, variant, _ = w.epoch_entries(0)
  docs = np.searchsorted(split.variants_i64, entries, side='right') - 1
  for d in np.flatnonzero(g == 5):
    assert sorted(variant[docs == d]) == [0, 1]   # its original and its rephrasing
  for d in np.flatnonzero(g == 2):
    assert variant[docs == d].tolist() == [0]
  entries, variant, _ = w.epoch_entries(1)
  docs = np.searchsorted(split.variants_i64, entries, side='right') - 1
  assert all(variant[docs == d].tolist() == [1] for d in np.flatnonzero(g == 2))


def test_tokens_per_grade_add_up_to_what_the_scores_select(src):
  g, split = grades_of(src), shards.load_split(src, 'train')
  weights = [0, 0.5, 1, 1, 2, 3]
  w = windows(src, score_weights=weights)
  counts = np.bincount(docs_read(w, split, 0), minlength=len(g))
  orig_len = np.diff(split.offsets_i64)[split.variants_i64[:-1]]
  want = [int((orig_len * counts)[g == b].sum()) for b in range(6)]   # one epoch, originals
  epoch_len = int(w.epoch_lens[0])
  assert w.progress(epoch_len)['grade_tokens'] == want
  assert w.progress(2 * epoch_len)['grade_tokens'] == [2 * x for x in want]
  part = w.progress(epoch_len + 1000)['grade_tokens']
  assert sum(part) == epoch_len + 1000 and all(p >= x for p, x in zip(part, want))


def test_train_data_metrics_fingerprint_and_exact_batches(src):
  s = [pipeline.Source('web', src, min_score=2, score_weights={'5': 2})]
  ds, data = pipeline.train_data(s, seq_len=L, batch_size=B, seed=1)
  ds2, _ = pipeline.train_data(s, seq_len=L, batch_size=B, seed=1)
  for i in (0, 7, len(ds) - 1):   # a batch is a pure function of its index: resume is exact
    np.testing.assert_array_equal(ds[i]['inputs'], ds2[i]['inputs'])
  m = data.metrics(10)
  assert sum(m[f'data/web/grade{b}_tokens'] for b in range(6)) == m['data/web/source_tokens'] == 10 * B * L
  assert m['data/web/grade0_tokens'] == m['data/web/grade1_tokens'] == 0
  fp = fingerprint.fingerprint(s, seq_len=L, batch_size=B, seed=1)
  assert fp['data.sources.web.min_score'] == 2 and fp['data.sources.web.score_weights'] == [1, 1, 1, 1, 1, 2.0]
  assert len(fp['data.sources.web.dir/scores.json sha256']) == 64
  plain = fingerprint.fingerprint([pipeline.Source('web', src)], seq_len=L, batch_size=B, seed=1)
  assert not any('score' in k for k in plain)   # fingerprints of unfiltered sources are as before
  # a scored source read without filters: the same stream as without scores, with tokens per grade
  ds3, data3 = pipeline.train_data([pipeline.Source('web', src)], seq_len=L, batch_size=B, seed=1)
  w = pipeline.SourceWindows(shards.load_split(src, 'train'), seq_len=L, seed=1,
                             epochs=pipeline.UNBOUNDED_EPOCHS, salt=data3.windows[0]._seed[1])
  np.testing.assert_array_equal(data3.windows[0].docs, w.docs)
  np.testing.assert_array_equal(data3.windows[0][5], w[5])
  m3 = data3.metrics(10)
  assert sum(m3[f'data/web/grade{b}_tokens'] for b in range(6)) == m3['data/web/source_tokens'] and m3['data/web/grade0_tokens'] > 0


def test_config_sources_take_the_fields_and_bad_values_are_one_line(src, tmp_path):
  import ml_collections
  c = ml_collections.ConfigDict({'dir': src, 'sources': {'web': {'dir': src, 'min_score': 3,
                                                                  'score_weights': {'4': 2.0}}}})
  (s,) = pipeline.sources_from_config(c)
  assert s.min_score == 3 and s.score_weights == [1, 1, 1, 1, 2.0, 1]
  with pytest.raises(shards.DataError, match=r'data.sources.web.min_score: 6 is above every document'):
    pipeline.train_data([pipeline.Source('web', src, min_score=6)], seq_len=L, batch_size=B, seed=0)
  for bad, msg in [({'score_weights': {'7': 1}}, 'grade 7'), ({'score_weights': {'1': -1}}, r'score_weights.1'),
                   ({'score_weights': [0] * 6}, 'every weight is 0'), ({'min_score': 'high'}, 'min_score')]:
    with pytest.raises(shards.DataError, match=msg):
      pipeline.Source('web', src, **bad)
  unscored = tmp_path / 'plain'
  import shutil
  shutil.copytree(src, unscored)
  (unscored / 'scores.json').unlink()
  with pytest.raises(shards.DataError, match='data.sources.web.min_score: .* has no scores.json'):
    pipeline.train_data([pipeline.Source('web', str(unscored), min_score=1)], seq_len=L, batch_size=B, seed=0)
