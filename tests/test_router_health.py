"""Expert health diagnostics (output and update norms, routing churn) against naive numpy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import diagnostics
from moejax import router as router_lib


def test_expert_output_norm_is_the_mean_norm_over_the_probe_tokens_routed_to_each_expert():
  T, D, F, E, K = 12, 6, 5, 4, 2
  rng = np.random.default_rng(0)
  x = rng.standard_normal((T, D)).astype(np.float32)
  wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
  wd = rng.standard_normal((E, F, D)).astype(np.float32)
  expert_TK = np.array([[0, 1]] * 6 + [[1, 2]] * 6, np.int32)   # expert 3 gets no token
  got = np.asarray(diagnostics.expert_output_norm(*map(jnp.asarray, (x, expert_TK, wg, wu, wd)), probe=10))
  silu = lambda a: a / (1 + np.exp(-a))
  for e in range(E):
    norms = [np.linalg.norm((silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e]) for t in range(10) if e in expert_TK[t]]
    if norms:
      assert got[e] == pytest.approx(np.mean(norms), rel=1e-4)
    else:
      assert np.isnan(got[e])


def test_expert_update_norm_is_each_experts_parameter_change():
  rng = np.random.default_rng(1)
  old = {k: rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for k in ('w_gate', 'w_up', 'w_down')}
  new = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in old.items()}
  new['w_gate'][1, 2] = old['w_gate'][1, 2]
  got = np.asarray(diagnostics.expert_update_norm(old, new))
  for l in range(2):
    for e in range(3):
      want = np.sqrt(sum(((new[k][l, e] - old[k][l, e]) ** 2).sum() for k in old))
      assert got[l, e] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('routing', ['topk', 'threshold'])
def test_routing_churn_is_the_fraction_of_tokens_whose_expert_set_changed(routing):
  L, T, D, E = 2, 64, 8, 8
  cfg = router_lib.RouterConfig(num_experts=E, top_k=2, routing=routing)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((L, T, D)).astype(np.float32)
  w_old = rng.standard_normal((L, D, E)).astype(np.float32)
  w_new = w_old + rng.standard_normal((L, D, E)).astype(np.float32) * 0.3
  b_old = np.zeros((L, E), np.float32) - (0.5 if routing == 'threshold' else 0.0)
  b_new = b_old + rng.standard_normal((L, E)).astype(np.float32) * 0.05
  route = lambda x_TD, w, b: router_lib.route(x_TD, w, b, cfg, T).expert_TK
  got = np.asarray(diagnostics.routing_churn(route, jnp.asarray(x), (jnp.asarray(w_old), jnp.asarray(b_old)),
                                             (jnp.asarray(w_new), jnp.asarray(b_new))))
  sig = lambda a: 1 / (1 + np.exp(-a))
  for l in range(L):
    def sets(w, b):
      sel = sig(x[l] @ w) + b
      if routing == 'threshold':
        return [frozenset(np.argsort(-r)[:4][r[np.argsort(-r)[:4]] > 0]) for r in sel]
      return [frozenset(np.argsort(-r)[:2]) for r in sel]
    want = np.mean([a != b for a, b in zip(sets(w_old[l], b_old[l]), sets(w_new[l], b_new[l]))])
    assert got[l] == pytest.approx(want)
  assert 0 < got.max() < 1


def test_bias_oscillation_is_the_variance_over_steps_averaged_over_experts():
  bias_SLE = np.array([[[0.0, 1.0]], [[0.2, 1.0]], [[0.4, 1.0]]])
  assert diagnostics.bias_oscillation(bias_SLE) == pytest.approx(np.var([0.0, 0.2, 0.4]) / 2)


def test_summarize_logs_health_and_per_expert_biases():
  L, E = 2, 4
  out = {'load_LE': np.ones((L, E)), 'router_bias': np.arange(L * E, dtype=float).reshape(L, E),
         'routing_churn': np.array([0.1, 0.3]), 'expert_out_norm': np.array([[1.0, np.nan, 2.0, 3.0]] * L),
         'expert_update_norm': np.array([[1.0, 1.0, 1.0, 5.0]] * L), 'router_momentum': -np.ones((L, E))}
  record, layers = diagnostics.summarize(out, np.ones((L, E)), E)
  assert record['moe/routing_churn'] == pytest.approx(0.2)
  assert record['moe/expert_out_norm'] == pytest.approx(2.0)
  assert record['moe/expert_update_norm_max_ratio'] == pytest.approx(5.0 / 2.0)
  assert record['moe/bias_momentum_abs'] == 1.0
  assert layers['router_bias'] == out['router_bias'].tolist() and layers['expert_out_norm'][0][1] is None


@pytest.mark.slow   # a train-step compile of the smoke model
def test_train_step_with_smebu_carries_momentum_and_logs_expert_health():
  from experiments import smoke
  from moejax.state import init_state, setup
  from moejax.train import make_train_step
  c = smoke.get_config()
  c.mesh.data, c.mesh.expert = 1, 1
  c.train.batch_size, c.train.seq_len = 2, 16
  c.model.router.balancer = 'smebu'
  s = setup(c, devices=jax.devices()[:1])
  tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (2, 17))
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32), 'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
           'loss_mask': jnp.ones((2, 16), jnp.float32),
           'segment_ids': jnp.ones((2, 16), jnp.int32), 'positions': jnp.tile(jnp.arange(16), (2, 1))}
  state = init_state(s)
  new, out = make_train_step(s, diagnostics=True)(state, batch)
  assert float(jnp.abs(new['router_momentum']).sum()) > 0
  L, E = new['router_bias'].shape
  assert out['routing_churn'].shape == (L,) and out['expert_update_norm'].shape == (L, E)
  assert float(out['expert_update_norm'].min()) >= 0 and out['expert_out_norm'].shape == (L, E)
