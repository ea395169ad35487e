"""Tests for moejax.attention (GQA/MHA and MLA) against naive per-head references; causality."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config

from moejax import model, params
from moejax.attention import ATTENTIONS

B, T = 2, 8
TOL = dict(rtol=2e-5, atol=2e-6)

CASES = {
    'gqa': ('gqa', {}),                              # 4 query heads share 2 kv heads
    'mha': ('gqa', {'num_kv_heads': 4}),             # num_kv_heads == num_heads
    'mqa': ('gqa', {'num_kv_heads': 1}),
    'mla_full_q': ('mla', {'q_lora_rank': 0}),
    'mla_lora_q': ('mla', {'q_lora_rank': 12}),
}


# ----------------------------------------------------------------------------- naive reference

def ref_rope(x_TN, theta):
  """Rotate-half RoPE at positions 0..T-1, frequencies theta^(-2i/N), i = 0..N/2-1."""
  n_pos, N = x_TN.shape
  freqs = np.array([theta ** (-2.0 * i / N) for i in range(N // 2)], np.float32)
  angle = np.arange(n_pos, dtype=np.float32)[:, None] * freqs[None, :]
  cos = jnp.asarray(np.concatenate([np.cos(angle)] * 2, -1))
  sin = jnp.asarray(np.concatenate([np.sin(angle)] * 2, -1))
  rotate_half = jnp.concatenate([-x_TN[:, N // 2:], x_TN[:, :N // 2]], -1)
  return x_TN * cos + rotate_half * sin


def ref_rms_norm(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def ref_causal_attention(q_TN, k_TN, v_TM):
  """Full T x T masked softmax for one head."""
  n = q_TN.shape[0]
  s = (q_TN @ k_TN.T) / np.sqrt(q_TN.shape[-1])
  s = jnp.where(np.tril(np.ones((n, n), bool)), s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1) @ v_TM


def ref_gqa(p, x_BTD, cfg):
  H, G = cfg.num_heads, cfg.num_kv_heads
  outs = []
  for b in range(x_BTD.shape[0]):
    x = x_BTD[b]
    y = 0.0
    for h in range(H):
      g = h // (H // G)   # query heads [g*H/G, (g+1)*H/G) read kv head g
      q = ref_rope(x @ p['wq'][:, h], cfg.rope_theta)
      k = ref_rope(x @ p['wk'][:, g], cfg.rope_theta)
      v = x @ p['wv'][:, g]
      y = y + ref_causal_attention(q, k, v) @ p['wo'][h]
    outs.append(y)
  return jnp.stack(outs)


def ref_mla(p, x_BTD, cfg):
  H, Nn, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
  outs = []
  for b in range(x_BTD.shape[0]):
    x = x_BTD[b]
    kv_a = x @ p['wkv_a']
    latent = ref_rms_norm(kv_a[:, :C], p['kv_norm'], cfg.norm_eps)
    k_rope = ref_rope(kv_a[:, C:], cfg.rope_theta)                  # shared by all heads
    if cfg.q_lora_rank:
      q_lat = ref_rms_norm(x @ p['wq_a'], p['q_norm'], cfg.norm_eps)
    y = 0.0
    for h in range(H):
      q = q_lat @ p['wq_b'][:, h] if cfg.q_lora_rank else x @ p['wq'][:, h]
      q = jnp.concatenate([q[:, :Nn], ref_rope(q[:, Nn:], cfg.rope_theta)], -1)
      kv = latent @ p['wkv_b'][:, h]
      k = jnp.concatenate([kv[:, :Nn], k_rope], -1)
      v = kv[:, Nn:]
      y = y + ref_causal_attention(q, k, v) @ p['wo'][h]
    outs.append(y)
  return jnp.stack(outs)


REFS = {'gqa': ref_gqa, 'mla': ref_mla}


def setup(case, seed=0):
  attention, overrides = CASES[case]
  cfg = tiny_model_config(attention=attention, init_std=0.3, **overrides)
  p = params.init_params(ATTENTIONS[attention].specs(cfg), jax.random.key(seed))
  # Norm scales start at one: perturb them so that the test sees whether they are applied.
  p = jax.tree_util.tree_map_with_path(
      lambda path, w: w + 0.2 * jax.random.normal(jax.random.key(9), w.shape)
      if 'norm' in jax.tree_util.keystr(path) else w, p)
  kx, kr = jax.random.split(jax.random.key(seed + 1))
  x = jax.random.normal(kx, (B, T, cfg.d_model))
  r = jax.random.normal(kr, (B, T, cfg.d_model))
  return cfg, p, x, r


# ----------------------------------------------------------------------------- tests

def test_rope_reference_matches_library_rope():
  from moejax.attention import rope
  x = jax.random.normal(jax.random.key(0), (1, T, 1, 16))
  chex.assert_trees_all_close(rope(x, 10000.0)[0, :, 0], ref_rope(x[0, :, 0], 10000.0), **TOL)
  # RoPE is a rotation: it preserves norms, and position 0 is untouched.
  chex.assert_trees_all_close(jnp.linalg.norm(rope(x, 500.0), axis=-1),
                              jnp.linalg.norm(x, axis=-1), **TOL)
  chex.assert_trees_all_close(rope(x, 500.0)[:, 0], x[:, 0])


@pytest.mark.parametrize('case', list(CASES))
def test_attention_forward_and_grad_match_naive_per_head_reference(case):
  cfg, p, x, r = setup(case)
  attention = ATTENTIONS[cfg.attention]

  def lib(p, x):
    y = attention.apply(p, x, cfg)[0]
    return jnp.sum(y * r), y

  def ref(p, x):
    y = REFS[cfg.attention](p, x, cfg)
    return jnp.sum(y * r), y

  g_lib, y_lib = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(p, x)
  g_ref, y_ref = jax.jit(jax.grad(ref, (0, 1), has_aux=True))(p, x)
  assert float(jnp.std(y_ref)) > 1e-2   # not a degenerate near-zero output
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


@pytest.mark.parametrize('case', list(CASES))
def test_attention_output_at_t_has_exactly_zero_gradient_wrt_inputs_after_t(case):
  cfg, p, x, _ = setup(case, seed=3)
  jac = jax.jit(jax.jacrev(lambda x: ATTENTIONS[cfg.attention].apply(p, x, cfg)[0]))(x)
  jac = np.asarray(jac)                   # [B, T, D, B, S, D]
  for b in range(B):
    for t in range(T):
      assert np.all(jac[b, t, :, b, t + 1:, :] == 0.0), (b, t)   # future positions
      assert np.all(jac[b, t, :, 1 - b] == 0.0), (b, t)          # other sequences
      assert np.any(jac[b, t, :, b, :t + 1, :] != 0.0), (b, t)   # the past does matter


@pytest.mark.parametrize('attention', ['gqa', 'mla'])
def test_model_logits_at_t_do_not_depend_on_tokens_after_t(attention):
  cfg = tiny_model_config(attention=attention, init_std=0.3, dispatch='dropless')
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  bias = jnp.zeros((model.num_moe_layers(cfg), cfg.num_experts))
  fwd = jax.jit(lambda tok: model.forward(p, bias, tok, cfg, mesh)[0])
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  logits = fwd(tokens)
  for t in (0, 3, T - 2):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 17) % cfg.vocab_size)
    new = fwd(changed)
    chex.assert_trees_all_close(new[:, :t + 1], logits[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(new[:, t + 1:] - logits[:, t + 1:]))) > 1e-3


@pytest.mark.parametrize('attention', ['gqa', 'mla'])
def test_model_logits_at_t_have_zero_gradient_wrt_embeddings_of_later_tokens(attention):
  """d logits[t] / d (embedding of input position s) == 0 for s > t, via an additive perturbation."""
  cfg = tiny_model_config(attention=attention, init_std=0.3, dispatch='dropless', num_layers=2)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 2)
  bias = jnp.zeros((model.num_moe_layers(cfg), cfg.num_experts))
  tokens = jnp.arange(T)[None] * 5 % cfg.vocab_size   # distinct tokens at every position
  t = 3

  def logits_t(delta_TD):
    # Giving each position its own token id makes params['embed'][tokens] position-specific, so a
    # perturbation of row tokens[s] perturbs input position s only.
    q = dict(p, embed=p['embed'].at[tokens[0]].add(delta_TD))
    return model.forward(q, bias, tokens, cfg, mesh)[0][0, t]

  jac = np.asarray(jax.jit(jax.jacrev(logits_t))(jnp.zeros((T, cfg.d_model))))   # [V, T, D]
  assert np.all(jac[:, t + 1:] == 0.0)
  assert np.any(jac[:, :t + 1] != 0.0)
