"""Router lab: balance losses, bias update controls, zero-computation experts, diagnostics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_test_mesh, numpy_init_params, tiny_model_config
from moejax import diagnostics, flops, model, params
from moejax import router as router_lib
from moejax.sharding import named


def test_sequence_balance_loss_matches_a_hand_computed_example():
  # 2 sequences x 2 tokens, 2 experts, top-1. Seq 0: both tokens -> expert 0; seq 1: one each.
  scores_TE = jnp.array([[0.6, 0.2], [0.5, 0.5], [0.3, 0.1], [0.2, 0.2]])
  chosen_TE = jnp.array([[1., 0.], [1., 0.], [1., 0.], [0., 1.]])
  # seq 0: f = 2/(1*2) * [2, 0] = [2, 0]; P = mean([.75,.25],[.5,.5]) = [.625,.375] -> 1.25
  # seq 1: f = [1, 1]; P = mean([.75,.25],[.5,.5]) = [.625,.375] -> 1.0
  got = router_lib.balance_loss(chosen_TE, scores_TE, K=1, group_size=2)
  np.testing.assert_allclose(float(got), (1.25 + 1.0) / 2, rtol=1e-6)
  # global scope: f = 2/4 * [3, 1] = [1.5, .5]; P = [.625, .375] -> .9375 + .1875
  got = router_lib.balance_loss(chosen_TE, scores_TE, K=1, group_size=4)
  np.testing.assert_allclose(float(got), 1.125, rtol=1e-6)


def test_global_batch_balance_loss_is_the_same_when_the_batch_is_split_over_data_devices():
  cfg = tiny_model_config(loss=dict(balance_scope='global'))
  key = jax.random.key(0)
  x_TD = jax.random.normal(key, (8 * 16, cfg.d_model))
  w_DE = jax.random.normal(jax.random.fold_in(key, 1), (cfg.d_model, cfg.num_experts)) * 0.3
  bias = jnp.zeros((cfg.num_experts,))
  f = jax.jit(lambda x: router_lib.route(x, w_DE, bias, cfg.router, seq_len=16).balance_loss)
  one = float(f(x_TD))
  mesh = make_test_mesh({'data': 8, 'expert': 1})
  split = float(f(jax.device_put(x_TD, named(mesh, ('batch', None), {'batch': 'data'}))))
  np.testing.assert_allclose(split, one, rtol=1e-6)
  # and it is not the mean of per-device (per-sequence-group) losses
  per_group = np.mean([float(router_lib.route(x_TD[i * 16:(i + 1) * 16], w_DE, bias, cfg.router, 16).balance_loss)
                       for i in range(8)])
  assert abs(per_group - one) > 1e-4


def test_hidden_z_loss_matches_a_hand_computed_example():
  x = jnp.array([[[1.0, -2.0], [0.0, 0.0]]])
  expect = (np.log(np.e + np.e ** 2) ** 2 + np.log(2.0) ** 2) / 2
  np.testing.assert_allclose(float(model.hidden_z_loss(x)), expect, rtol=1e-6)


def test_proportional_bias_update_follows_the_longcat_formula_and_centring_zeroes_the_mean():
  load = jnp.array([[6., 2., 0., 0.]])           # K=2 over 4 tokens: 8 assignments, target 2 each
  got = router_lib.update_router_bias(jnp.zeros((1, 4)), load, 0.1, mode='proportional', top_k=2)
  np.testing.assert_allclose(np.asarray(got), 0.1 * (2 - np.array([[6., 2., 0., 0.]])) / 8, rtol=1e-6)
  got = router_lib.update_router_bias(jnp.zeros((1, 4)), load, 0.1, mode='sign', center=True)
  np.testing.assert_allclose(np.asarray(got).sum(), 0.0, atol=1e-7)


def test_linear_bias_rate_schedule_decays_to_the_final_fraction():
  cfg = tiny_model_config(bias_update_rate=0.01,
                          router=dict(bias_update_schedule='linear', bias_update_final=0.1)).router
  assert float(router_lib.bias_rate(cfg, 0, 100)) == pytest.approx(0.01)
  assert float(router_lib.bias_rate(cfg, 50, 100)) == pytest.approx(0.0055)
  assert float(router_lib.bias_rate(cfg, 100, 100)) == pytest.approx(0.001)


@pytest.mark.parametrize('router_options', [
    dict(), dict(bias_update_mode='proportional', bias_center=True),
    dict(bias_update_schedule='linear', bias_update_final=0.1),
    dict(num_zero_experts=4, target_active_experts=1.5, bias_update_mode='proportional')])
def test_update_bias_is_the_configured_update_router_bias_step(router_options):
  """The train step's update (router.update_bias) = update_router_bias at bias_rate(step) with the
  RouterConfig's mode, centring and zero-expert target (top_k real experts when there are none)."""
  cfg = tiny_model_config(bias_update_rate=0.01, router=router_options).router
  E = cfg.num_routed
  load = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, E)), jnp.float32)
  bias = jnp.asarray(np.random.default_rng(1).standard_normal((2, E)), jnp.float32) * 0.1
  got = router_lib.update_bias(bias, load, cfg, 30, 100)
  rate = 0.01 * (1 - 0.9 * 0.3) if cfg.bias_update_schedule == 'linear' else 0.01
  want = router_lib.update_router_bias(
      bias, load, rate, num_real=cfg.num_experts, target_active=cfg.target_active_experts or cfg.top_k,
      mode=cfg.bias_update_mode, center=cfg.bias_center, top_k=cfg.top_k)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  assert not np.allclose(np.asarray(got), np.asarray(bias))


def _zero_expert_setup(**kw):
  cfg = tiny_model_config(router=dict(num_zero_experts=4, target_active_experts=1.0, **kw), num_shared_experts=0)
  p = params.init_params(model.moe_specs(cfg), jax.random.key(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
  return cfg, p, x_BTD


def test_zero_computation_experts_return_their_input_and_cost_no_expert_flops():
  cfg, p, x_BTD = _zero_expert_setup(norm_topk=True)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  bias = jnp.concatenate([jnp.full((cfg.num_experts,), -10.0), jnp.zeros((4,))])  # only zero experts
  y_BTD, aux = model.moe_ffn(p, bias, x_BTD, cfg, mesh, (), diagnostics=True)
  np.testing.assert_allclose(np.asarray(y_BTD), np.asarray(x_BTD), rtol=1e-5, atol=1e-6)  # weights sum to 1
  assert float(aux.router_stats['active_experts_per_token']) == 0.0
  assert float(aux.load_E[:cfg.num_experts].sum()) == 0.0
  base = flops.forward_flops_per_token(cfg, 8, active_experts_per_token=0.0)
  two = flops.forward_flops_per_token(cfg, 8, active_experts_per_token=2.0)
  moe_layers = cfg.num_moe_layers
  assert two - base == pytest.approx(moe_layers * 2 * 2 * 3 * cfg.d_model * cfg.expert_ffn_dim)


def test_bias_steers_mean_active_experts_per_token_to_the_target():
  cfg = tiny_model_config(router=dict(num_zero_experts=4, target_active_experts=0.6), top_k=2)
  E = cfg.num_experts + 4
  x_TD = jax.random.normal(jax.random.key(2), (512, cfg.d_model))
  w_DE = jax.random.normal(jax.random.key(3), (cfg.d_model, E)) * 0.3
  step = jax.jit(lambda b: (router_lib.update_router_bias(
      b[None], router_lib.route(x_TD, w_DE, b, cfg.router, 64).load_E[None], 0.01,
      num_real=cfg.num_experts, target_active=0.6, top_k=2)[0],
      router_lib.stats(x_TD, w_DE, b, cfg.router)['active_experts_per_token']))
  bias, real = jnp.zeros((E,)), []
  for _ in range(300):
    bias, r = step(bias)
    real.append(float(r))
  assert real[0] > 1.1                          # ~2 * 8/12 real experts per token at first
  assert abs(np.mean(real[-50:]) - 0.6) < 0.1, np.mean(real[-50:])
  assert np.all(np.asarray(bias[cfg.num_experts:]) == 0.0)   # zero experts' biases stay fixed


def test_router_stats_match_a_hand_computed_case():
  scores = jnp.array([[0.5, 0.25, 0.25], [0.6, 0.3, 0.1]])
  selection = scores + jnp.array([0.0, 0.1, 0.0])
  expert_TK = jnp.array([[0, 1], [0, 1]])
  stats = router_lib.router_stats(scores, selection, expert_TK, num_real=2)
  p = np.asarray(scores) / np.asarray(scores).sum(-1, keepdims=True)
  np.testing.assert_allclose(float(stats['entropy']), np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-6)
  # selection rows: [.5, .35, .25] and [.6, .4, .1]
  np.testing.assert_allclose(float(stats['top1_margin']), np.mean([0.15, 0.2]), rtol=1e-5)
  np.testing.assert_allclose(float(stats['topk_margin']), np.mean([0.1, 0.3]), rtol=1e-5)
  assert float(stats['active_experts_per_token']) == 2.0   # experts 0 and 1 are real
  stats = router_lib.router_stats(scores, selection, jnp.array([[0, 2], [2, 1]]), num_real=2)
  assert float(stats['active_experts_per_token']) == 1.0
  np.testing.assert_allclose(np.asarray(stats['real_experts_hist']), [0.0, 1.0, 0.0])


def test_maxvio_dead_experts_and_expert_similarity_match_hand_computed_cases():
  np.testing.assert_allclose(diagnostics.maxvio_L(np.array([[4., 2., 0., 2.]])), [1.0])
  w = jnp.stack([jnp.eye(3)[0], jnp.eye(3)[0], jnp.eye(3)[1]])[None]   # experts 0 and 1 identical
  moe_params = {'w_gate': w[..., None], 'w_up': w[..., None], 'w_down': w[:, :, None, :]}
  sim = diagnostics.expert_similarity(moe_params)
  np.testing.assert_allclose(float(sim['expert_cos_max'][0]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sim['expert_cos_mean'][0]), 2 / 6, rtol=1e-6)   # pairs: 1, 0, 0
  record, layers = diagnostics.summarize(
      {'load_LE': np.array([[4., 2., 0., 2.]]), 'router_bias': np.zeros((1, 4)),
       'grad_norm_ratio': np.array([0.2]), 'grad_norm_ratio_unit': np.array([2.0])},
      np.array([[8., 3., 0., 1.]]), num_real=4)
  assert record['moe/dead_experts'] == 1 and record['moe/maxvio'] == 1.0
  np.testing.assert_allclose(record['moe/maxvio_global'], (8 - 3) / 3, rtol=1e-6)


def test_gradient_norm_ratio_separates_the_balance_gradient_from_the_lm_gradient():
  g_lm = jnp.ones((2, 3, 4))                       # |g_lm| = sqrt(12) per layer
  g_bal_unit_raw = 2.0 * jnp.ones((2, 3, 4))       # per layer before the 1/L of the mean over layers
  coef = jnp.array([0.1, 0.0])
  total = g_lm + coef[:, None, None] * g_bal_unit_raw / 2
  ratio, unit = diagnostics.gradient_norm_ratio(total, {'balance': g_bal_unit_raw}, coef, 0.0)
  np.testing.assert_allclose(np.asarray(ratio), [0.1, 0.0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(unit), [1.0, 1.0], rtol=1e-5)
  new = diagnostics.adapt_balance_coef(coef, jnp.array([0.4, 0.0]), target=0.1, max_coef=0.1)
  np.testing.assert_allclose(np.asarray(new), [0.05, 0.0], rtol=1e-6)   # halved (the floor), 0 stays 0


def test_train_step_gradient_norm_ratio_matches_separate_gradients():
  """R from the train step's decomposition equals R from two separately taken gradients."""
  cfg = tiny_model_config(loss=dict(balance_weight=0.05), num_layers=2, num_dense_layers=0)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  tok = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  batch = {'inputs': tok, 'targets': jnp.roll(tok, -1, 1), 'loss_mask': jnp.ones((2, 16))}
  bias = jnp.zeros((2, cfg.num_experts))
  (_, aux), g = jax.jit(jax.value_and_grad(
      lambda q: model.loss_fn(q, bias, batch, cfg, mesh, diagnostics=True), has_aux=True))(p)
  # as the train step's diagnostics variant takes it (moejax.train.make_train_step)
  ratio, _ = diagnostics.gradient_norm_ratio(model.moe_layer_leaf(g['moe_blocks'], ('ffn', 'router'), cfg),
                                             aux.moe.router_grads, jnp.full((2,), 0.05), 0.0)
  lm_cfg = tiny_model_config(loss=dict(balance_weight=0.0), num_layers=2, num_dense_layers=0)
  g_lm = jax.jit(jax.grad(lambda q: model.loss_fn(q, bias, batch, lm_cfg, mesh)[0]))(p)['moe_blocks']['ffn']['router']
  g_bal = g['moe_blocks']['ffn']['router'] - g_lm   # includes indirect paths through later layers
  direct = 0.05 / 2 * aux.moe.router_grads['balance']
  expect = np.linalg.norm(np.asarray(direct).reshape(2, -1), axis=1) / np.linalg.norm(
      np.asarray(g['moe_blocks']['ffn']['router'] - direct).reshape(2, -1), axis=1)
  np.testing.assert_allclose(np.asarray(ratio), expect, rtol=1e-5)
  # the last layer's balance loss reaches its router only directly
  np.testing.assert_allclose(np.asarray(g_bal[-1]), np.asarray(direct[-1]), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize('aligned', [True, False])
def test_variance_alignment_keeps_routed_output_variance_across_granularity(aligned):
  """At fixed active parameters (top_k * expert_ffn_dim = 512), 8 -> 256 experts."""
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  x_BTD = jax.random.normal(jax.random.key(0), (4, 128, 64))
  var = {}
  for E, K in ((8, 2), (32, 8), (128, 32), (256, 64)):
    cfg = tiny_model_config(d_model=64, num_experts=E, top_k=K, expert_ffn_dim=512 // K,
                            num_shared_experts=0, variance_alignment=aligned, init_std=0.02)
    p = params.init_params(model.moe_specs(cfg), jax.random.key(E))
    y, _ = jax.jit(lambda p, x: model.moe_ffn(p, jnp.zeros((E,)), x, cfg, mesh, ()))(p, x_BTD)
    var[E] = float(jnp.var(y))
  spread = max(var.values()) / min(var.values())
  if aligned:
    assert spread < 1.2, var
  else:
    assert spread > 100, var                     # without it the output shrinks ~K^2


@pytest.mark.parametrize('aligned', [True, False])
def test_variance_alignment_keeps_mla_key_value_variance_across_latent_ranks(aligned):
  """The up-projected keys/values (and queries) have the same variance at kv/q ranks 16 -> 128."""
  from moejax.attention import ATTENTIONS, latent_scale
  from moejax.layers import dense, rms_norm
  x_BTD = jax.random.normal(jax.random.key(0), (2, 64, 128))
  var = {}
  for C in (16, 64, 128):
    cfg = tiny_model_config(d_model=128, attention='mla', attn=dict(num_heads=4),
                            mla=dict(kv_lora_rank=C, q_lora_rank=C, qk_nope_head_dim=16,
                                     qk_rope_head_dim=16, v_head_dim=32),
                            variance_alignment=aligned).attn
    p = params.init_params(ATTENTIONS['mla'].specs(cfg), jax.random.key(1))
    latent = rms_norm(dense(x_BTD, p['wkv_a'])[..., :C], p['kv_norm'], cfg.norm_eps)
    q_lat = rms_norm(dense(x_BTD, p['wq_a']), p['q_norm'], cfg.norm_eps)
    var[C] = (float(jnp.var(dense(latent * latent_scale(cfg, C), p['wkv_b']))),
              float(jnp.var(dense(q_lat * latent_scale(cfg, C), p['wq_b']))))
  for i in range(2):
    spread = max(v[i] for v in var.values()) / min(v[i] for v in var.values())
    assert (spread < 1.2) if aligned else (spread > 4), var


def test_scmoe_block_matches_a_naive_composition_of_its_sub_blocks():
  from moejax.attention import ATTENTIONS
  from moejax.layers import rms_norm, swiglu
  cfg = tiny_model_config(block='scmoe', num_layers=1, num_dense_layers=0)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  tok = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  bias = jax.random.normal(jax.random.key(2), (1, cfg.num_experts)) * 0.1
  logits, _ = jax.jit(lambda p: model.forward(p, bias, tok, cfg, mesh))(p)

  b = jax.tree.map(lambda a: a[0], p['moe_blocks'])
  norm = lambda x, s: rms_norm(x, s, cfg.norm_eps)
  attn = lambda *a: ATTENTIONS[cfg.attention].apply(*a)[0]
  x = p['embed'][tok]
  h1 = x + attn(b['attn'], norm(x, b['attn_norm']), cfg.attn)
  moe_out, _ = model.moe_ffn(b['ffn'], bias[0], norm(h1, b['ffn_norm']), cfg, mesh, ())
  h2 = h1 + swiglu(b['dense'], norm(h1, b['dense_norm']))
  h3 = h2 + attn(b['attn2'], norm(h2, b['attn2_norm']), cfg.attn)
  h4 = h3 + swiglu(b['dense2'], norm(h3, b['dense2_norm']))
  expect = norm(h4 + moe_out, p['final_norm']) @ p['head']
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expect), rtol=1e-4, atol=1e-5)


def test_scmoe_losses_agree_on_one_device_and_an_expert_parallel_mesh():
  cfg = tiny_model_config(block='scmoe')
  p = numpy_init_params(model.model_specs(cfg), 0)
  tok = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
  batch = {'inputs': tok, 'targets': jnp.roll(tok, -1, 1), 'loss_mask': jnp.ones((8, 16))}
  bias = jnp.zeros((2, cfg.num_experts))
  losses = [float(jax.jit(lambda q, m=m: model.loss_fn(q, bias, batch, cfg, m)[0])(p))
            for m in (make_test_mesh({'data': 1, 'expert': 1}), make_test_mesh({'data': 2, 'expert': 4}))]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
