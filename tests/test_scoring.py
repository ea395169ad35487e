"""judge score: one score per document next to the shards, on prepare's engine, resumable per shard
(kill -9), and what scores.json counts per grade bucket."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moejax.data import classifier, judge, prepare, scoring, shards
from test_judge import corpus, rule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('scoring')
  docs = corpus(root / 'raw.jsonl', 240, seed=5)
  ids = list(docs)
  m = classifier.fit([docs[d] for d in ids[:200]], np.array([rule(docs[d]) for d in ids[:200]]))
  m.save(str(root / 'clf'))
  assert prepare.main(['--workers=1', f'--raw={root / "raw.jsonl"}', f'--out={root / "data"}', '--vocab_size=400',
                       '--val_fraction=0.1', '--shard_tokens=3000']) == 0
  return root, docs, m


def doc_texts(data_dir, split):
  """The original text of every document of a split, in load_split order (decoded independently)."""
  s = shards.load_split(data_dir, split)
  tok = shards.load_tokenizer(data_dir)
  return [tok.decode(np.asarray(s.tokens[s.offsets_i64[e]:s.offsets_i64[e + 1] - 1]).tolist())
          for e in s.variants_i64[:-1]]


def test_score_writes_one_score_per_document_next_to_the_shards(setup, tmp_path, capsys):
  root, docs, m = setup
  data = tmp_path / 'data'
  subprocess.run(['cp', '-r', str(root / 'data'), str(data)], check=True)
  manifest_before = (data / 'manifest.json').read_bytes()
  assert judge.main(['score', f'--model_dir={root / "clf"}', f'--data={data}', '--workers=1']) == 0
  assert 'scored 240 documents' in capsys.readouterr().out
  manifest = shards.load_manifest(str(data))
  assert len(manifest['splits']['train']['shards']) > 3
  texts = {t: docs_id for docs_id, t in docs.items()}
  for split in ('train', 'val'):
    got = scoring.load_scores(str(data), split, 'x')
    want = m.score(doc_texts(str(data), split))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for name in scoring.shard_names(manifest, split):
      assert (data / f'{name}.scores.npy').is_file()
    # the classifier learnt the rule: the scores agree with it on (nearly) every document
    texts_s = doc_texts(str(data), split)
    assert all(t in texts for t in texts_s)
    assert np.mean(classifier.grades(got) == [rule(t) for t in texts_s]) >= 0.9
  info = json.loads((data / 'scores.json').read_text())
  g = classifier.grades(scoring.load_scores(str(data), 'train', 'x'))
  assert info['splits']['train']['docs_per_bucket'] == np.bincount(g, minlength=6).tolist()
  s = shards.load_split(str(data), 'train')
  lens = np.diff(s.offsets_i64)[s.variants_i64[:-1]]
  assert info['splits']['train']['original_tokens_per_bucket'] == [int(lens[g == b].sum()) for b in range(6)]
  assert (data / 'manifest.json').read_bytes() == manifest_before
  assert judge.main(['score', f'--model_dir={root / "clf"}', f'--data={data}']) == 0
  assert 'scores up to date' in capsys.readouterr().out
  assert not list(tmp_path.glob('.data.score-*'))


def test_kill_9_during_score_resumes_the_unfinished_shards_only(setup, tmp_path):
  root, _, m = setup
  data = tmp_path / 'data'
  subprocess.run(['cp', '-r', str(root / 'data'), str(data)], check=True)
  log = tmp_path / 'saves.txt'
  # counts each shard's save in a file; with KILL_AFTER set, SIGKILLs itself after that many
  driver = ('import os, signal, sys; from moejax.data import judge, scoring; save = scoring._atomic_save\n'
            'def counted(path, arr, n=[0]):\n  save(path, arr); n[0] += 1\n'
            f'  open({str(log)!r}, "a").write(path.name + "\\n")\n'
            '  if n[0] == int(os.environ.get("KILL_AFTER", 0)): os.kill(os.getpid(), signal.SIGKILL)\n'
            'scoring._atomic_save = counted; sys.exit(judge.main(sys.argv[1:]))')
  args = ['score', f'--model_dir={root / "clf"}', f'--data={data}', '--workers=1']
  env = dict(os.environ, PYTHONPATH=str(ROOT), KILL_AFTER='2')
  p = subprocess.run([sys.executable, '-c', driver, *args], env=env, capture_output=True, timeout=300)
  assert p.returncode == -9 and not (data / 'scores.json').exists()
  first = log.read_text().split()
  assert len(first) == 2
  env['KILL_AFTER'] = '0'
  p = subprocess.run([sys.executable, '-c', driver, *args], env=env, capture_output=True, timeout=300, text=True)
  assert p.returncode == 0, p.stderr
  again = log.read_text().split()[2:]
  manifest = shards.load_manifest(str(data))
  names = [n for split in ('train', 'val') for n in scoring.shard_names(manifest, split)]
  # the first task was recorded as finished and is not redone; the second was killed before datatrove
  # recorded it, so it is scored again, with every task after it
  assert again == [f'{n.split("/")[1]}.scores.npy' for n in names[1:]]
  for split in ('train', 'val'):
    np.testing.assert_allclose(scoring.load_scores(str(data), split, 'x'), m.score(doc_texts(str(data), split)),
                               rtol=0, atol=1e-6)


def test_scores_of_another_preparation_are_refused(setup, tmp_path, capsys):
  root, _, _ = setup
  data = tmp_path / 'data'
  subprocess.run(['cp', '-r', str(root / 'data'), str(data)], check=True)
  with pytest.raises(shards.DataError, match='has no scores.json'):
    scoring.load_scores(str(data), 'train', 'data.sources.web.min_score')
  assert judge.main(['score', f'--model_dir={root / "clf"}', f'--data={data}', '--workers=1']) == 0
  m = json.loads((data / 'manifest.json').read_text())
  m['note'] = 'prepared again'
  (data / 'manifest.json').write_text(json.dumps(m))
  with pytest.raises(shards.DataError, match='another preparation'):
    scoring.load_scores(str(data), 'train', 'data.sources.web.min_score')
