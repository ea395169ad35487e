"""What the training loop evaluates: bits per byte of every eval source (data.dir, each source of a
mixture, extra text sets), downstream tasks every eval.every steps, and Weights & Biases as a
metrics sink (offline mode: the run's own records read back from its .wandb file)."""
import glob
import json
import struct

import ml_collections
import numpy as np
import pytest

from moejax import bpb, evals
from moejax.data import shards
from moejax.errors import ConfigError
import runs

TASK = [{'context': 'To be, or not to be, that is', 'choices': [' the question', ' a fish'], 'label': 0},
        {'context': 'ROMEO:', 'choices': [' O, she doth teach', ' xyz'], 'label': 0},
        {'context': 'Once more unto the', 'choices': [' breach', ' beach'], 'label': 0, 'split': 'train'}]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('evals')
  (d / 'tasks').mkdir()
  (d / 'tasks' / 'mini.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in TASK))
  (d / 'tasks' / 'lmt.jsonl').write_text(json.dumps({'context': 'To be, or not', 'target': ' to be'}) + '\n')
  (d / 'extra.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in
                                         ['Now is the winter of our discontent.', 'Friends, Romans, countrymen.']))
  return d


def test_text_sets_and_mixture_sources_each_get_loss_and_bpb(files):
  from moejax.data.ensure import ensure_data
  from test_config import smoke_config
  c = smoke_config()   # its own data.dir, prepared as every smoke run prepares it (same vocab and seed)
  ensure_data(c)
  c.train.seq_len, c.train.batch_size, c.train.eval_batches = 16, 2, 3
  prepared = c.data.dir
  c.data.sources = ml_collections.ConfigDict({'a': {'dir': prepared}, 'b': {'dir': prepared, 'weight': 2.0}})
  c.eval.text = f'extra={files / "extra.jsonl"}'
  tok = shards.load_tokenizer(prepared)
  sources = evals.eval_sources(c, tok)
  assert [s.name for s in sources] == ['main', 'a', 'b', 'extra']
  assert sources[1].num_bytes == sources[0].num_bytes   # the same held-out split
  extra = sources[3]
  stream = []
  for t in ['Now is the winter of our discontent.', 'Friends, Romans, countrymen.']:
    stream += tok.encode(t) + [tok.eod_id]
  want = np.resize(np.array(stream), 2 * 16 + 1)          # one batch, wrapped around
  got = extra.batches[0]
  np.testing.assert_array_equal(got['inputs'].reshape(-1), want[:-1])
  np.testing.assert_array_equal(got['targets'][:, -1], want[[16, 32]])
  assert (extra.num_targets, extra.num_bytes) == bpb.target_bytes(tok, extra.batches)
  m = evals.source_metrics(extra, 2.0)
  assert m['eval/extra/bpb'] == pytest.approx(2.0 * extra.num_targets / np.log(2) / extra.num_bytes)


@pytest.mark.parametrize('spec,problem', [('extra', "is not 'name=path'"), ('x=/no/such.txt', 'no such file')])
def test_bad_text_sets_are_config_errors(spec, problem):
  with pytest.raises(ConfigError, match=problem):
    evals.parse_text_sets(spec)


def _wandb_records(path):
  """(kind, message) of each record of a W&B .wandb file: a 7-byte header, then LevelDB log blocks
  of 32 KiB whose records (7-byte header: crc, length, type full/first/middle/last) carry protobufs."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, block, buf = 7, 32768, b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    n, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
    buf += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):
      r = pb.Record()
      r.ParseFromString(buf)
      buf = b''
      yield r.WhichOneof('record_type'), r


@pytest.mark.slow   # two training runs with W&B starting up: ~95 s
def test_loop_scores_tasks_and_text_sets_and_mirrors_metrics_to_wandb_across_a_resume(files, tmp_path):
  w = tmp_path / 'myrun'
  flags = ['--config.train.eval_every=2', f'--config.eval.tasks={files / "tasks"}', '--config.eval.every=4',
           f'--config.eval.text=extra={files / "extra.jsonl"}', '--config.log.wandb_project=moejax-test']
  env_offline = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
  import os
  old = {k: os.environ.get(k) for k in env_offline}
  os.environ.update(env_offline)
  try:
    out = runs.train(w, '--config.train.steps=4', *flags)
    runs.train(w, '--config.train.steps=6', *flags)   # resumes from step 4
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  assert 'eval/extra/bpb' in out and 'eval/core' in out
  recs = runs.read_jsonl(w / 'metrics.jsonl')
  evals_at = {r['step']: r for r in recs if 'eval/loss' in r}
  assert sorted(evals_at) == [0, 2, 4, 6]
  for step, r in evals_at.items():
    assert {'eval/main/bpb', 'eval/main/loss', 'eval/extra/bpb'} <= set(r)
    tasks_due = step % 4 == 0 or step == 6
    assert ('eval/mini/acc' in r) == tasks_due and ('eval/core' in r) == tasks_due
    if tasks_due:
      assert {'eval/mini/acc_norm', 'eval/mini/centered', 'eval/lmt/acc'} <= set(r)
      assert r['eval/core'] == pytest.approx((r['eval/mini/centered'] + r['eval/lmt/centered']) / 2)
  import subprocess
  proc = subprocess.run(runs.cmd('moejax.report', w), cwd=runs.REPO, env=runs.env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  last = evals_at[max(evals_at)]
  assert (f'held-out at step {last["step"]}: loss {last["eval/loss"]:.4f}, bits per byte: '
          f'extra {last["eval/extra/bpb"]:.4f}, main {last["eval/main/bpb"]:.4f}') in proc.stdout
  table = (w / 'report' / 'summary.md').read_text().split('## Evaluations')[1]
  header = [c.strip() for c in table.strip().splitlines()[0].split('|')[1:-1]]
  assert header[:3] == ['step', 'main/bpb', 'main/loss'] and {'core', 'mini/acc', 'extra/bpb'} <= set(header)
  row4 = [c.strip() for c in table.strip().splitlines()[4].split('|')[1:-1]]   # step 0, 2, 4, ...
  assert row4[0] == '4' and float(row4[header.index('mini/acc')]) == pytest.approx(evals_at[4]['eval/mini/acc'])
  run_id = (w / 'wandb_run_id').read_text().strip()
  files_ = sorted(glob.glob(str(w / 'wandb' / 'offline-run-*' / f'run-{run_id}.wandb')))
  assert len(files_) == 2   # the resumed process continued the same run id
  logged, names, config = {}, set(), None
  for f in files_:
    for kind, r in _wandb_records(f):
      if kind == 'run':
        names.add(r.run.display_name)
        config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
      elif kind == 'history':
        items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        step = r.history.step.num if r.history.HasField('step') else items['_step']
        logged.setdefault(step, {}).update(items)
  assert names == {'myrun'} and config['model']['d_model'] > 0
  for r in recs:   # every metrics.jsonl record, every numeric value
    for k, v in r.items():
      if k != 'step' and isinstance(v, (int, float)):
        assert logged[r['step']][k] == pytest.approx(v, rel=1e-6), (r['step'], k)
