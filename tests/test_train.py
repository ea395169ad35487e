"""End-to-end checks of the training CLI (`python -m moejax.train`), run as subprocesses on 8 fake
CPU devices with the smoke config: resuming, re-meshing, SIGTERM, metrics, learning, dispatch,
sampling.

Runs are shared through module-scoped fixtures to keep the whole file to ~2-3 minutes on 2 cores:
  run_a:  8 steps on mesh data=8 expert=1, log_every=1, checkpoint.every=4 (uninterrupted), a
          profile of steps 3-4
  run_b4: the same command with steps=4 (its workdir is copied before each resume)
"""
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from runs import (BASE_FLAGS, REPO, SMOKE, cmd as _cmd, env as _env, eval_records, losses_by_step,  # noqa: F401
                  read_jsonl, train, train_records)

METRIC_KEYS = ('step', 'loss', 'lm_loss', 'grad_norm', 'lr', 'tokens_per_sec', 'mfu', 'moe/maxvio',
               'moe/dead_experts', 'moe/dropped_frac', 'attn/logit_max')


@pytest.fixture(scope='module')
def base_runs(tmp_path_factory):
  """run_a and run_b4, started together: on 2 cores their (mostly single-threaded) compiles overlap."""
  dirs = {name: tmp_path_factory.mktemp(name) for name in ('run_a', 'run_b4')}
  steps = {'run_a': 8, 'run_b4': 4}
  extra = {'run_a': ['--config.train.profile_steps=3,4'], 'run_b4': []}
  procs = {name: subprocess.Popen(_cmd('moejax.train', d, SMOKE, *BASE_FLAGS, f'--config.train.steps={steps[name]}',
                                       *extra[name]),
                                  cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for name, d in dirs.items()}
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
  return dirs


@pytest.fixture(scope='module')
def run_a(base_runs):
  return base_runs['run_a']


@pytest.fixture(scope='module')
def run_b4(base_runs):
  return base_runs['run_b4']


def _copy_run(src, dst):
  shutil.copytree(src, dst)
  return dst


# ----------------------------------------------------------------------------- resume


def test_resume_from_checkpoint_reproduces_uninterrupted_losses_and_logs_each_step_once(
    run_a, run_b4, tmp_path):
  b = _copy_run(run_b4, tmp_path / 'b')
  assert (b / 'checkpoints' / '4').is_dir()
  out = train(b, *BASE_FLAGS, '--config.train.steps=8')
  assert 'resumed from step 4' in out
  a_loss, b_loss = losses_by_step(run_a), losses_by_step(b)
  assert sorted(a_loss) == list(range(1, 9))
  for step in range(5, 9):
    np.testing.assert_allclose(b_loss[step], a_loss[step], rtol=1e-6, err_msg=f'step {step}')
  # The pre-checkpoint part is the same program too.
  for step in range(1, 5):
    np.testing.assert_allclose(b_loss[step], a_loss[step], rtol=1e-6, err_msg=f'step {step}')
  steps = [r['step'] for r in train_records(b)]
  assert sorted(steps) == list(range(1, 9)), steps      # every train step exactly once
  evals = [r['step'] for r in eval_records(b)]
  assert len(evals) == len(set(evals)) and evals[0] == 0 and evals[-1] == 8, evals
  loads = [r['step'] for r in read_jsonl(b / 'loads.jsonl')]
  assert sorted(loads) == list(range(1, 9)), loads


@pytest.mark.slow   # two more runs (~35 s); the sharding-invariance acceptance check covers it
def test_restore_onto_different_mesh_continues_with_close_losses(run_a, run_b4, tmp_path):
  """4 steps on data=8 x expert=1, then resumed to 6 on data=2 x expert=4.

  The reference is run_a (uninterrupted, data=8): the smoke config fixes optim.decay_steps, so
  train.steps does not change the schedule, and steps 1..6 of the 8-step run are exactly a 6-step
  run (the resume test checks that a 4-step run matches it bit-for-bit at rtol 1e-6)."""
  c = _copy_run(run_b4, tmp_path / 'c')
  out = train(c, '--config.train.log_every=1', '--config.checkpoint.every=4',
              '--config.mesh.data=2', '--config.mesh.expert=4', '--config.train.steps=6')
  assert 'resumed from step 4' in out
  assert (c / 'checkpoints' / '6').is_dir()
  ref, got = losses_by_step(run_a), losses_by_step(c)
  assert sorted(got) == list(range(1, 7))
  for step in (5, 6):
    assert math.isfinite(got[step])
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-4, err_msg=f'step {step}')
  assert math.isfinite(eval_records(c)[-1]['eval/loss'])
  assert eval_records(c)[-1]['step'] == 6


def test_resume_under_another_data_config_is_refused_in_one_line_naming_the_field(run_b4, tmp_path):
  """The checkpoint's data fingerprint (moejax.data.fingerprint) against the resumed config; the
  --allow_data_change path is tested on moejax.data.fingerprint.resume_state directly."""
  d = _copy_run(run_b4, tmp_path / 'd')
  proc = subprocess.run(_cmd('moejax.train', d, SMOKE, *BASE_FLAGS, '--config.train.steps=6',
                             '--config.data.variant_policy=original'),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: data: config differs from the checkpoint's: "
                        "data.variant_policy 'cycle' -> 'original';"), proc.stderr[-2000:]
  assert '--allow_data_change' in err and 'Traceback' not in proc.stderr
  assert sorted(os.listdir(d / 'checkpoints')) == ['4']


@pytest.mark.slow   # the same promise in-process: tests/test_model.py (diagnostics change nothing)
def test_steps_between_log_steps_train_exactly_as_logged_ones(run_a, tmp_path):
  """Train compiles two step variants: router diagnostics (stats, gradient-norm ratio) at log steps
  only. With log_every=4, steps 1-3 and 5-7 run the plain variant; the losses at the log steps, the
  eval losses and the window's expert loads are still run_a's (log_every=1: every step diagnosed)."""
  workdir = tmp_path / 'log4'
  train(workdir, '--config.train.log_every=4', *BASE_FLAGS[1:], '--config.train.steps=8')
  got, ref = losses_by_step(workdir), losses_by_step(run_a)
  assert sorted(got) == [4, 8]
  for step in got:
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-6, err_msg=f'step {step}')
  ref_eval = {r['step']: r['eval/loss'] for r in eval_records(run_a)}
  for r in eval_records(workdir):
    np.testing.assert_allclose(r['eval/loss'], ref_eval[r['step']], rtol=1e-6, err_msg=f'eval {r["step"]}')
  for r in train_records(workdir) + train_records(run_a):   # the log steps carry the diagnostics
    assert {'moe/entropy', 'moe/grad_norm_ratio'} <= set(r), sorted(r)
  ref_loads = {r['step']: np.asarray(r['load_fraction']) for r in read_jsonl(run_a / 'loads.jsonl')}
  loads = {r['step']: np.asarray(r['load_fraction']) for r in read_jsonl(workdir / 'loads.jsonl')}
  assert sorted(loads) == [4, 8]
  for step, frac in loads.items():   # the window's fractions: the mean of its steps' (dropless);
    # loads.jsonl rounds to 5 decimals, one assignment of a step's 1024 would move a fraction 2.4e-4
    np.testing.assert_allclose(frac, np.mean([ref_loads[s] for s in range(step - 3, step + 1)], 0),
                               atol=2e-5, err_msg=f'step {step}')


# ----------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow   # a run killed mid-way and resumed (~20 s); the SIGTERM acceptance check covers it
def test_sigterm_saves_checkpoint_at_last_logged_step_exits_zero_and_resumes(tmp_path):
  workdir = tmp_path / 'sigterm'
  flags = ['--config.train.log_every=1', '--config.checkpoint.every=100000']
  log_path = tmp_path / 'sigterm.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(_cmd('moejax.train', workdir, SMOKE, *flags, '--config.train.steps=100000'),
                            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
      metrics = workdir / 'metrics.jsonl'
      deadline = time.monotonic() + 180
      while True:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, 'no train records within 180 s'
        if metrics.exists() and sum('"loss"' in l for l in metrics.read_text().splitlines()) >= 2:
          break
        time.sleep(0.1)
      proc.send_signal(signal.SIGTERM)
      rc = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out = log_path.read_text()
  assert rc == 0, out[-4000:]
  assert 'Traceback' not in out
  last = max(r['step'] for r in train_records(workdir))
  assert last >= 2
  assert (workdir / 'checkpoints' / str(last)).is_dir(), (last, os.listdir(workdir / 'checkpoints'))
  assert f'saved a checkpoint at step {last}' in out

  out2 = train(workdir, *flags, f'--config.train.steps={last + 2}')
  assert f'resumed from step {last}' in out2
  steps = [r['step'] for r in train_records(workdir)]
  assert max(steps) == last + 2
  assert sorted(steps) == list(range(1, last + 3)), steps
  assert (workdir / 'checkpoints' / str(last + 2)).is_dir()


# ----------------------------------------------------------------------------- metrics


def _tb_scalar_tags(tb_dir: Path) -> set:
  """Scalar tags in TensorBoard event files (TFRecord framing, Event protos from tensorboardX)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in tb_dir.rglob('events.out.tfevents.*'):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_metrics_jsonl_loads_jsonl_and_tensorboard_written(run_a):
  recs = train_records(run_a)
  assert [r['step'] for r in recs] == list(range(1, 9))
  for r in recs:
    missing = [k for k in METRIC_KEYS if k not in r]
    assert not missing, (missing, r)
    for k in METRIC_KEYS:
      assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r)
    assert r['tokens_per_sec'] > 0 and r['mfu'] > 0 and r['grad_norm'] > 0
    assert 0 <= r['moe/dead_experts'] <= 8 * 2
    assert r['moe/maxvio'] >= 0
  assert recs[0]['lr'] == 0.0 and recs[-1]['lr'] > 0      # warmup from 0

  evals = eval_records(run_a)
  assert [r['step'] for r in evals] == [0, 8]
  assert all(math.isfinite(r['eval/loss']) for r in evals)

  config = json.loads((run_a / 'config.json').read_text())
  num_moe = config['model']['num_layers'] - config['model']['num_dense_layers']
  num_experts = config['model']['num_experts']
  loads = read_jsonl(run_a / 'loads.jsonl')
  assert [r['step'] for r in loads] == list(range(1, 9))
  for r in loads:
    frac = np.asarray(r['load_fraction'])
    assert frac.shape == (num_moe, num_experts), frac.shape
    assert (frac >= 0).all()
    np.testing.assert_allclose(frac.sum(-1), 1.0, atol=1e-3)

  tb = run_a / 'tb'
  assert list(tb.rglob('events.out.tfevents.*'))
  tags = _tb_scalar_tags(tb)
  assert {'loss', 'eval/loss', 'lr', 'moe/maxvio'} <= tags, tags


def test_profile_steps_write_a_trace_of_the_train_step(run_a, run_b4):
  traces = list((run_a / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1, traces
  assert b'train_step' in traces[0].read_bytes()   # the jitted step's executions are in the trace
  assert not (run_b4 / 'profile').exists()


@pytest.mark.parametrize('spec', ['4,3', '0,2', 'a,b', '1,2,3'])
def test_bad_profile_steps_fail_in_one_line_naming_the_field(spec):
  from moejax import validate
  with pytest.raises(validate.ConfigError, match='train.profile_steps'):
    validate.profile_steps(spec)
  assert validate.profile_steps('2,5') == (2, 5) and validate.profile_steps('3') == (3, 3)
  assert validate.profile_steps('') is None


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow   # the acceptance check of `make train` shows the same on the full corpus
def test_short_run_on_real_corpus_lowers_heldout_loss(tmp_path):
  workdir = tmp_path / 'learn'
  train(workdir, '--config.train.steps=40', '--config.train.eval_every=40', '--config.train.log_every=10',
        '--config.checkpoint.every=40')
  evals = eval_records(workdir)
  assert [r['step'] for r in evals] == [0, 40]
  first, last = evals[0]['eval/loss'], evals[-1]['eval/loss']
  assert last < first - 1.0, (first, last)    # ~7.2 -> ~5.5 in practice


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.slow   # in-process: tests/test_moe.py counts the dropped assignments by hand
def test_capacity_dispatch_drops_tokens_dropless_does_not(run_a, tmp_path):
  workdir = tmp_path / 'capacity'
  cf = 0.5
  train(workdir, '--config.train.steps=3', '--config.train.log_every=1', '--config.checkpoint.every=100',
        '--config.model.dispatch=capacity', f'--config.model.capacity_factor={cf}',
        '--config.mesh.data=8', '--config.mesh.expert=1')
  config = json.loads((workdir / 'config.json').read_text())
  m, t = config['model'], config['train']
  # Each of the 8 data shards routes T = B*L/8 tokens x top_k assignments into E experts x C slots.
  T = t['batch_size'] * t['seq_len'] // 8
  A = T * m['top_k']
  C = max(1, math.ceil(cf * A / m['num_experts']))
  min_dropped = 1 - m['num_experts'] * C / A         # 0.5 for the smoke shapes
  recs = train_records(workdir)
  assert len(recs) == 3
  for r in recs:
    assert r['moe/dropped_frac'] > 0, r
    assert min_dropped - 1e-6 <= r['moe/dropped_frac'] < 1, (min_dropped, r)
    assert math.isfinite(r['loss'])
  assert all(r['moe/dropped_frac'] == 0 for r in train_records(run_a))


# ----------------------------------------------------------------------------- multi-process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow   # two jax.distributed processes (~55 s); the multi-host acceptance check runs them too
def test_two_processes_of_four_devices_reproduce_one_process_of_eight(run_a, tmp_path):
  """2 processes x 4 CPU devices on localhost (jax.distributed, gloo collectives), each reading its
  half of every batch, give run_a's losses (1 process x 8 devices, same mesh data=8) and write one
  checkpoint together."""
  workdir = tmp_path / 'two_procs'
  port = _free_port()
  procs = []
  for i in range(2):
    env = {**_env(), 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'MOEJAX_COORDINATOR': f'127.0.0.1:{port}', 'MOEJAX_NUM_PROCESSES': '2', 'MOEJAX_PROCESS_ID': str(i)}
    procs.append(subprocess.Popen(_cmd('moejax.train', workdir, SMOKE, *BASE_FLAGS, '--config.train.steps=3'),
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  ref, got = losses_by_step(run_a), losses_by_step(workdir)
  assert sorted(got) == [1, 2, 3]      # process 0 alone writes the metrics
  for step in got:
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f'step {step}')
  eval_ref = {r['step']: r['eval/loss'] for r in eval_records(run_a)}
  np.testing.assert_allclose(eval_records(workdir)[0]['eval/loss'], eval_ref[0], rtol=1e-5)
  assert (workdir / 'checkpoints' / '3' / 'commit_success.txt').is_file()


# ----------------------------------------------------------------------------- sample


def test_sample_after_short_run_prints_text(run_a):
  proc = subprocess.run(_cmd('moejax.sample', run_a, '--max_new_tokens=8'), cwd=REPO, env=_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'Traceback' not in proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and lines[0] == '--- sample from step 8 ---', proc.stdout
  text = '\n'.join(lines[1:])
  assert text.strip(), proc.stdout
  assert text.startswith('ROMEO:'), text        # the default prompt is continued


def test_sample_on_empty_workdir_fails_with_one_line_naming_workdir(tmp_path):
  workdir = tmp_path / 'empty_run'
  workdir.mkdir()
  proc = subprocess.run(_cmd('moejax.sample', workdir, '--max_new_tokens=8'), cwd=REPO, env=_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  assert str(workdir) in lines[0], proc.stdout
  assert 'Traceback' not in proc.stdout


def test_report_draws_every_plot_and_a_summary_from_a_run(run_a, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a, workdir, ignore=shutil.ignore_patterns('checkpoints'))
  proc = subprocess.run(_cmd('moejax.tools.report', workdir), cwd=REPO, env=_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:]
  out = workdir / 'report'
  for png in ('expert_load.png', 'balance.png', 'stability.png', 'loss.png'):
    assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
  text = (out / 'summary.md').read_text()
  last = train_records(run_a)[-1]
  assert f'| moe/maxvio (step {last["step"]}) | {last["moe/maxvio"]:.4g} |' in text
  assert 'attn/logit_max' in text
