"""The rephrase stage at scale (moejax.data.rephrase --out_dir): one task per file on datatrove,
chunks with overlapping context stitched back, K variants, a score filter, a fidelity filter,
failures retried on the next run, kill -9, and the outputs joining the corpus as variants."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moejax.data import classifier, pipeline, prepare, rephrase, shards
from moejax.tools import fake_llm

ROOT = Path(__file__).resolve().parents[1]
LINE = 'Thou art the king, and thy lords hath spoken ere the night doth fall upon the sea.'


def doc(i, n_paras):
  return '\n\n'.join(f'{i}.{k} ' + ' '.join([LINE] * 2) for k in range(n_paras))


@pytest.fixture
def raw(tmp_path):
  d = tmp_path / 'raw'
  d.mkdir()
  texts = {}
  for f in range(2):
    recs = []
    for i in range(f * 10, f * 10 + 10):
      texts[f'd{i}'] = doc(i, 1 + i % 4) + (' theorem enzyme velocity' if i % 2 else '')
      recs.append({'id': f'd{i}', 'text': texts[f'd{i}']})
    (d / f'part{f}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  return d, texts


@pytest.fixture
def server():
  s = fake_llm.Server('markers')
  yield s
  s.stop()


def stage(raw_dir, out, server, *extra):
  return rephrase.main([f'--raw={raw_dir}', f'--out_dir={out}', '--style=simple', f'--base_url={server.url},{server.url}',
                        '--model=rephraser', '--backoff=0.01', '--max_chunk_chars=200', '--overlap_chars=60',
                        '--concurrency=3', *extra])


def records(out):
  return [json.loads(l) for f in sorted(Path(out).glob('part-*.jsonl')) for l in f.read_text().splitlines()]


def expected(text):   # the stitched rewrite, computed here from the rule
  return '\n\n'.join(fake_llm.modernize(c).strip() for c in rephrase.chunks(text, 200))


def test_stage_writes_k_variants_per_document_chunked_and_stitched(raw, tmp_path, server, capsys):
  raw_dir, texts = raw
  out = tmp_path / 'reph'
  assert stage(raw_dir, out, server, '--variants=2') == 0
  msg = capsys.readouterr().out
  recs = records(out)
  assert sorted((r['id'], r['variant']) for r in recs) == sorted((d, v) for d in texts for v in ('simple-1', 'simple-2'))
  assert all(r['text'] == expected(texts[r['id']]) for r in recs)
  assert sorted(p.name for p in out.glob('part-*.jsonl')) == ['part-00000.jsonl', 'part-00001.jsonl']
  n_chunks = sum(len(rephrase.chunks(t, 200)) for t in texts.values())
  assert n_chunks > len(texts) and sum(server.requests.values()) == 2 * n_chunks   # one request per chunk and variant
  assert '40 rephrasings' in msg and '0 failed' in msg
  # joined to the corpus, they are variants of their documents, read by `cycle` per epoch
  assert prepare.main(['--workers=1', f'--raw={raw_dir}', f'--raw={out}', f'--out={tmp_path / "p"}',
                       '--vocab_size=300', '--val_fraction=0.1']) == 0
  m = shards.load_manifest(str(tmp_path / 'p'))
  assert m['variants']['names'] == {'original': 20, 'simple-1': 20, 'simple-2': 20}
  w = pipeline.SourceWindows(shards.load_split(str(tmp_path / 'p'), 'train'), seq_len=16, seed=0,
                             policy='cycle', epochs=3)
  assert [set(w.epoch_entries(e)[1].tolist()) for e in range(3)] == [{0}, {1}, {2}]


def test_overlap_goes_as_context_not_rewritten(server):
  job_prompt = 'Rewrite.'
  seen = []
  server.fault = lambda text, n: seen.append(text)
  from moejax.data import chat, rephrase_stage
  job = rephrase_stage.Job('simple', job_prompt, 1, (server.url,), 'rephraser', 'NO_KEY', max_chunk_chars=200,
                           overlap_chars=60)
  text = doc(1, 3)
  out = rephrase_stage.rewrite(chat.Chat([server.url], 'rephraser', None), job, text, 0)
  assert out == expected(text) and seen == rephrase.chunks(text, 200)   # each chunk rewritten once
  assert rephrase_stage.overlap_tail('aa bbb cccc', 6) == 'cccc'


def test_score_filter_failures_retried_next_run_and_similarity(raw, tmp_path, server, capsys):
  raw_dir, texts = raw
  clf = tmp_path / 'clf'
  ts = list(texts.values())
  classifier.fit(ts, [fake_llm.grade_markers(t) for t in ts]).save(str(clf))
  out = tmp_path / 'reph'
  server.fault = lambda text, n: ('status', 503) if text.startswith('3.') else None
  assert stage(raw_dir, out, server, f'--classifier={clf}', '--min_score=3', '--retries=1') == 0
  msg = capsys.readouterr().out
  odd = {d for d in texts if int(d[1:]) % 2}   # graded 3 (three markers): the ones kept
  assert {r['id'] for r in records(out)} == odd - {'d3'} and '10 below --min_score' in msg
  assert '1 failed' in msg and 'run the same command again' in msg
  before = sum(server.requests.values())
  server.fault = None
  assert stage(raw_dir, out, server, f'--classifier={clf}', '--min_score=3', '--retries=1') == 0
  assert {r['id'] for r in records(out)} == odd and len(records(out)) == len(odd)
  assert sum(server.requests.values()) - before == len(rephrase.chunks(texts['d3'], 200))   # only d3 again
  out2 = tmp_path / 'reph2'
  assert stage(raw_dir, out2, server, '--min_similarity=0.99') == 0
  assert records(out2) == [] and '20 dropped below --min_similarity' in capsys.readouterr().out


def test_kill_9_during_the_stage_loses_nothing_and_repeats_no_finished_document(raw, tmp_path, server):
  raw_dir, texts = raw
  out = tmp_path / 'reph'
  server.fault = lambda text, n: ('sleep', 0.01)
  killer = ('import os, signal, sys; from moejax.data import jsonl_log, rephrase; w = jsonl_log.Appender.write\n'
            'def write(self, r, n=[0]):\n  w(self, r); n[0] += 1\n'
            '  if n[0] == 6: os.kill(os.getpid(), signal.SIGKILL)\n'
            'jsonl_log.Appender.write = write; sys.exit(rephrase.main(sys.argv[1:]))')
  args = [f'--raw={raw_dir}', f'--out_dir={out}', '--style=simple', f'--base_url={server.url}', '--model=rephraser',
          '--max_chunk_chars=200', '--concurrency=3', '--timeout=20']
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run([sys.executable, '-c', killer, *args], env=env, capture_output=True, timeout=120)
  assert p.returncode == -9
  first = records(out)
  assert len(first) >= 6   # (another thread may finish its line before the kill lands)
  asked = dict(server.requests)
  p = subprocess.run([sys.executable, '-m', 'moejax.data.rephrase', *args], env=env, capture_output=True,
                     timeout=120, text=True)
  assert p.returncode == 0, p.stderr
  recs = records(out)
  assert sorted(r['id'] for r in recs) == sorted(texts) and all(r['text'] == expected(texts[r['id']]) for r in recs)
  for r in first:   # finished before the kill: not asked again
    for c in rephrase.chunks(texts[r['id']], 200):
      assert server.requests[c] == asked[c]


def test_bad_input_is_one_line(raw, tmp_path, server, capsys):
  raw_dir, _ = raw
  for args, what in [(['--base_url=http://127.0.0.1:9/v1', '--timeout=2'], 'unreachable'),
                     (['--min_score=3'], '--classifier'), (['--style=nope'], '--style'),
                     (['--model=gpt-nope', f'--base_url={server.url}'], 'gpt-nope')]:
    code = rephrase.main([f'--raw={raw_dir}', f'--out_dir={tmp_path / "o"}', f'--base_url={server.url}',
                          '--model=rephraser', *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and what in err, err
  assert not list((tmp_path).glob('o/part-*'))
