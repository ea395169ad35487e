"""Helpers shared by the tests that run the CLIs as subprocesses (8 fake CPU devices, smoke config)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = '--config=experiments/smoke.py'
BASE_FLAGS = ['--config.train.log_every=1', '--config.checkpoint.every=4',
              '--config.mesh.data=8', '--config.mesh.expert=1']


def env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def cmd(module, workdir, *flags):
  return [sys.executable, '-m', module, f'--workdir={workdir}', *flags]


def train(workdir, *flags, timeout=300) -> str:
  """Runs the training CLI to completion; returns its combined output (asserts exit code 0)."""
  proc = subprocess.run(cmd('moejax.train', workdir, SMOKE, *flags), cwd=REPO, env=env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def train_records(workdir) -> list[dict]:
  return [r for r in read_jsonl(Path(workdir) / 'metrics.jsonl') if 'loss' in r]


def eval_records(workdir) -> list[dict]:
  return [r for r in read_jsonl(Path(workdir) / 'metrics.jsonl') if 'eval/loss' in r]


def losses_by_step(workdir) -> dict:
  return {r['step']: r['loss'] for r in train_records(workdir)}
