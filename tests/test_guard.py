"""Runs that protect themselves (moejax.guard): router collapse stops, divergence rewinds and stops,
loss-spike rewinds, and a corrupt latest checkpoint falls back to the previous intact step."""
import json
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import guard
import runs


def test_collapse_is_at_most_top_k_plus_one_experts_with_the_load_spread_of_top_k_only():
  E, K = 8, 2
  only_k = np.zeros(E)
  only_k[:K] = 0.5
  trickle = only_k * 0.99 + 0.01 / E               # 1% spread over all: still collapsed
  three = np.array([0.48, 0.48, 0.04, 0, 0, 0, 0, 0])   # K + 1 active, nearly all on K
  spread3 = np.array([0.45, 0.45, 0.1, 0, 0, 0, 0, 0])  # K + 1 active, CV below 0.9 x collapsed
  uniform = np.full(E, 1 / E)
  four = np.array([0.25] * 4 + [0] * 4)            # K + 2 experts active: skewed, not collapsed
  got = guard.collapsed_layers(np.stack([only_k, trickle, three, uniform, four, spread3]), K)
  assert [c['layer'] for c in got] == [0, 1, 2]
  assert got[0]['load_cv'] == pytest.approx(np.sqrt(E / K - 1)) == got[0]['collapsed_cv']
  assert got[2]['active_experts'] == 3
  assert guard.collapsed_layers(np.array([[1.0, 0, 0]]), 2) == []   # E <= K + 1: cannot tell


def test_spike_watch_compares_with_the_median_of_earlier_logged_losses():
  w = guard.SpikeWatch(factor=1.5, window=4)
  assert [w.check(s, l) for s, l in enumerate([5.0, 4.9, 4.8, 4.7, 4.6, 4.5])] == [None] * 6
  t = w.check(6, 7.0)                               # median of the last 4: 4.65
  assert t.fail_code == 'loss_spike' and t.step == 6 and '4.6500' in t.message
  assert w.check(7, 4.4) is None                    # the spike did not join the history
  assert guard.SpikeWatch(factor=0.0, window=4).check(0, 1e9) is None


def test_finite_watch_reports_the_first_bad_step_up_to_the_one_checked():
  w = guard.FiniteWatch()
  for step, bad in [(1, False), (2, True), (3, True), (4, False)]:
    w.add(step, jnp.asarray(bad))
  t = w.check(up_to=3)
  assert t.step == 2 and t.fail_code == 'non_finite_loss'
  assert w.check(up_to=4) is None                   # steps <= 3 were dropped; 4 is fine


def _env():   # one CPU device: these runs test the loop, not sharding, and compile twice as fast
  return {**runs.env(), 'XLA_FLAGS': ''}


def _run(workdir, *flags):
  return subprocess.run(runs.cmd('moejax.train', workdir, runs.SMOKE, *flags), cwd=runs.REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)


def _train(workdir, *flags) -> str:
  proc = _run(workdir, *flags)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return proc.stdout + proc.stderr


def _events(workdir):
  return [r for r in runs.read_jsonl(workdir / 'metrics.jsonl') if 'event' in r]


CKPT = ['--config.train.log_every=1', '--config.checkpoint.every=3', '--config.checkpoint.async_save=False']


def _damage(step_dir):
  for f in step_dir.rglob('*'):
    if f.is_file() and f.stat().st_size > 1024:
      f.write_bytes(np.random.default_rng(0).bytes(200))


@pytest.mark.slow   # ~60 s; speedrun-2's acceptance check runs it too
def test_a_damaged_latest_checkpoint_is_named_and_the_run_goes_on_from_the_previous_step(tmp_path):
  ref, run = tmp_path / 'ref', tmp_path / 'run'
  _train(ref, '--config.train.steps=9', '--config.checkpoint.max_to_keep=3', *CKPT)
  shutil.copytree(ref, run)                          # as if it had stopped after saving step 6
  shutil.rmtree(run / 'checkpoints' / '9')
  _damage(run / 'checkpoints' / '6')
  out = _train(run, '--config.train.steps=9', *CKPT)
  assert 'Traceback' not in out
  line = next(l for l in out.splitlines() if 'unreadable' in l)
  assert line.startswith(f'checkpoint step 6 is unreadable: {run}/checkpoints/6/'), line
  assert 'resumed from step 3' in out
  assert (tmp_path / 'run' / 'checkpoints_unreadable' / '6').is_dir()   # kept, not deleted
  want = {r['step']: r['loss'] for r in runs.train_records(ref)}
  got = {r['step']: r['loss'] for r in runs.train_records(run)}
  assert [got[s] for s in (4, 7, 8, 9)] == [want[s] for s in (4, 7, 8, 9)]


@pytest.mark.slow   # three runs (~30 s); speedrun-2's acceptance check covers the corrupt-checkpoint fallback
def test_with_no_intact_checkpoint_the_run_says_so_and_does_not_start_over(tmp_path):
  run = tmp_path / 'run'
  _train(run, '--config.train.steps=6', *CKPT)
  for step in (3, 6):
    _damage(run / 'checkpoints' / str(step))
  proc = _run(run, '--config.train.steps=9', *CKPT)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: checkpoint: no step under {run}/checkpoints could be restored (step 6: '), last
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['3', '6']   # nothing moved
  assert max(r['step'] for r in runs.train_records(run)) == 6                   # nothing rewritten


@pytest.mark.slow   # 80 steps until collapse (~50 s); speedrun-3's acceptance check runs it too
def test_a_router_driven_to_collapse_stops_with_exit_3_before_saving_the_collapsed_state(tmp_path):
  run = tmp_path / 'col'
  proc = _run(run, '--config.train.steps=80', '--config.train.log_every=5', '--config.checkpoint.every=5',
              '--config.model.bias_update_rate=0', '--config.optim.groups.router.multiplier=300')
  assert proc.returncode == guard.EXIT_COLLAPSE, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('stopped: router collapse at step ') and 'MoE layer' in last
  (event,) = _events(run)
  assert event['fail_code'] == 'router_collapse' and event['collapsed_layers']
  stopped = event['step']
  assert stopped < 80 and max(int(p.name) for p in (run / 'checkpoints').iterdir()) < stopped


@pytest.mark.slow   # two runs, ~65 s (speedrun-3's acceptance check runs it too)
def test_a_diverging_run_rewinds_then_stops_with_exit_4_and_resumes_with_a_sane_lr(tmp_path):
  run = tmp_path / 'nan'
  flags = ['--config.train.log_every=5', '--config.checkpoint.every=5']
  proc = _run(run, '--config.train.steps=12', '--config.optim.lr=1e4', *flags)
  assert proc.returncode == guard.EXIT_DIVERGED, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  events = _events(run)
  assert [e.get('rewind') for e in events] == [1, 2, 3, None]
  assert events[-1]['fail_code'] == 'non_finite_loss'
  assert 'rewound to step 5 and skipped the batches of steps 6-6' in events[0]['event']
  # every rewind to step 5 diverged again: that state is set aside (kept), not resumed from
  assert not (run / 'checkpoints' / '5').exists() and (run / 'checkpoints_diverged' / '5').is_dir()
  out = _train(run, '--config.train.steps=6', '--config.optim.lr=1e-3', *flags)
  assert 'resumed' not in out
  losses = [r['loss'] for r in runs.train_records(run)]
  assert losses and all(np.isfinite(losses))
  assert [e['fail_code'] for e in _events(run) if 'fail_code' in e] == ['non_finite_loss']   # history kept


def test_a_loss_spike_rewinds_when_asked_and_stops_when_rewinds_run_out(tmp_path):
  run = tmp_path / 'spike'
  proc = _run(run, '--config.train.steps=30', '--config.train.log_every=1', '--config.checkpoint.every=4',
              '--config.train.spike_factor=0.5', '--config.train.spike_window=5', '--config.train.max_rewinds=1')
  assert proc.returncode == guard.EXIT_DIVERGED, proc.stderr[-2000:]
  events = _events(run)
  assert [e.get('reason') or e.get('fail_code') for e in events] == ['loss_spike', 'loss_spike']
  assert 'above 0.5 x the median' in events[0]['event']
  assert json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])['fail_code'] == 'loss_spike'
