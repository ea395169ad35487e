"""Quantile balancing, SMEBU, expert-threshold routing and null experts against naive numpy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_test_mesh, tiny_model_config
from moejax import balancers, model, params
from moejax import router as router_lib
from moejax.errors import ConfigError


def _scores(T=256, E=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((T, E)).astype(np.float32)


def _naive_top_k_sets(sel_TE, K):
  return [set(np.argsort(-row, kind='stable')[:K]) for row in sel_TE]


def test_kth_largest_count_leaves_exactly_count_entries_above_it():
  v_TE = _scores(64, 5)
  count_E = np.array([1.0, 3.2, 10.0, 31.6, 63.0], np.float32)
  got = np.asarray(balancers.kth_largest_count(jnp.asarray(v_TE), jnp.asarray(count_E)))
  for e in range(5):
    c = int(np.clip(np.round(count_E[e]), 1, 63))
    desc = np.sort(v_TE[:, e])[::-1]
    assert got[e] == pytest.approx(0.5 * (desc[c - 1] + desc[c]))
    assert int((v_TE[:, e] > got[e]).sum()) == c


def test_selection_margin_is_positive_exactly_for_the_top_k_experts():
  sel_TE, K = _scores(128, 8), 2
  margin_TE = np.asarray(balancers.selection_margins(jnp.asarray(sel_TE), K))
  sets = _naive_top_k_sets(sel_TE, K)
  for t in range(128):
    for e in range(8):
      others = np.sort(np.delete(sel_TE[t], e))[::-1]
      assert margin_TE[t, e] == pytest.approx(sel_TE[t, e] - others[K - 1], abs=1e-6)
      assert (margin_TE[t, e] > 0) == (e in sets[t])


def test_quantile_target_gives_each_expert_its_target_load_when_the_others_stay_put():
  """The column update: moving one expert's bias to its target, the others fixed, gives it exactly
  its target load (naive loop over tokens)."""
  T, E, K = 256, 8, 2
  s_TE = _scores(T, E, 1) * 0.3
  bias_E = np.random.default_rng(2).standard_normal(E).astype(np.float32) * 0.1
  target_E = np.full(E, T * K / E, np.float32)
  new_E = np.asarray(balancers.quantile_bias_target(jnp.asarray(s_TE + bias_E), jnp.asarray(bias_E),
                                                    jnp.asarray(target_E), K))
  for e in range(E):
    b = bias_E.copy()
    b[e] = new_E[e]
    load = sum(e in chosen for chosen in _naive_top_k_sets(s_TE + b, K))
    assert load == T * K // E


@pytest.mark.parametrize('E', [16, 64])
def test_quantile_balancing_equalises_loads_in_a_few_steps_where_the_sign_rule_needs_many(E):
  T, K = 2048, 2
  x_TD = jax.random.normal(jax.random.key(0), (T, 32)) + 0.5   # a common direction: skewed loads
  w_DE = jax.random.normal(jax.random.key(1), (32, E)) * 0.6
  maxvio = lambda load: float((load.max() - load.mean()) / load.mean())
  cfg = router_lib.RouterConfig(num_experts=E, top_k=K, balancer='quantile')
  b = jnp.zeros((1, E))
  for step in range(5):
    routing = router_lib.route(x_TD, w_DE, b[0], cfg, T)
    b = balancers.smoothed(b, router_lib.bias_target(routing, b[0], cfg)[None], 0.0, step)
  quantile = maxvio(router_lib.route(x_TD, w_DE, b[0], cfg, T).load_E)
  assert maxvio(router_lib.route(x_TD, w_DE, jnp.zeros(E), cfg, T).load_E) > 0.5
  assert quantile < 0.2
  sign = jnp.zeros((1, E))
  for _ in range(5):
    sign = router_lib.update_router_bias(sign, router_lib.route(x_TD, w_DE, sign[0], cfg, T).load_E[None], 1e-2)
  assert maxvio(router_lib.route(x_TD, w_DE, sign[0], cfg, T).load_E) > 2 * quantile


def test_smebu_matches_a_naive_loop_and_its_updates_are_centred_and_bounded():
  L, E, rate, kappa, beta = 2, 6, 0.01, 2.0, 0.9
  rng = np.random.default_rng(3)
  load = rng.integers(0, 20, (L, E)).astype(np.float32)
  target = np.broadcast_to(load.mean(-1, keepdims=True), (L, E)).astype(np.float32)
  bias, mom = rng.standard_normal((L, E)).astype(np.float32), rng.standard_normal((L, E)).astype(np.float32) * 0.1
  got_b, got_m = balancers.smebu_update(jnp.asarray(bias), jnp.asarray(mom), jnp.asarray(load), jnp.asarray(target),
                                        rate, kappa, beta, E)
  for l in range(L):
    u = [np.tanh(kappa * (target[l, e] - load[l, e]) / target[l, e]) for e in range(E)]
    u = [v - sum(u) / E for v in u]
    for e in range(E):
      m = beta * mom[l, e] + (1 - beta) * u[e]
      assert float(got_m[l, e]) == pytest.approx(m, rel=1e-5, abs=1e-7)
      assert float(got_b[l, e]) == pytest.approx(bias[l, e] + rate * m, rel=1e-5, abs=1e-7)
  step_LE = np.asarray(balancers.smebu_update(jnp.zeros((L, E)), jnp.zeros((L, E)), jnp.asarray(load),
                                              jnp.asarray(target), rate, kappa, 0.0, E)[0])
  np.testing.assert_allclose(step_LE.mean(-1), 0.0, atol=1e-8)
  assert np.abs(step_LE).max() <= 2 * rate


def test_update_state_dispatches_on_the_controller_and_keeps_the_sign_rule_by_default():
  E = 8
  load = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, E)), jnp.float32)
  bias = jnp.zeros((2, E))
  aux = model.MoEAux(load, None, None, None, bias_target=jnp.ones((2, E)))
  cfg = router_lib.RouterConfig(num_experts=E, top_k=2)
  np.testing.assert_array_equal(router_lib.update_state({'router_bias': bias}, aux, cfg, 3, 10)['router_bias'],
                                router_lib.update_bias(bias, load, cfg, 3, 10))
  q = router_lib.RouterConfig(num_experts=E, top_k=2, balancer='quantile', quantile_ema=0.75)
  np.testing.assert_allclose(router_lib.update_state({'router_bias': bias}, aux, q, 0, 10)['router_bias'], 1.0)
  np.testing.assert_allclose(router_lib.update_state({'router_bias': bias}, aux, q, 3, 10)['router_bias'], 0.25)
  s = router_lib.RouterConfig(num_experts=E, top_k=2, balancer='smebu')
  new = router_lib.update_state({'router_bias': bias, 'router_momentum': bias}, aux, s, 3, 10)
  assert set(new) == {'router_bias', 'router_momentum'} and float(jnp.abs(new['router_momentum']).sum()) > 0


def test_threshold_routing_sends_each_token_to_every_expert_over_its_threshold():
  T, D, E, K = 64, 16, 8, 2
  cfg = router_lib.RouterConfig(num_experts=E, top_k=K, routing='threshold', threshold_max_k=E)
  x_TD = np.random.default_rng(4).standard_normal((T, D)).astype(np.float32)
  w_DE = np.random.default_rng(5).standard_normal((D, E)).astype(np.float32) * 0.5
  theta_E = np.random.default_rng(6).uniform(0.4, 0.8, E).astype(np.float32)
  r = router_lib.route(jnp.asarray(x_TD), jnp.asarray(w_DE), jnp.asarray(-theta_E), cfg, T)
  s_TE = 1 / (1 + np.exp(-(x_TD @ w_DE)))
  for t in range(T):
    want = {e for e in range(E) if s_TE[t, e] > theta_E[t * 0 + e]}
    got = {int(e) for e in np.asarray(r.expert_TK[t]) if e < E}
    assert got == want
    w = np.asarray(r.weight_TK[t])
    if want:
      assert w.sum() == pytest.approx(1.0, rel=1e-5)
      for k, e in enumerate(np.asarray(r.expert_TK[t])):
        if e < E:
          assert w[k] == pytest.approx(s_TE[t, e] / sum(s_TE[t, j] for j in want), rel=1e-4)
    else:
      assert w.sum() == 0.0
  np.testing.assert_array_equal(np.asarray(r.load_E), [sum(s_TE[:, e] > theta_E[e]) for e in range(E)])


def test_threshold_from_a_batch_gives_k_experts_per_token_on_average_on_that_batch():
  T, E, K = 1024, 16, 2
  cfg = router_lib.RouterConfig(num_experts=E, top_k=K, routing='threshold')
  x_TD = jax.random.normal(jax.random.key(7), (T, 32))
  w_DE = jax.random.normal(jax.random.key(8), (32, E)) * 0.3
  r0 = router_lib.route(x_TD, w_DE, jnp.zeros(E), cfg, T)
  bias_E = router_lib.bias_target(r0, jnp.zeros(E), cfg)
  s_TE = np.asarray(r0.scores_TE)
  for e in range(E):   # naive: the threshold leaves K*T/E of the batch's scores above it
    assert int((s_TE[:, e] > -float(bias_E[e])).sum()) == T * K // E
  r = router_lib.route(x_TD, w_DE, bias_E, cfg, T)
  stats = router_lib.routing_stats(r, cfg)
  assert float(r.load_E.sum()) / T == pytest.approx(K, abs=0.15)   # capped at threshold_max_k = 2K
  assert float(stats['active_experts_per_token']) == pytest.approx(float(r.load_E.sum()) / T)


def test_null_experts_add_nothing_where_identity_experts_add_the_token():
  base = dict(num_zero_experts=4, target_active_experts=1.0)
  out = {}
  for kind in ('identity', 'null'):
    cfg = tiny_model_config(router=dict(base, zero_expert_kind=kind), num_shared_experts=0)
    p = params.init_params(model.moe_specs(cfg), jax.random.key(0))
    x_BTD = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
    bias = jnp.concatenate([jnp.full((cfg.num_experts,), -10.0), jnp.zeros((4,))])   # only zero experts
    out[kind] = model.moe_ffn(p, bias, x_BTD, cfg, make_test_mesh({'data': 1, 'expert': 1}), ())[0]
  np.testing.assert_allclose(np.asarray(out['identity']), np.asarray(x_BTD), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out['null']), 0.0)


@pytest.mark.parametrize('router, names', [
    (dict(balancer='sinkhorn'), 'model.router.balancer'),
    (dict(routing='expert_choice'), 'model.router.routing'),
    (dict(balancer='smebu', num_zero_experts=2, target_active_experts=1.0), 'model.router.balancer'),
    (dict(routing='threshold', balancer='quantile'), 'model.router.balancer'),
    (dict(routing='threshold', threshold_max_k=1), 'model.router.threshold_max_k'),
    (dict(routing='threshold', force_balance=True), 'model.router.force_balance'),
    (dict(quantile_ema=1.0), 'model.router.quantile_ema'),
])
def test_bad_controller_settings_fail_with_one_line_naming_the_field(router, names):
  with pytest.raises(ConfigError) as e:
    tiny_model_config(router=router)
  assert names in str(e.value) and '\n' not in str(e.value)
