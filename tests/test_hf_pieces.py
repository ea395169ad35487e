"""The architecture pieces Hugging Face MoE models need, each against a naive numpy reference written
from the papers' / transformers' definitions: group-limited routing (DeepSeek-V2 max, V3 top-2 sum),
YaRN frequencies and attention factor, interleaved-pair RoPE, q/k norm over the whole projection,
q/k/v biases, and Qwen2-MoE's gated shared expert (forward and gradient)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers, router
from moejax.attention.config import AttentionConfig
from moejax.attention.softmax import gqa_qkv


def ref_group_topk(sel, n_group, topk_group, k, score):
  """Per token: group scores, the topk_group best groups, top-k among their experts (a loop)."""
  T, E = sel.shape
  out = []
  for t in range(T):
    groups = sel[t].reshape(n_group, E // n_group)
    g = np.sort(groups, axis=1)[:, -2:].sum(1) if score == 'top2_sum' else groups.max(1)
    keep = set(np.argsort(-g, kind='stable')[:topk_group])
    allowed = [e for e in range(E) if e // (E // n_group) in keep]
    out.append(sorted(sorted(allowed, key=lambda e: -sel[t, e])[:k]))
  return np.array(out)


@pytest.mark.parametrize('score,group_score', [('sigmoid', 'top2_sum'), ('softmax', 'max')])
def test_group_limited_routing_picks_top_k_within_the_best_groups(score, group_score):
  rng = np.random.default_rng(0)
  T, D, E, K = 64, 8, 16, 3
  cfg = router.RouterConfig(num_experts=E, top_k=K, score=score, norm_topk=score == 'sigmoid',
                            routed_scaling=2.5, n_group=4, topk_group=2, group_score=group_score)
  x, w = rng.standard_normal((T, D), np.float32), rng.standard_normal((D, E), np.float32)
  bias = 0.3 * rng.standard_normal(E).astype(np.float32)
  r = router.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), cfg, seq_len=T)
  logits = x @ w
  scores = 1 / (1 + np.exp(-logits)) if score == 'sigmoid' else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = ref_group_topk(scores + bias, 4, 2, K, group_score)
  np.testing.assert_array_equal(np.sort(np.asarray(r.expert_TK), 1), want)
  weights = np.take_along_axis(scores, np.asarray(r.expert_TK), 1)
  if score == 'sigmoid':
    weights = weights / weights.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(r.weight_TK), weights * 2.5, rtol=1e-5)
  off = router.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias),
                     router.RouterConfig(num_experts=E, top_k=K, score=score), seq_len=T)
  assert not np.array_equal(np.sort(np.asarray(off.expert_TK), 1), want)   # the groups matter here


def ref_yarn(N, theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim):
  """YaRN (Peng et al. 2023, as DeepSeek-V3's reference code writes it) in float64 numpy."""
  dim_of = lambda rot: N * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
  low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), N - 1)
  freqs = 1.0 / theta ** (np.arange(0, N, 2) / N)
  ramp = np.clip((np.arange(N // 2) - low) / max(high - low, 1e-3), 0, 1)
  inv = freqs / factor * ramp + freqs * (1 - ramp)
  m = lambda s: 0.1 * s * math.log(factor) + 1.0
  return inv, (m(mscale) / m(mscale_all_dim)) if mscale_all_dim else m(1.0)


@pytest.mark.parametrize('mscale_all_dim', [0.0, 0.707])
def test_yarn_frequencies_and_attention_factor_match_the_reference(mscale_all_dim):
  cfg = AttentionConfig(d_model=64, num_layers=1, head_dim=32, rope_theta=10000.0, yarn_factor=40.0,
                        yarn_original_max_len=4096, yarn_mscale=1.0, yarn_mscale_all_dim=mscale_all_dim)
  inv, factor = layers.rope_frequencies(32, cfg)
  want_inv, want_factor = ref_yarn(32, 10000.0, 40.0, 4096, 32.0, 1.0, 1.0, mscale_all_dim)
  np.testing.assert_allclose(np.asarray(inv), want_inv, rtol=1e-5)
  assert factor == pytest.approx(want_factor)
  plain, one = layers.rope_frequencies(32, AttentionConfig(d_model=64, num_layers=1, head_dim=32))
  np.testing.assert_allclose(np.asarray(plain), 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
  assert one == 1.0


def ref_rope_pairs(x_TN, theta):
  """Interleaved pairs (x_2i, x_2i+1) rotated by angle t * theta^(-2i/N): complex multiplication."""
  T, N = x_TN.shape
  z = x_TN[:, 0::2] + 1j * x_TN[:, 1::2]
  angle = np.arange(T)[:, None] * theta ** (-np.arange(0, N, 2) / N)[None]
  return z * np.exp(1j * angle)


def test_pair_rope_gives_the_complex_rotation_of_interleaved_pairs():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 7, 1, 8)).astype(np.float32)
  cfg = AttentionConfig(d_model=16, num_layers=1, head_dim=8, rope_layout='pairs')
  got = np.asarray(layers.rope(jnp.asarray(x), cfg))[0, :, 0]
  z = ref_rope_pairs(x[0, :, 0].astype(np.float64), 10000.0)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
  # scores (what attention sees) equal those of the interleaved output
  q, k = got, np.asarray(layers.rope(jnp.asarray(x[:, ::-1].copy()), cfg))[0, :, 0]
  zk = ref_rope_pairs(x[0, ::-1, 0].astype(np.float64), 10000.0)
  np.testing.assert_allclose(q @ k.T, (z @ np.conj(zk).T).real, rtol=1e-4, atol=1e-4)


def test_projection_qk_norm_and_qkv_bias_follow_their_definitions():
  rng = np.random.default_rng(2)
  B, T, D, H, G, N = 2, 5, 16, 4, 2, 8
  cfg = AttentionConfig(d_model=D, num_layers=1, num_heads=H, num_kv_heads=G, head_dim=N, qk_norm=True,
                        qk_norm_scope='projection', qkv_bias=True, norm_eps=1e-6)
  p = {'wq': rng.standard_normal((D, H, N)), 'wk': rng.standard_normal((D, G, N)), 'wv': rng.standard_normal((D, G, N)),
       'bq': rng.standard_normal(H * N), 'bk': rng.standard_normal(G * N), 'bv': rng.standard_normal(G * N),
       'q_norm': 1 + 0.1 * rng.standard_normal(H * N), 'k_norm': 1 + 0.1 * rng.standard_normal(G * N)}
  p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  x = rng.standard_normal((B, T, D)).astype(np.float32)
  q, k, v = (np.asarray(a) for a in gqa_qkv(p, jnp.asarray(x), cfg))
  P = {k_: np.asarray(v_, np.float64) for k_, v_ in p.items()}
  rms = lambda a, w: a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6) * w
  q_ref = rms((x @ P['wq'].reshape(D, -1)) + P['bq'].reshape(-1), P['q_norm'].reshape(-1)).reshape(B, T, H, N)
  k_ref = rms((x @ P['wk'].reshape(D, -1)) + P['bk'].reshape(-1), P['k_norm'].reshape(-1)).reshape(B, T, G, N)
  rot = lambda a: np.asarray(layers.rope(jnp.asarray(a, jnp.float32), cfg))
  np.testing.assert_allclose(q.reshape(B, T, H, N), rot(q_ref), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(k, rot(k_ref), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(v, (x @ P['wv'].reshape(D, -1) + P['bv'].reshape(-1)).reshape(B, T, G, N),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # the decode and convert tests run the gate in the fast suite
def test_gated_shared_expert_forward_and_gradient():
  from conftest import make_test_mesh, numpy_init_params, tiny_model_dict, update_model
  from moejax import model
  from moejax.layers import swiglu
  from moejax.model_config import ModelConfig
  m = update_model(tiny_model_dict(dispatch='dropless'), dict(shared_expert_gate=True, shared_expert_ffn_dim=24))
  cfg = ModelConfig.from_config(m)
  p = jax.tree.map(jnp.asarray, numpy_init_params(model.moe_specs(cfg), 0))
  assert p['shared']['w_gate'].shape == (cfg.d_model, 24) and p['shared_gate'].shape == (cfg.d_model,)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  x = jax.random.normal(jax.random.key(0), (2, 6, cfg.d_model))
  bias = jnp.zeros((cfg.router.num_routed,))

  def with_gate(p, x):
    return model.moe_ffn(p, bias, x, cfg, mesh, ())[0]

  def by_hand(p, x):   # routed part from the same layer without its shared experts, plus the gated SwiGLU
    routed = model.moe_ffn({k: v for k, v in p.items() if k not in ('shared', 'shared_gate')}, bias, x,
                           cfg, mesh, ())[0]
    return routed + jax.nn.sigmoid(jnp.einsum('btd,d->bt', x, p['shared_gate']))[..., None] * swiglu(p['shared'], x)

  np.testing.assert_allclose(with_gate(p, x), by_hand(p, x), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda p: jnp.sum(f(p, x) ** 2)
  g1, g2 = jax.grad(loss(with_gate))(p), jax.grad(loss(by_hand))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
