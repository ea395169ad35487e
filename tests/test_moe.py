"""Tests for moejax.moe (routing, dispatch, balancing) and moejax.model.moe_ffn against the naive
references in tests/reference.py."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_SHAPES, make_test_mesh, tiny_model_config
from reference import (T, T_BATCH, T_SEQ, TOL, lib_value_and_grad, make_moe_inputs, ref_capacity_keep,
                       ref_capacity_keep_per_shard, ref_choose, ref_moe, ref_scores, ref_swiglu,
                       ref_value_and_grad)

from moejax import model, moe, params
from moejax import router as router_lib


def moe_cfg(score='sigmoid', norm_topk=True, routed_scaling=2.5, **kw):
  """The tiny ModelConfig with these router options (routed_scaling != 1 so that it is checked)."""
  return tiny_model_config(router=dict(score=score, norm_topk=norm_topk, routed_scaling=routed_scaling), **kw)


# ----------------------------------------------------------------------------- routing + dropless

@pytest.mark.parametrize('router_score,norm_topk,top_k', [
    ('sigmoid', True, 2), ('softmax', True, 2), ('softmax', False, 3), ('sigmoid', False, 1)])
def test_route_and_dropless_experts_match_naive_reference_forward_and_grad(
    single_mesh, router_score, norm_topk, top_k):
  cfg = moe_cfg(score=router_score, norm_topk=norm_topk, top_k=top_k, dispatch='dropless')
  args, bias, r = make_moe_inputs(cfg)
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  g_lib, (y_lib, dropped, expert_TK, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r)(args)
  assert [sorted(c) for c in chosen] == [sorted(c) for c in np.asarray(expert_TK).tolist()]
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


def test_route_weights_are_unbiased_scores_normalised_and_scaled():
  cfg = moe_cfg(score='sigmoid', norm_topk=True, top_k=2)
  (x, router, *_), bias, _ = make_moe_inputs(cfg)
  bias = bias * 20   # a large bias changes the choice but must not change the weights' formula
  routing = router_lib.route(x, router, bias, cfg.router, seq_len=T_SEQ)
  s = ref_scores(x, router, cfg.router)
  e = np.asarray(routing.expert_TK)
  w = np.take_along_axis(s, e, -1)
  np.testing.assert_allclose(routing.weight_TK, w / w.sum(-1, keepdims=True) * 2.5, rtol=1e-5)
  np.testing.assert_array_equal(routing.load_E, np.bincount(e.reshape(-1), minlength=8))
  assert [sorted(c) for c in ref_choose(x, router, bias, cfg.router)] == [sorted(c) for c in e.tolist()]


@pytest.mark.parametrize('skew', ['two_experts', 'one_hot_expert'])
def test_dropless_with_skewed_router_matches_reference_and_drops_nothing(single_mesh, skew):
  """All tokens on the same few experts: exercises the largest (capacity = num_tokens) branch."""
  cfg = moe_cfg(score='sigmoid', top_k=2, dispatch='dropless')
  args, bias, r = make_moe_inputs(cfg, seed=1)
  bias = jnp.zeros(cfg.num_experts).at[jnp.array([3, 5])].set(10.0)
  if skew == 'one_hot_expert':   # half the tokens on 3+5, the rest on 3+random: expert 3 has all T
    bias = jnp.zeros(cfg.num_experts).at[3].set(10.0)
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  assert all(3 in c for c in chosen)
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r)(args)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


# ----------------------------------------------------------------------------- capacity mode

def test_capacity_dispatch_with_large_capacity_equals_reference_and_drops_nothing(single_mesh):
  cfg = moe_cfg(dispatch='capacity', capacity_factor=8.0, score='softmax')
  args, bias, r = make_moe_inputs(cfg, seed=2)
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r)(args)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


@pytest.mark.parametrize('capacity_factor', [0.5, 0.75])
def test_capacity_dispatch_drops_overflow_in_token_order_and_counts_it(single_mesh, capacity_factor):
  cfg = moe_cfg(dispatch='capacity', capacity_factor=capacity_factor, score='sigmoid')
  args, bias, r = make_moe_inputs(cfg, seed=3)
  bias = bias.at[0].add(0.3)   # some skew so that several experts overflow
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  C = int(np.ceil(capacity_factor * T * cfg.top_k / cfg.num_experts))
  keep, n_dropped = ref_capacity_keep(chosen, C, cfg.num_experts)
  assert n_dropped > 0
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r, keep=keep)(args)
  assert float(dropped) == n_dropped
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


# ----------------------------------------------------------------------------- moe_ffn (model.py)

@pytest.mark.parametrize('num_shared_experts', [0, 2])
def test_moe_ffn_equals_reference_plus_shared_swiglu(single_mesh, num_shared_experts):
  cfg = moe_cfg(num_shared_experts=num_shared_experts, score='sigmoid')
  p = params.init_params(model.moe_specs(cfg), jax.random.key(4))
  p = jax.tree.map(lambda w: w * 15.0, p)   # init_std 0.02 is too small to exercise anything
  assert ('shared' in p) == bool(num_shared_experts)
  _, bias, r = make_moe_inputs(cfg, seed=4)
  x_BTD = jax.random.normal(jax.random.key(5), (T_BATCH, T_SEQ, cfg.d_model))
  x_TD = x_BTD.reshape(T, -1)
  r_BTD = r.reshape(T_BATCH, T_SEQ, -1)

  def lib(x, p):
    y, aux = model.moe_ffn(p, bias, x, cfg, single_mesh, ('data', 'expert'))
    return jnp.sum(y * r_BTD), (y, aux.dropped)

  chosen = ref_choose(x_TD, p['router'], bias, cfg.router)

  def ref(x, p):
    y = ref_moe(x, p['router'], p['w_gate'], p['w_up'], p['w_down'], chosen, cfg.router)
    if 'shared' in p:
      y = y + ref_swiglu(x, p['shared'])
    return jnp.sum(y * r), y

  g_lib, (y_lib, dropped) = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(x_BTD, p)
  g_ref, y_ref = jax.grad(ref, (0, 1), has_aux=True)(x_TD, p)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib.reshape(T, -1), y_ref, **TOL)
  chex.assert_trees_all_close(g_lib[0].reshape(T, -1), g_ref[0], **TOL)
  chex.assert_trees_all_close(g_lib[1], g_ref[1], **TOL)


def test_moe_ffn_diagnostics_add_router_stats_and_grads_and_change_nothing_else(single_mesh):
  """diagnostics=False (the hot path) computes no router statistics or gradients; True adds them
  (those of router.stats and of the layer's own losses) and leaves the output and losses alone."""
  cfg = moe_cfg(loss=dict(z_weight=1e-3))
  p = jax.tree.map(lambda w: w * 15.0, params.init_params(model.moe_specs(cfg), jax.random.key(4)))
  _, bias, _ = make_moe_inputs(cfg, seed=4)
  x_BTD = jax.random.normal(jax.random.key(5), (T_BATCH, T_SEQ, cfg.d_model))
  run = lambda diagnostics: jax.jit(lambda p, x: model.moe_ffn(
      p, bias, x, cfg, single_mesh, ('data', 'expert'), diagnostics=diagnostics))(p, x_BTD)
  y_off, aux_off = run(False)
  y_on, aux_on = run(True)
  assert aux_off.router_stats is None and aux_off.router_grads is None
  np.testing.assert_array_equal(y_on, y_off)
  for f in ('load_E', 'balance_loss', 'z_loss', 'dropped'):
    np.testing.assert_array_equal(getattr(aux_on, f), getattr(aux_off, f), err_msg=f)
  x_TD = x_BTD.reshape(T, -1)
  chex.assert_trees_all_close(aux_on.router_stats,
                              router_lib.stats(x_TD, p['router'], bias, cfg.router), rtol=1e-6)
  route = lambda w, name: getattr(router_lib.route(x_TD, w, bias, cfg.router, T_SEQ), name)
  assert set(aux_on.router_grads) == {'balance', 'z'}
  chex.assert_trees_all_close(aux_on.router_grads['balance'],
                              jax.grad(route)(p['router'], 'balance_loss'), rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(aux_on.router_grads['z'], jax.grad(route)(p['router'], 'z_loss'),
                              rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- meshes

@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_routed_experts_outputs_and_grads_agree_across_meshes(dispatch):
  """1 device, data=8, data=2 x expert=4, expert=8 (and a 1-device mesh without 'expert')."""
  cfg = moe_cfg(dispatch=dispatch, capacity_factor=8.0, score='sigmoid')
  args, bias, r = make_moe_inputs(cfg, seed=6)
  results = {}
  shapes = dict(MESH_SHAPES, data_only1={'data': 1})
  for name, shape in shapes.items():
    g, (y, dropped, _, _) = lib_value_and_grad(cfg, make_test_mesh(shape), bias, r)(args)
    assert float(dropped) == 0.0, name
    results[name] = (y, g)
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r)(args)
  for name, (y, g) in results.items():
    chex.assert_trees_all_close(y, y_ref, **TOL, custom_message=name)
    chex.assert_trees_all_close(g, g_ref, **TOL, custom_message=name)


def test_capacity_dropped_count_is_summed_over_devices_under_expert_parallelism():
  """With expert=8 each device's 2 tokens form a capacity group; drops are summed over devices."""
  cfg = moe_cfg(dispatch='capacity', capacity_factor=0.5, score='sigmoid')
  args, bias, r = make_moe_inputs(cfg, seed=3)
  bias = bias.at[0].add(10.0)   # every token picks expert 0: each device overflows it
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  C = int(np.ceil(0.5 * (T // 8) * cfg.top_k / cfg.num_experts))
  keep, n_dropped = ref_capacity_keep_per_shard(chosen, C, cfg.num_experts, 8)
  mesh = make_test_mesh(MESH_SHAPES['expert8'])
  _, (y, dropped, _, _) = lib_value_and_grad(cfg, mesh, bias, r)(args)
  assert n_dropped >= 8   # at least one per device, on expert 0
  assert float(dropped) == n_dropped
  chex.assert_trees_all_close(y, ref_moe(*args, chosen, cfg.router, keep=keep), **TOL)


# ----------------------------------------------------------------------------- index math

def test_group_by_expert_gives_local_expert_validity_rank_and_counts():
  expert_A = jnp.array([3, 1, 3, 0, 2, 3, 1, 5], jnp.int32)
  local, valid, rank, count = moe._group_by_expert(expert_A, 4, 0)
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(local)[:7], [3, 1, 3, 0, 2, 3, 1])
  assert 0 <= int(local[7]) < 4   # out-of-range index clamped so it can be used to gather safely
  np.testing.assert_array_equal(np.asarray(rank)[:7], [0, 0, 1, 0, 0, 2, 1])
  np.testing.assert_array_equal(count, [1, 2, 1, 3])

  # Expert parallelism: this device holds experts 2, 3 (offset 2).
  local, valid, rank, count = moe._group_by_expert(expert_A, 2, 2)
  v = np.asarray(valid).astype(bool)
  np.testing.assert_array_equal(v, [1, 0, 1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(local)[v], [1, 1, 0, 1])
  np.testing.assert_array_equal(np.asarray(rank)[v], [0, 1, 0, 2])
  np.testing.assert_array_equal(count, [1, 3])
  assert np.all((np.asarray(local) >= 0) & (np.asarray(local) < 2))

  # Offset 4: only expert 5 (local 1) is held.
  local, valid, rank, count = moe._group_by_expert(expert_A, 4, 4)
  np.testing.assert_array_equal(valid, [0, 0, 0, 0, 0, 0, 0, 1])
  assert int(local[7]) == 1 and int(rank[7]) == 0
  np.testing.assert_array_equal(count, [0, 1, 0, 0])


def test_group_by_expert_ranks_are_a_stable_token_order_permutation_per_expert():
  rng = np.random.default_rng(0)
  expert_A = rng.integers(0, 8, size=200)
  local, valid, rank, count = moe._group_by_expert(jnp.asarray(expert_A, jnp.int32), 8, 0)
  assert np.all(np.asarray(valid))
  for e in range(8):
    idx = np.nonzero(expert_A == e)[0]
    np.testing.assert_array_equal(np.asarray(rank)[idx], np.arange(len(idx)))
    assert int(count[e]) == len(idx)


@pytest.mark.parametrize('num_tokens,top_k,num_experts,num_local', [
    (16, 2, 8, 8), (16, 2, 8, 1), (7, 1, 4, 2), (1024, 8, 256, 32), (64, 2, 2, 2), (3, 3, 64, 64),
    (1000, 6, 64, 16), (8, 1, 8, 8)])
def test_dropless_layouts_are_increasing_capacities_then_a_block_fallback(num_tokens, top_k,
                                                                        num_experts, num_local):
  layouts = moe.dropless_layouts(num_tokens, top_k, num_experts, num_local)
  caps = [size for kind, size in layouts if kind == 'capacity']
  assert [kind for kind, _ in layouts] == ['capacity'] * len(caps) + ['blocks']
  assert all(a < b for a, b in zip(caps, caps[1:]))
  mean = num_tokens * top_k / num_experts
  assert caps[0] >= min(num_tokens, mean)   # the smallest bucket holds a perfectly balanced load
  assert all(c % 8 == 0 or c == num_tokens for c in caps)
  assert layouts[-1][1] >= 8


def test_every_dropless_layout_gives_the_same_output_when_the_load_fits():
  """Forcing each branch (capacity buckets and the block fallback) gives one answer."""
  T, D, F, E, K = 24, 8, 6, 4, 2
  ks = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(ks[0], (T, D))
  wg, wu = (jax.random.normal(k, (E, D, F)) * 0.3 for k in ks[1:3])
  wd = jax.random.normal(ks[3], (E, F, D)) * 0.3
  expert_TK = jnp.stack([jnp.arange(T) % E, (jnp.arange(T) + 1) % E], axis=1).astype(jnp.int32)
  weight_TK = jax.nn.softmax(jax.random.normal(ks[4], (T, K)), axis=-1)
  local, valid, rank, count = moe._group_by_expert(expert_TK.reshape(-1), E, 0)
  outs = []
  for layout in [('capacity', int(count.max())), ('capacity', T), ('blocks', 8), ('blocks', 4)]:
    y, dropped = moe._layout_ffn(layout, x, weight_TK, local, valid, rank, count, wg, wu, wd)
    assert float(dropped) == 0.0
    outs.append(np.asarray(y))
  for y in outs[1:]:
    np.testing.assert_allclose(y, outs[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- balancing + losses

def test_update_router_bias_reduces_max_violation_of_skewed_router():
  cfg = moe_cfg(score='sigmoid', top_k=2)
  n, D, E = 128, cfg.d_model, cfg.num_experts
  kx, kr = jax.random.split(jax.random.key(7))
  x = jax.random.normal(kx, (n, D)).at[:, 0].set(1.0)   # feature 0 is a constant 1
  router = jax.random.normal(kr, (D, E)) * 0.15
  router = router.at[0].set(0.0).at[0, 0].set(3.0).at[0, 1].set(2.0)   # most tokens -> 0 and 1

  def max_vio(load_E):
    return (load_E.max() - load_E.mean()) / load_E.mean()

  def step(bias_E, _):
    load_E = router_lib.route(x, router, bias_E, cfg.router, seq_len=n).load_E
    new = router_lib.update_router_bias(bias_E[None], load_E[None], 1e-2)[0]
    return new, max_vio(load_E)

  _, vio = jax.jit(lambda b: jax.lax.scan(step, b, None, length=100))(jnp.zeros(E))
  vio = np.asarray(vio)
  assert vio[0] > 1.5, vio[0]                   # the router is really skewed to begin with
  assert vio[-10:].mean() < 0.5 * vio[0], vio   # and balancing fixes most of it


def test_update_router_bias_moves_bias_by_rate_times_sign_per_layer():
  load = jnp.array([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
  bias = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
  out = router_lib.update_router_bias(bias, load, 0.5)
  np.testing.assert_allclose(out, [[-0.4, 0.7, 0.3, 0.4], [0.5, 0.5, 0.5, -0.5]], rtol=1e-6)


@pytest.mark.parametrize('router_score', ['sigmoid', 'softmax'])
def test_balance_loss_and_z_loss_match_their_definitions(router_score):
  cfg = moe_cfg(score=router_score, top_k=2)
  (x, router, *_), bias, _ = make_moe_inputs(cfg, seed=8)
  routing = router_lib.route(x, router, bias, cfg.router, seq_len=T_SEQ)
  E, K = cfg.num_experts, cfg.top_k
  s = ref_scores(x, router, cfg.router)
  chosen = ref_choose(x, router, bias, cfg.router)
  losses = []
  for b in range(T_BATCH):
    toks = range(b * T_SEQ, (b + 1) * T_SEQ)
    loss = 0.0
    for i in range(E):
      f_i = E / (K * T_SEQ) * sum(i in chosen[t] for t in toks)
      p_i = np.mean([s[t, i] / s[t].sum() for t in toks])
      loss += f_i * p_i
    losses.append(loss)
  np.testing.assert_allclose(routing.balance_loss, np.mean(losses), rtol=1e-5)
  logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(routing.z_loss, np.mean(lse ** 2), rtol=1e-5)


def test_balance_loss_is_one_when_router_scores_are_uniform():
  """P_i = 1/E for every expert, so the loss is (1/E) * sum_i f_i = (1/E) * E/(K*T) * K*T = 1."""
  cfg = moe_cfg(score='softmax', top_k=2)
  E = cfg.num_experts
  routing = router_lib.route(jnp.zeros((E, cfg.d_model)), jnp.zeros((cfg.d_model, E)), jnp.zeros(E),
                             cfg.router, seq_len=E)
  np.testing.assert_allclose(routing.balance_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(routing.z_loss, np.log(E) ** 2, rtol=1e-6)
