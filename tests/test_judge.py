"""moejax.data.judge label / train against a loopback judge (moejax.tools.fake_llm) that grades by
a known rule, with injected errors, garbage, timeouts and a kill -9."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moejax.data import classifier, judge
from moejax.tools import fake_llm

KEY = 'sk-judge-secret-42'
ROOT = Path(__file__).resolve().parents[1]
FILLER = 'the of and to in is was for on that with as by at from it this be are or an which were'.split()


def corpus(path: Path, n: int, seed: int = 3) -> dict[str, str]:
  """n JSONL documents of random words with 0-5 distinct marker words planted; returns {id: text}."""
  rng = random.Random(seed)
  vocab = [''.join(rng.choice('bcdfghklmnprstvz') + rng.choice('aeiou') for _ in range(3)) for _ in range(1500)]
  docs = {}
  for i in range(n):
    body = [rng.choice(FILLER if rng.random() < 0.4 else vocab) for _ in range(rng.randint(40, 120))]
    for m in rng.sample(fake_llm.MARKERS, rng.choice([0, 1, 2, 3, 4, 5])):
      body.insert(rng.randrange(len(body)), m)
    docs[f'doc{i}'] = ' '.join(body)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps({'id': k, 'text': v}) + '\n' for k, v in docs.items()))
  return docs


def rule(text: str) -> int:   # the judge's rule, computed here independently of the server
  return min(5, len({m for m in fake_llm.MARKERS if m in text.lower()}))


@pytest.fixture
def server():
  s = fake_llm.Server('markers')
  yield s
  s.stop()


def label(raw, out, server_url, capsys, monkeypatch, *extra):
  monkeypatch.setenv('JUDGE_KEY', KEY)
  code = judge.main(['label', f'--raw={raw}', f'--out={out}', f'--base_url={server_url}', '--model=judge',
                     '--api_key_env=JUDGE_KEY', '--backoff=0.01', '--concurrency=4', *extra])
  cap = capsys.readouterr()
  assert KEY not in cap.out + cap.err
  return code, cap.out, cap.err


def doc_of(server, text):
  return fake_llm.document_of(text, server.prompt)


def test_label_matches_the_rule_retries_faults_and_counts_what_failed(server, tmp_path, capsys, monkeypatch):
  docs = corpus(tmp_path / 'raw' / 'a.jsonl', 60)
  sampled = [d for d, _ in judge.sample(iter(docs.items()), 50, 1)]
  docs[sampled[3]] += ' NOSCORE'   # the judge never gives this one a score
  (tmp_path / 'raw' / 'a.jsonl').write_text(''.join(json.dumps({'id': k, 'text': v}) + '\n' for k, v in docs.items()))
  kind = lambda d: sum(map(ord, d)) % 6   # a fixed fault per document

  def fault(text, n):
    d = doc_of(server, text)
    if 'NOSCORE' in d:
      return ('body', json.dumps({'choices': [{'message': {'content': 'I cannot grade this.'}}]}).encode())
    if kind(d) == 1 and n <= 2:
      return ('status', 500)
    if kind(d) == 2 and n == 1:
      return ('body', b'{"choices": [')
    if kind(d) == 3 and n == 1:
      return ('sleep', 1.5)   # past --timeout
    return None

  server.fault = fault
  out = tmp_path / 'labels.jsonl'
  code, msg, err = label(tmp_path / 'raw/*.jsonl', out, server.url, capsys, monkeypatch, '--sample=50',
                         '--timeout=0.5', '--seed=1')
  labels = [json.loads(l) for l in out.read_text().splitlines()]
  assert code == 0 and server.auth == {f'Bearer {KEY}'}
  assert [r['id'] for r in sorted(labels, key=lambda r: sampled.index(r['id']))] == \
      [d for d in sampled if d != sampled[3]]   # the seeded sample, each once, less the one without a score
  assert all(r['model'] == 'judge' and r['score'] == rule(docs[r['id']]) for r in labels)
  assert '5 replies had no score line' in msg and '1 documents without a score, 0 failed' in msg
  assert sampled[3] in err
  asked = {doc_of(server, t): c for t, c in server.requests.items()}
  faulty = [docs[d] for d in sampled if kind(docs[d]) in (1, 2, 3) and d != sampled[3]]
  assert len(faulty) > 5 and all(asked[d] == (3 if kind(d) == 1 else 2) for d in faulty)
  assert [d for d, _ in judge.sample(iter(docs.items()), 50, 2)] != sampled   # another seed, another sample


def test_rerun_skips_finished_labels_and_max_failures_sets_the_exit_code(server, tmp_path, capsys, monkeypatch):
  docs = corpus(tmp_path / 'raw.jsonl', 20)
  out = tmp_path / 'labels.jsonl'
  server.fault = lambda text, n: ('status', 503) if 'enzyme' in text else None
  code, msg, err = label(tmp_path / 'raw.jsonl', out, server.url, capsys, monkeypatch, '--sample=20',
                         '--retries=1', '--max_failures=0')
  failed = sum('enzyme' in t for t in docs.values())
  assert failed and code == 1 and f'{failed} failed requests' in msg and '--max_failures' in err
  assert len(out.read_text().splitlines()) == 20 - failed
  before = sum(server.requests.values())
  server.fault = None
  code, msg, _ = label(tmp_path / 'raw.jsonl', out, server.url, capsys, monkeypatch, '--sample=20')
  assert code == 0 and f'({20 - failed} already done)' in msg
  assert sum(server.requests.values()) - before == failed   # only the failed ones are asked again
  labels = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted(r['id'] for r in labels) == sorted(docs) and all(r['score'] == rule(docs[r['id']]) for r in labels)


def test_kill_9_during_label_loses_nothing_and_repeats_no_finished_request(server, tmp_path):
  docs = corpus(tmp_path / 'raw.jsonl', 40)
  out = tmp_path / 'labels.jsonl'
  server.fault = lambda text, n: ('sleep', 0.02)
  # the labeller SIGKILLs itself after its 15th label line, with other requests in flight
  killer = ('import os, signal, sys; from moejax.data import jsonl_log, judge; w = jsonl_log.Appender.write\n'
            'def write(self, r, n=[0]):\n  w(self, r); n[0] += 1\n'
            '  if n[0] == 15: os.kill(os.getpid(), signal.SIGKILL)\n'
            'jsonl_log.Appender.write = write; sys.exit(judge.main(sys.argv[1:]))')
  args = ['label', f'--raw={tmp_path / "raw.jsonl"}', f'--out={out}', f'--base_url={server.url}',
          '--model=judge', '--sample=40', '--concurrency=4', '--timeout=20']
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run([sys.executable, '-c', killer, *args], env=env, capture_output=True, timeout=120)
  assert p.returncode == -9
  first = [json.loads(l) for l in out.read_text().splitlines()]
  assert 15 <= len(first) < 40   # (another thread may finish its line before the kill lands)
  asked_before = {doc_of(server, t): c for t, c in server.requests.items()}
  p = subprocess.run([sys.executable, '-m', 'moejax.data.judge', *args], env=env, capture_output=True,
                     timeout=120, text=True)
  assert p.returncode == 0, p.stderr
  labels = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted(r['id'] for r in labels) == sorted(docs)   # nothing lost, no id twice
  assert all(r['score'] == rule(docs[r['id']]) for r in labels)
  asked = {doc_of(server, t): c for t, c in server.requests.items()}
  for r in first:   # a label written before the kill is never asked for again
    assert asked[docs[r['id']]] == asked_before[docs[r['id']]] == 1


def test_torn_last_line_is_cut_before_appending(tmp_path):
  from moejax.data import jsonl_log
  p = tmp_path / 'l.jsonl'
  p.write_bytes(b'{"id": "a", "score": 1}\n{"id": "b", "sc')
  with jsonl_log.Appender(str(p)) as a:
    a.write({'id': 'c', 'score': 2})
  assert [json.loads(l)['id'] for l in p.read_text().splitlines()] == ['a', 'c']


def test_train_learns_the_rule_on_held_out_documents(server, tmp_path, capsys, monkeypatch):
  docs = corpus(tmp_path / 'raw.jsonl', 500)
  out = tmp_path / 'labels.jsonl'
  code, _, _ = label(tmp_path / 'raw.jsonl', out, server.url, capsys, monkeypatch, '--sample=400', '--concurrency=8')
  assert code == 0
  assert judge.main(['train', f'--labels={out}', f'--raw={tmp_path / "raw.jsonl"}', f'--out={tmp_path / "clf"}']) == 0
  msg = capsys.readouterr().out
  acc = float(msg.rsplit('held-out accuracy ', 1)[1].split()[0])
  assert acc >= 0.9, msg
  # the saved model agrees with the rule on documents it never saw (the 100 unlabelled ones)
  m = classifier.load(str(tmp_path / 'clf'))
  labelled = {json.loads(l)['id'] for l in out.read_text().splitlines()}
  unseen = [d for d in docs if d not in labelled]
  pred = classifier.grades(m.score([docs[d] for d in unseen]))
  assert np.mean(pred == np.array([rule(docs[d]) for d in unseen])) >= 0.9
  info = json.loads((tmp_path / 'clf' / 'classifier.json').read_text())
  assert info['held_out']['accuracy'] == pytest.approx(acc, abs=1e-3) and info['num_train'] == 360


def test_metrics_are_computed_against_the_judge():
  m = classifier.metrics([0, 1, 3, 4, 5, 5], [0.2, 1.4, 2.6, 2.4, 4.6, 3.0], threshold=3)
  assert m['accuracy'] == pytest.approx(4 / 6)
  # binary at >= 3: judge [F, F, T, T, T, T], predicted [F, F, T, F, T, T]: precision 1, recall 3/4
  assert m['binary_f1'] == pytest.approx(2 * 0.75 / 1.75)


def one_error_line(capsys):
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'error:' in err
  return err


def test_bad_input_is_one_line_and_writes_nothing(server, tmp_path, capsys, monkeypatch):
  corpus(tmp_path / 'raw.jsonl', 10)
  out = tmp_path / 'labels.jsonl'
  out.write_text('{"id": "doc0", "score": 1, "model": "judge"}\n')
  before = out.read_bytes()
  base = ['label', f'--raw={tmp_path / "raw.jsonl"}', f'--out={out}', '--sample=5']
  assert judge.main(base + ['--base_url=http://127.0.0.1:9/v1', '--model=judge', '--timeout=2']) == 2
  assert 'unreachable' in one_error_line(capsys)
  assert judge.main(base + [f'--base_url={server.url}', '--model=gpt-nope']) == 2
  assert "'gpt-nope'" in one_error_line(capsys)
  (tmp_path / 'p.txt').write_text('Grade this. Educational score: <0-5>')
  assert judge.main(base + [f'--base_url={server.url}', '--model=judge', f'--prompt={tmp_path / "p.txt"}']) == 2
  assert '{document}' in one_error_line(capsys)
  assert judge.main(base + [f'--base_url={server.url}', '--model=judge', f'--raw={tmp_path / "none*.jsonl"}']) == 2
  one_error_line(capsys)
  assert out.read_bytes() == before and sum(server.requests.values()) == 0
  # labels for documents not in the corpus
  (tmp_path / 'other.jsonl').write_text('{"id": "zzz", "score": 3}\n')
  assert judge.main(['train', f'--labels={tmp_path / "other.jsonl"}', f'--raw={tmp_path / "raw.jsonl"}',
                     f'--out={tmp_path / "clf"}']) == 2
  assert "'zzz'" in one_error_line(capsys) and not (tmp_path / 'clf').exists()
  assert judge.main(['score', f'--model_dir={tmp_path / "clf"}', f'--data={tmp_path}']) == 2
  one_error_line(capsys)


def test_parse_score_takes_the_last_line_and_refuses_out_of_range():
  assert judge.parse_score('Educational score: 2\nno wait.\nEducational score: 4') == 4
  assert judge.parse_score('**Educational score:** 3') == 3
  for bad in ('Score: 3', 'Educational score: 7', ''):
    with pytest.raises(ValueError):
      judge.parse_score(bad)
