"""Tests for moejax.model: loss/grads invariant to the mesh, precision, remat and diagnostics; tying;
logical axes; training."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MESH_SHAPES, make_test_mesh, numpy_init_params, tiny_model_config

from moejax import model, params, sharding

B, T = 8, 8
RULES = {'batch': ('data', 'expert'), 'expert': 'expert'}


def model_cfg(**kw):
  kw.setdefault('init_std', 0.1)
  kw['loss'] = dict(dict(balance_weight=0.01, z_weight=0.001), **kw.get('loss', {}))
  return tiny_model_config(**kw)


@functools.lru_cache(maxsize=None)
def _mesh(name):
  return make_test_mesh(MESH_SHAPES[name])


@functools.lru_cache(maxsize=None)
def _grad_fn(cfg, mesh_name, diagnostics=False):
  """One compiled value-and-grad of loss_fn per (ModelConfig, mesh, diagnostics)."""
  mesh = _mesh(mesh_name)
  return jax.jit(jax.value_and_grad(
      lambda p, bias, batch: model.loss_fn(p, bias, batch, cfg, mesh, diagnostics=diagnostics),
      has_aux=True))


def loss_and_grads(cfg, mesh_name, p, bias, batch, diagnostics=False):
  (loss, aux), g = _grad_fn(cfg, mesh_name, diagnostics)(p, bias, batch)
  return loss, aux, g


def init(cfg, seed):
  return numpy_init_params(model.model_specs(cfg), seed)


def make_problem(cfg, seed=0):
  p = init(cfg, seed)
  k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
  bias = 0.05 * jax.random.normal(k1, (cfg.num_moe_layers, cfg.num_experts))
  tokens = jax.random.randint(k2, (B, T + 1), 0, cfg.vocab_size)
  mask = (jax.random.uniform(k3, (B, T)) > 0.2).astype(jnp.float32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask}
  return p, bias, batch


@functools.lru_cache(maxsize=None)
def reference_run(attention):
  cfg = model_cfg(attention=attention)
  p, bias, batch = make_problem(cfg)
  return cfg, p, bias, batch, loss_and_grads(cfg, 'single', p, bias, batch)


# ----------------------------------------------------------------------------- meshes

# data8 and expert8 (~35 s, ~10 s) in the slow run: data2_expert4 shards both axes
@pytest.mark.parametrize('mesh_name', [pytest.param('data8', marks=pytest.mark.slow), 'data2_expert4',
                                       pytest.param('expert8', marks=pytest.mark.slow)])
def test_loss_and_grads_on_sharded_mesh_equal_single_device(mesh_name):
  """Params placed by their logical axes (experts split over 'expert'), batch over data x expert."""
  cfg, p, bias, batch, (loss1, aux1, g1) = reference_run('gqa')
  mesh = _mesh(mesh_name)
  p = jax.device_put(
      p, sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(cfg)), RULES))
  batch = jax.device_put(batch, sharding.named(mesh, ('batch', None), RULES))
  loss, aux, g = loss_and_grads(cfg, mesh_name, p, bias, batch)
  assert np.isfinite(float(loss1))
  np.testing.assert_allclose(loss, loss1, rtol=1e-5)
  np.testing.assert_allclose(aux.lm_loss, aux1.lm_loss, rtol=1e-5)
  np.testing.assert_array_equal(aux.moe.load_E, aux1.moe.load_E)
  np.testing.assert_allclose(aux.moe.balance_loss, aux1.moe.balance_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.moe.z_loss, aux1.moe.z_loss, rtol=1e-5)
  assert float(aux.moe.dropped.sum()) == 0.0
  chex.assert_trees_all_close(g, g1, rtol=1e-5, atol=1e-7)


def test_router_bias_gets_no_gradient_and_router_does():
  _, _, _, _, (_, _, g) = reference_run('gqa')
  assert float(jnp.abs(g['moe_blocks']['ffn']['router']).max()) > 0.0
  assert float(jnp.abs(g['moe_blocks']['ffn']['w_gate']).max()) > 0.0


# ----------------------------------------------------------------------------- diagnostics

def test_diagnostics_are_off_the_hot_path_and_change_no_loss_or_gradient():
  """diagnostics=False: no router statistics or router gradients in the MoEAux; diagnostics=True
  adds both (per MoE layer) and leaves the loss, the aux losses and every gradient unchanged."""
  cfg, p, bias, batch, (loss_off, aux_off, g_off) = reference_run('gqa')
  assert aux_off.moe.router_stats is None and aux_off.moe.router_grads is None
  loss_on, aux_on, g_on = loss_and_grads(cfg, 'single', p, bias, batch, diagnostics=True)
  np.testing.assert_array_equal(loss_on, loss_off)
  chex.assert_trees_all_equal(g_on, g_off)
  for f in ('load_E', 'balance_loss', 'z_loss', 'dropped'):
    np.testing.assert_array_equal(getattr(aux_on.moe, f), getattr(aux_off.moe, f), err_msg=f)
  chex.assert_trees_all_equal(aux_on.blocks, aux_off.blocks)
  L = cfg.num_moe_layers
  assert {'entropy', 'top1_margin', 'topk_margin', 'active_experts_per_token'} <= set(aux_on.moe.router_stats)
  assert all(v.shape[0] == L for v in jax.tree.leaves(aux_on.moe.router_stats))
  assert set(aux_on.moe.router_grads) == {'balance', 'z'}   # z: the config has a z-loss weight
  router = g_off['moe_blocks']['ffn']['router']
  assert all(v.shape == router.shape for v in aux_on.moe.router_grads.values())


# ----------------------------------------------------------------------------- dtype / remat / tying

def test_bf16_precision_gives_finite_loss_close_to_fp32():
  cfg, p, bias, batch, (loss32, _, g32) = reference_run('gqa')
  assert cfg.precision == 'fp32'
  cfg16 = model_cfg(precision='bf16')
  loss16, _, g16 = loss_and_grads(cfg16, 'single', p, bias, batch)
  assert np.isfinite(float(loss16))
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))   # grads in the params' dtype


@pytest.mark.parametrize('remat', ['full', pytest.param('dots', marks=pytest.mark.slow)])
def test_remat_policy_gives_same_loss_and_grads_as_none(remat):
  cfg, p, bias, batch, (loss1, _, g1) = reference_run('gqa')
  loss, _, g = loss_and_grads(model_cfg(remat=remat), 'single', p, bias, batch)
  np.testing.assert_allclose(loss, loss1, rtol=1e-6)
  chex.assert_trees_all_close(g, g1, rtol=1e-5, atol=1e-8)


def test_tied_embeddings_equal_untied_model_with_head_set_to_embedding_transpose():
  cfg, p, bias, batch, _ = reference_run('gqa')
  tied_cfg = model_cfg(tie_embeddings=True)
  specs = model.model_specs(tied_cfg)
  assert 'head' not in specs
  p_tied = {k: v for k, v in p.items() if k != 'head'}
  p_untied = dict(p, head=p['embed'].T)
  loss_t, _, g_t = loss_and_grads(tied_cfg, 'single', p_tied, bias, batch)
  loss_u, _, g_u = loss_and_grads(cfg, 'single', p_untied, bias, batch)
  assert set(g_t) == set(p_tied)
  np.testing.assert_allclose(loss_t, loss_u, rtol=1e-6)
  # The tied matrix gets both uses' gradients.
  chex.assert_trees_all_close(g_t['embed'], g_u['embed'] + g_u['head'].T, rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(g_t['moe_blocks'], g_u['moe_blocks'], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- logical axes / shardings

def test_expert_stacks_carry_layers_and_expert_logical_axes():
  cfg = model_cfg(num_shared_experts=1)
  axes = params.logical_axes(model.model_specs(cfg))
  ffn = axes['moe_blocks']['ffn']
  assert ffn['w_gate'] == ('layers', 'expert', 'embed', 'expert_mlp')
  assert ffn['w_up'] == ('layers', 'expert', 'embed', 'expert_mlp')
  assert ffn['w_down'] == ('layers', 'expert', 'expert_mlp', 'embed')
  assert ffn['router'] == ('layers', 'embed', None)
  assert ffn['shared']['w_gate'] == ('layers', 'embed', 'mlp')
  assert axes['dense_blocks']['ffn']['w_gate'] == ('layers', 'embed', 'mlp')
  assert axes['embed'] == ('vocab', 'embed')
  assert axes['head'] == ('embed', 'vocab')
  # Every leaf's axes has one name per dimension.
  specs = model.model_specs(cfg)
  for s in jax.tree.leaves(specs, is_leaf=params.is_spec):
    assert len(s.axes) == len(s.shape)


def test_tree_shardings_put_expert_dim_on_expert_mesh_axis():
  cfg = model_cfg()
  mesh = _mesh('data2_expert4')
  sh = sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(cfg)), RULES)
  w_gate = sh['moe_blocks']['ffn']['w_gate']
  assert w_gate.spec[1] == 'expert'
  assert all(a is None for i, a in enumerate(w_gate.spec) if i != 1)
  assert sh['moe_blocks']['ffn']['w_down'].spec[1] == 'expert'
  assert all(a is None for a in sh['embed'].spec)          # not in the rules: replicated
  p = init(cfg, 0)
  placed = jax.device_put(p['moe_blocks']['ffn']['w_gate'], w_gate)
  L, E = placed.shape[:2]
  assert {s.data.shape for s in placed.addressable_shards} == {(L, E // 4, *placed.shape[2:])}
  batch = sharding.named(mesh, ('batch', None), RULES)
  assert batch.spec[0] == ('data', 'expert')


# ----------------------------------------------------------------------------- training

def test_thirty_adam_steps_on_a_fixed_batch_lower_the_loss_substantially():
  cfg, p, bias, batch, _ = reference_run('gqa')
  grad_fn = _grad_fn(cfg, 'single')   # already compiled by reference_run
  opt = optax.adam(1e-2)

  @jax.jit
  def update(g, s, p):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = opt.init(p)
  losses = []
  for _ in range(30):
    (loss, _), g = grad_fn(p, bias, batch)
    p, state = update(g, state, p)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_cross_entropy_matches_optax_forward_and_gradient():
  from moejax.layers import cross_entropy
  rng = np.random.default_rng(0)
  logits_BTV = jnp.asarray(rng.standard_normal((2, 5, 11)) * 3, jnp.float32)
  targets_BT = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  mask_BT = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
  def ref(logits):   # an independent implementation: optax's integer-label cross-entropy
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)
    return jnp.sum(nll_BT * mask_BT) / jnp.sum(mask_BT)
  lib = lambda logits: cross_entropy(logits, targets_BT, mask_BT)
  np.testing.assert_allclose(lib(logits_BTV), ref(logits_BTV), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lib)(logits_BTV), jax.grad(ref)(logits_BTV), rtol=1e-5, atol=1e-7)
