"""Model growth (`init.grow_from`): the grown params are the source's layers stacked, training goes on
from them, only the depth may change, and resuming ignores the source.

One smoke run of 4 steps (1 dense + 2 MoE layers) is the source; the grown model has 2 dense + 4 MoE
layers, so its dense stack is [d0, d0] and its MoE stack [m0, m1, m0, m1].
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import numpy_init_params, tiny_model_dict
from moejax import grow, model, state
from moejax.model_config import ModelConfig
from moejax.validate import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments import smoke  # noqa: E402

DEEPER = ['--config.model.num_layers=6', '--config.model.num_dense_layers=2']


def _env():
  return {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}


def _train(workdir, *flags):
  return subprocess.run([sys.executable, '-m', 'moejax.train', '--config=experiments/smoke.py',
                         f'--workdir={workdir}', '--config.train.log_every=1', *flags], cwd=REPO, env=_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('grow_source')
  proc = _train(workdir, '--config.train.steps=4', '--config.checkpoint.every=4')
  assert proc.returncode == 0, proc.stdout[-4000:]
  return workdir


def _np(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_grown_state_is_source_layers_stacked_with_fresh_optimizer(source_run, monkeypatch):
  monkeypatch.chdir(REPO)
  config = smoke.get_config()
  config.model.num_layers, config.model.num_dense_layers = 6, 2
  config.init.grow_from = str(source_run)
  s = state.setup(config)
  grown = _np(state.init_state(s))

  _, restored, step = grow.load_source(str(source_run))
  assert step == 4
  src_p, src_bias = _np(restored['params']), np.asarray(restored['router_bias'])
  assert src_bias.shape == (2, 8) and np.abs(src_bias).sum() > 0   # trained: the bias moved

  p = grown['params']
  for k in ('embed', 'head', 'final_norm'):
    np.testing.assert_array_equal(p[k], src_p[k])
  # Naive reference: the whole stack of each kind repeated, [d0, d0] and [m0, m1, m0, m1].
  jax.tree.map(lambda g, s_: np.testing.assert_array_equal(g, np.concatenate([s_, s_])),
               p['dense_blocks'], src_p['dense_blocks'])
  jax.tree.map(lambda g, s_: np.testing.assert_array_equal(g, np.concatenate([s_, s_])),
               p['moe_blocks'], src_p['moe_blocks'])
  np.testing.assert_array_equal(grown['router_bias'], np.concatenate([src_bias, src_bias]))
  assert int(grown['step']) == 0
  moments = [x for x in jax.tree.leaves(grown['opt_state']) if x.ndim > 0]
  assert moments and all(not np.any(x) for x in moments)   # Adam's mu and nu start at zero


@pytest.mark.slow
def test_grown_run_trains_with_finite_loss(source_run, tmp_path):
  workdir = tmp_path / 'grown'
  proc = _train(workdir, *DEEPER, '--config.train.steps=3', '--config.checkpoint.every=3',
                f'--config.init.grow_from={source_run}')
  assert proc.returncode == 0, proc.stdout[-4000:]
  assert 'moe_blocks [0, 1, 0, 1]' in proc.stdout and 'dense_blocks [0, 0]' in proc.stdout, proc.stdout
  recs = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines() if l.strip()]
  losses = [r['loss'] for r in recs if 'loss' in r]
  evals = [r['eval/loss'] for r in recs if 'eval/loss' in r]
  assert len(losses) == 3 and all(math.isfinite(l) for l in losses), losses
  assert len(evals) == 2 and all(math.isfinite(l) for l in evals), evals
  # Grown from a trained model, it starts below a fresh init (the source's step-0 loss; ~7.25 vs ~7.30).
  src_step0 = [json.loads(l) for l in (source_run / 'metrics.jsonl').read_text().splitlines()
               if '"eval/loss"' in l][0]['eval/loss']
  assert evals[0] < src_step0 - 0.03, (evals, src_step0)


@pytest.mark.slow
def test_resume_ignores_grow_from(source_run, tmp_path):
  workdir = tmp_path / 'grown'
  flags = [*DEEPER, '--config.checkpoint.every=2', f'--config.init.grow_from={source_run}']
  first = _train(workdir, *flags, '--config.train.steps=2')
  assert first.returncode == 0 and 'grown from' in first.stdout, first.stdout[-4000:]
  again = _train(workdir, *flags, '--config.train.steps=3')
  assert again.returncode == 0, again.stdout[-4000:]
  assert 'resumed from step 2' in again.stdout and 'grown from' not in again.stdout, again.stdout


def test_width_change_fails_with_one_line_naming_the_field(source_run, tmp_path):
  proc = _train(tmp_path / 'wide', *DEEPER, '--config.model.d_model=32', '--config.train.steps=2',
                f'--config.init.grow_from={source_run}')
  assert proc.returncode == 2, proc.stdout[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in proc.stdout, proc.stdout[-4000:]
  assert lines[0].startswith('error: model.d_model: 32 here but 64 in the source run'), lines[0]


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize('field, value', [('num_experts', 4), ('expert_ffn_dim', 8), ('vocab_size', 64),
                                          ('attn.num_kv_heads', 4), ('num_shared_experts', 0),
                                          ('mla.kv_lora_rank', 8), ('router.num_zero_experts', 2)])
def test_check_compatible_names_the_field_that_changes_a_shape(field, value):
  src = tiny_model_dict(attention='gqa,mla')
  dst = tiny_model_dict(attention='gqa,mla', num_layers=5)
  *group, leaf = field.split('.')
  (dst[group[0]] if group else dst)[leaf] = value
  if field == 'router.num_zero_experts':   # zero experts widen the router (and need a target)
    dst.router.target_active_experts = 1.5
  with pytest.raises(ConfigError, match=rf'^model\.{field}: '):
    grow.check_compatible(src, dst, 'the source')


def test_check_compatible_allows_depth_and_shape_free_fields():
  src = tiny_model_dict()
  grow.check_compatible(src, tiny_model_dict(num_layers=7, num_dense_layers=2, init_std=0.1,
                                             router=dict(score='softmax'), attn=dict(window=8),
                                             loss=dict(z_weight=1e-3)), 'the source')


def test_layer_map_repeats_the_stack():
  assert grow.layer_map(2, 4) == [0, 1, 0, 1]
  assert grow.layer_map(3, 4) == [0, 1, 2, 0]
  assert grow.layer_map(1, 3) == [0, 0, 0]


def test_grow_under_attention_pattern_keeps_layer_types():
  """'gqa,mla' over 3 layers (1 dense): MoE layers [mla, gqa] as two per-position stacks; grown to 5
  layers the MoE layers are [mla, gqa, mla, gqa], copies of source layers [0, 1, 0, 1]."""
  src = tiny_model_dict(attention='gqa,mla', num_layers=3, num_dense_layers=1)
  dst = tiny_model_dict(attention='gqa,mla', num_layers=5, num_dense_layers=1)
  grow.check_compatible(src, dst, 'the source')
  src_cfg, dst_cfg = ModelConfig.from_config(src), ModelConfig.from_config(dst)
  p = numpy_init_params(model.model_specs(src_cfg), 0)
  g = grow.grow_params(p, src, dst)
  assert jax.tree.structure(g) == jax.tree.structure(numpy_init_params(model.model_specs(dst_cfg), 1))
  for path in (('attn', 'wo'), ('ffn', 'w_up'), ('ffn', 'router')):
    src_L = np.asarray(model.moe_layer_leaf(p['moe_blocks'], path, src_cfg))
    got_L = np.asarray(model.moe_layer_leaf(g['moe_blocks'], path, dst_cfg))
    np.testing.assert_array_equal(got_L, src_L[[0, 1, 0, 1]])
  bias = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)
  np.testing.assert_array_equal(grow.grow_router_bias(bias, src, dst), bias[[0, 1, 0, 1]])

  # 2 dense layers would make dense layer 1 an mla copy of the source's only (gqa) dense layer.
  with pytest.raises(ConfigError, match=r'^model\.attention: dense_blocks layer 1 \(mla\)'):
    grow.check_compatible(src, tiny_model_dict(attention='gqa,mla', num_layers=5, num_dense_layers=2),
                          'the source')


def test_grow_from_a_directory_without_a_run_fails_naming_the_field(tmp_path):
  config = smoke.get_config()
  config.init.grow_from = str(tmp_path)
  with pytest.raises(ConfigError, match=r'^init\.grow_from: .* no config\.json'):
    grow.grown_start(config)
