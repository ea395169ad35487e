"""moejax.dry_run on the accelerator speedrun config (experiments/speedrun_fineweb_edu.py): its
per-device state bytes against an independent count over 8 real (fake CPU) devices, its parameter
count against the hand formula, and the CLI's one-line error for a config that cannot work."""
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from runs import REPO, env

from moejax import cli, sharding
from moejax.dry_run import dry_run
from moejax.state import build_setup

SPEEDRUN = 'experiments/speedrun_fineweb_edu.py'


@pytest.fixture(scope='module')
def config():
  return cli.load_config(str(REPO / SPEEDRUN))


def reported_bytes(report: str) -> dict:
  """{'params': bytes, ...} from the report's per-device rows."""
  rows = dict(re.findall(r'^  (\w+)\s+([\d,]+) B ', report, re.M))
  return {k: int(v.replace(',', '')) for k, v in rows.items()}


def device_bytes(tree, devices) -> dict:
  """{device: bytes it holds} of an abstract sharded tree, from each sharding's device -> index
  map (which slice of the array each device stores), not from the shard shape."""
  out = dict.fromkeys(devices, 0)
  for leaf in jax.tree.leaves(tree):
    itemsize = np.dtype(leaf.dtype).itemsize
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
      out[device] += itemsize * int(np.prod([len(range(*s.indices(n))) for s, n in zip(index, leaf.shape)]))
  return out


def test_speedrun_dry_run_reports_the_bytes_of_its_shards_on_8_devices(config):
  report = dry_run(config, 8)
  got = reported_bytes(report)
  assert 'mesh: data=1 x fsdp=1 x expert=8 x tensor=1' in report
  assert 'eval/loss <= 3.28' in report and '524,288 tokens per step, 65,536 per device' in report

  # The parameters by hand: 12 MoE layers of MHA (4 D^2), 256 routed + 1 shared SwiGLU experts of
  # 384, a router and two norms; untied embedding and head over the padded vocabulary.
  D, F, E, L, V = 768, 384, 256, 12, 50304
  per_layer = 4 * D * D + 3 * D * F * (E + 1) + D * E + 2 * D
  total = L * per_layer + 2 * V * D + D
  active = total - 3 * D * F * (E - 7) * L
  assert f'params: {total:,} total' in report and f'{active:,} active per token' in report
  assert got['params'] == 4 * total // 8 == got['grads']   # float32, every leaf split 8 ways

  # Independently: the state on a real 8-device mesh, bytes per device from the index maps.
  devices = jax.devices()[:8]
  state = build_setup(config, sharding.make_mesh(dict(config.mesh), devices)).abstract_state
  parts = {'params': state['params'], 'optimizer': state['opt_state'],
           'other': {k: v for k, v in state.items() if k not in ('params', 'opt_state')}}
  for name, tree in parts.items():
    held = device_bytes(tree, devices)
    assert set(held.values()) == {got[name]}, (name, held, got[name])
  assert got['optimizer'] > 2 * got['params']   # AdamW's two moments, plus replicated counts / lrs
  assert got['total'] == sum(got[k] for k in ('params', 'grads', 'optimizer', 'other', 'activations'))


def test_num_devices_defaults_to_this_processes_devices_when_the_mesh_fits(config):
  assert 'on 8 devices (this process has 8 cpu devices)' in dry_run(config)
  assert 'mesh: data=2 x fsdp=1 x expert=8' in dry_run(config, 16)


def _cli(*flags):
  return subprocess.run([sys.executable, '-m', 'moejax.dry_run', f'--config={SPEEDRUN}', *flags],
                        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)


def test_cli_prints_the_report_and_a_bad_config_gives_one_line_and_exit_2(config):
  ok = _cli('--num_devices=8')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.strip() == dry_run(config, 8)
  bad = _cli('--config.model.top_k=300')
  assert bad.returncode == 2 and bad.stdout == ''
  assert bad.stderr.strip().splitlines() == ['error: model.top_k: 300 must be between 1 and model.num_experts (256)']
