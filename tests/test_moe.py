"""Tests for moejax.moe (routing, dispatch, balancing) and moejax.model.moe_ffn against naive references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_SHAPES, make_test_mesh, tiny_model_config

from moejax import model, moe, params
from moejax import router as router_lib

T_SEQ, T_BATCH = 8, 2          # tokens are T_BATCH sequences of T_SEQ
T = T_SEQ * T_BATCH            # 16 tokens: divisible by 8 shards
TOL = dict(rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- naive reference

def ref_scores(x_TD, router_DE, cfg):
  logits = np.asarray(x_TD, np.float64) @ np.asarray(router_DE, np.float64)
  if cfg.router_score == 'sigmoid':
    return 1.0 / (1.0 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_choose(x_TD, router_DE, bias_E, cfg):
  """Top-k experts per token (a python list of lists), chosen on scores + bias."""
  s = ref_scores(x_TD, router_DE, cfg) + np.asarray(bias_E, np.float64)
  return [list(np.argsort(-s[t], kind='stable')[:cfg.top_k]) for t in range(s.shape[0])]


def ref_moe(x_TD, router_DE, wg, wu, wd, chosen, cfg, keep=None):
  """Per-token loop: y_t = sum_{e in chosen_t} w_te * SwiGLU_e(x_t). `keep[t][k]` False drops one."""
  ys = []
  for t in range(x_TD.shape[0]):
    xt = x_TD[t].astype(jnp.float32)
    logits = xt @ router_DE.astype(jnp.float32)
    s = jax.nn.sigmoid(logits) if cfg.router_score == 'sigmoid' else jax.nn.softmax(logits)
    w = jnp.stack([s[e] for e in chosen[t]])
    if cfg.norm_topk:
      w = w / jnp.sum(w)
    w = w * cfg.routed_scaling
    y = jnp.zeros_like(xt)
    for k, e in enumerate(chosen[t]):
      if keep is not None and not keep[t][k]:
        continue
      h = jax.nn.silu(xt @ wg[e]) * (xt @ wu[e])
      y = y + w[k] * (h @ wd[e])
    ys.append(y)
  return jnp.stack(ys)


def ref_swiglu(x_TD, p):
  return jnp.stack([(jax.nn.silu(x @ p['w_gate']) * (x @ p['w_up'])) @ p['w_down'] for x in x_TD])


def ref_capacity_keep(chosen, C, num_experts):
  """Hand count: walk assignments token-major (k-minor); each expert keeps its first C."""
  seen = [0] * num_experts
  keep = []
  for t in range(len(chosen)):
    row = []
    for e in chosen[t]:
      row.append(seen[e] < C)
      seen[e] += 1
    keep.append(row)
  dropped = sum(max(0, c - C) for c in seen)
  return keep, dropped


# ----------------------------------------------------------------------------- helpers

def make_inputs(cfg, seed=0, scale=0.5):
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  ks = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(ks[0], (T, D))
  router = jax.random.normal(ks[1], (D, E)) * D ** -0.5
  wg = jax.random.normal(ks[2], (E, D, F)) * scale * D ** -0.5
  wu = jax.random.normal(ks[3], (E, D, F)) * scale * D ** -0.5
  wd = jax.random.normal(ks[4], (E, F, D)) * scale * F ** -0.5
  bias = jax.random.normal(ks[5], (E,)) * 0.1
  r = jax.random.normal(ks[6], (T, D))
  return (x, router, wg, wu, wd), bias, r


def batch_axes_of(mesh):
  return tuple(a for a in ('data', 'expert') if a in mesh.axis_names)


def lib_value_and_grad(cfg, mesh, bias, r):
  """jit: args -> (grads wrt (x, router, wg, wu, wd), (y, dropped, expert_TK, weight_TK))."""
  def f(args):
    x, router, wg, wu, wd = args
    routing = router_lib.route(x, router, bias, cfg, seq_len=T_SEQ)
    y, dropped = moe.routed_experts(x, routing, wg, wu, wd, cfg, mesh, batch_axes_of(mesh))
    return jnp.sum(y * r), (y, dropped, routing.expert_TK, routing.weight_TK)
  return jax.jit(jax.grad(f, has_aux=True))


def ref_value_and_grad(chosen, cfg, r, keep=None):
  def f(args):
    y = ref_moe(*args, chosen, cfg, keep=keep)
    return jnp.sum(y * r), y
  return jax.grad(f, has_aux=True)


def moe_cfg(**kw):
  kw.setdefault('routed_scaling', 2.5)
  return tiny_model_config(**kw)


# ----------------------------------------------------------------------------- routing + dropless

@pytest.mark.parametrize('router_score,norm_topk,top_k', [
    ('sigmoid', True, 2), ('softmax', True, 2), ('softmax', False, 3), ('sigmoid', False, 1)])
def test_route_and_dropless_experts_match_naive_reference_forward_and_grad(
    single_mesh, router_score, norm_topk, top_k):
  cfg = moe_cfg(router_score=router_score, norm_topk=norm_topk, top_k=top_k, dispatch='dropless')
  args, bias, r = make_inputs(cfg)
  chosen = ref_choose(args[0], args[1], bias, cfg)
  g_lib, (y_lib, dropped, expert_TK, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg, r)(args)
  assert [sorted(c) for c in chosen] == [sorted(c) for c in np.asarray(expert_TK).tolist()]
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


def test_route_weights_are_unbiased_scores_normalised_and_scaled():
  cfg = moe_cfg(router_score='sigmoid', norm_topk=True, top_k=2)
  (x, router, *_), bias, _ = make_inputs(cfg)
  bias = bias * 20   # a large bias changes the choice but must not change the weights' formula
  routing = router_lib.route(x, router, bias, cfg, seq_len=T_SEQ)
  s = ref_scores(x, router, cfg)
  e = np.asarray(routing.expert_TK)
  w = np.take_along_axis(s, e, -1)
  np.testing.assert_allclose(routing.weight_TK, w / w.sum(-1, keepdims=True) * 2.5, rtol=1e-5)
  np.testing.assert_array_equal(routing.load_E, np.bincount(e.reshape(-1), minlength=8))
  assert [sorted(c) for c in ref_choose(x, router, bias, cfg)] == [sorted(c) for c in e.tolist()]


@pytest.mark.parametrize('skew', ['two_experts', 'one_hot_expert'])
def test_dropless_with_skewed_router_matches_reference_and_drops_nothing(single_mesh, skew):
  """All tokens on the same few experts: exercises the largest (capacity = num_tokens) branch."""
  cfg = moe_cfg(router_score='sigmoid', top_k=2, dispatch='dropless')
  args, bias, r = make_inputs(cfg, seed=1)
  bias = jnp.zeros(cfg.num_experts).at[jnp.array([3, 5])].set(10.0)
  if skew == 'one_hot_expert':   # half the tokens on 3+5, the rest on 3+random: expert 3 has all T
    bias = jnp.zeros(cfg.num_experts).at[3].set(10.0)
  chosen = ref_choose(args[0], args[1], bias, cfg)
  assert all(3 in c for c in chosen)
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg, r)(args)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


# ----------------------------------------------------------------------------- capacity mode

def test_capacity_dispatch_with_large_capacity_equals_reference_and_drops_nothing(single_mesh):
  cfg = moe_cfg(dispatch='capacity', capacity_factor=8.0, router_score='softmax')
  args, bias, r = make_inputs(cfg, seed=2)
  chosen = ref_choose(args[0], args[1], bias, cfg)
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg, r)(args)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


@pytest.mark.parametrize('capacity_factor', [0.5, 0.75])
def test_capacity_dispatch_drops_overflow_in_token_order_and_counts_it(single_mesh, capacity_factor):
  cfg = moe_cfg(dispatch='capacity', capacity_factor=capacity_factor, router_score='sigmoid')
  args, bias, r = make_inputs(cfg, seed=3)
  bias = bias.at[0].add(0.3)   # some skew so that several experts overflow
  chosen = ref_choose(args[0], args[1], bias, cfg)
  C = int(np.ceil(capacity_factor * T * cfg.top_k / cfg.num_experts))
  keep, n_dropped = ref_capacity_keep(chosen, C, cfg.num_experts)
  assert n_dropped > 0
  g_lib, (y_lib, dropped, _, _) = lib_value_and_grad(cfg, single_mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg, r, keep=keep)(args)
  assert float(dropped) == n_dropped
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


# ----------------------------------------------------------------------------- moe_ffn (model.py)

@pytest.mark.parametrize('num_shared_experts', [0, 2])
def test_moe_ffn_equals_reference_plus_shared_swiglu(single_mesh, num_shared_experts):
  cfg = moe_cfg(num_shared_experts=num_shared_experts, router_score='sigmoid')
  p = params.init_params(model.moe_specs(cfg), jax.random.key(4))
  p = jax.tree.map(lambda w: w * 15.0, p)   # init_std 0.02 is too small to exercise anything
  assert ('shared' in p) == bool(num_shared_experts)
  _, bias, r = make_inputs(cfg, seed=4)
  x_BTD = jax.random.normal(jax.random.key(5), (T_BATCH, T_SEQ, cfg.d_model))
  x_TD = x_BTD.reshape(T, -1)
  r_BTD = r.reshape(T_BATCH, T_SEQ, -1)

  def lib(x, p):
    y, aux = model.moe_ffn(p, bias, x, cfg, single_mesh, ('data', 'expert'))
    return jnp.sum(y * r_BTD), (y, aux['dropped'])

  chosen = ref_choose(x_TD, p['router'], bias, cfg)

  def ref(x, p):
    y = ref_moe(x, p['router'], p['w_gate'], p['w_up'], p['w_down'], chosen, cfg)
    if 'shared' in p:
      y = y + ref_swiglu(x, p['shared'])
    return jnp.sum(y * r), y

  g_lib, (y_lib, dropped) = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(x_BTD, p)
  g_ref, y_ref = jax.grad(ref, (0, 1), has_aux=True)(x_TD, p)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close(y_lib.reshape(T, -1), y_ref, **TOL)
  chex.assert_trees_all_close(g_lib[0].reshape(T, -1), g_ref[0], **TOL)
  chex.assert_trees_all_close(g_lib[1], g_ref[1], **TOL)


# ----------------------------------------------------------------------------- meshes

@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_routed_experts_outputs_and_grads_agree_across_meshes(dispatch):
  """1 device, data=8, data=2 x expert=4, expert=8 (and a 1-device mesh without 'expert')."""
  cfg = moe_cfg(dispatch=dispatch, capacity_factor=8.0, router_score='sigmoid')
  args, bias, r = make_inputs(cfg, seed=6)
  results = {}
  shapes = dict(MESH_SHAPES, data_only1={'data': 1})
  for name, shape in shapes.items():
    g, (y, dropped, _, _) = lib_value_and_grad(cfg, make_test_mesh(shape), bias, r)(args)
    assert float(dropped) == 0.0, name
    results[name] = (y, g)
  chosen = ref_choose(args[0], args[1], bias, cfg)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg, r)(args)
  for name, (y, g) in results.items():
    chex.assert_trees_all_close(y, y_ref, **TOL, custom_message=name)
    chex.assert_trees_all_close(g, g_ref, **TOL, custom_message=name)


def ref_capacity_keep_per_shard(chosen, C, num_experts, num_shards):
  """Capacity applies to each batch shard's tokens (GShard): the hand count run shard by shard."""
  n = len(chosen) // num_shards
  keep, dropped = [], 0
  for s in range(num_shards):
    k, d = ref_capacity_keep(chosen[s * n:(s + 1) * n], C, num_experts)
    keep += k
    dropped += d
  return keep, dropped


def test_capacity_dropped_count_is_summed_over_devices_under_expert_parallelism():
  """With expert=8 each device's 2 tokens form a capacity group; drops are summed over devices."""
  cfg = moe_cfg(dispatch='capacity', capacity_factor=0.5, router_score='sigmoid')
  args, bias, r = make_inputs(cfg, seed=3)
  bias = bias.at[0].add(10.0)   # every token picks expert 0: each device overflows it
  chosen = ref_choose(args[0], args[1], bias, cfg)
  C = int(np.ceil(0.5 * (T // 8) * cfg.top_k / cfg.num_experts))
  keep, n_dropped = ref_capacity_keep_per_shard(chosen, C, cfg.num_experts, 8)
  mesh = make_test_mesh(MESH_SHAPES['expert8'])
  _, (y, dropped, _, _) = lib_value_and_grad(cfg, mesh, bias, r)(args)
  assert n_dropped >= 8   # at least one per device, on expert 0
  assert float(dropped) == n_dropped
  chex.assert_trees_all_close(y, ref_moe(*args, chosen, cfg, keep=keep), **TOL)


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
  cfg = moe_cfg(router_score='sigmoid', top_k=2)
  n, D, E = 128, cfg.d_model, cfg.num_experts
  kx, kr = jax.random.split(jax.random.key(7))
  x = jax.random.normal(kx, (n, D)).at[:, 0].set(1.0)   # feature 0 is a constant 1
  router = jax.random.normal(kr, (D, E)) * 0.15
  router = router.at[0].set(0.0).at[0, 0].set(3.0).at[0, 1].set(2.0)   # most tokens -> 0 and 1

  def max_vio(load_E):
    return (load_E.max() - load_E.mean()) / load_E.mean()

  def step(bias_E, _):
    load_E = router_lib.route(x, router, bias_E, cfg, seq_len=n).load_E
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
  cfg = moe_cfg(router_score=router_score, top_k=2)
  (x, router, *_), bias, _ = make_inputs(cfg, seed=8)
  routing = router_lib.route(x, router, bias, cfg, seq_len=T_SEQ)
  E, K = cfg.num_experts, cfg.top_k
  s = ref_scores(x, router, cfg)
  chosen = ref_choose(x, router, bias, cfg)
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
  cfg = moe_cfg(router_score='softmax', top_k=2)
  E = cfg.num_experts
  routing = router_lib.route(jnp.zeros((E, cfg.d_model)), jnp.zeros((cfg.d_model, E)), jnp.zeros(E), cfg,
                      seq_len=E)
  np.testing.assert_allclose(routing.balance_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(routing.z_loss, np.log(E) ** 2, rtol=1e-6)
