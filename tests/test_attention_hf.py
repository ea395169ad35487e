"""Tests for the attention pieces Hugging Face models need: interleaved-pair RoPE
(model.attn.rope_layout='pairs'), YaRN frequencies and cos/sin factor (model.attn.yarn_*), DeepSeek's
MLA softmax scale (yarn_mscale_all_dim), q/k RMSNorm over the whole projection (qk_norm_scope=
'projection', OLMoE) and q/k/v biases (qkv_bias, Qwen2).

Each against a naive reference written here: numpy for the frequencies (a transcription of
transformers 5.23's _compute_yarn_parameters, also checked against numbers transformers computed,
pasted below, so no torch is needed), and head-by-head jax for the attention forward and gradient,
with the pairs rotated in transformers' complex-number form (DeepSeek-V2), which keeps them
interleaved. Also: the new params' optimizer groups and sharding axes, and QK-clip with biases."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from reference import attention_problem, ref_mask, ref_rms_norm

from moejax import configs, model, optim, params, sharding, transfer
from moejax.attention import ATTENTIONS
from moejax.attention.config import AttentionConfig
from moejax.layers import rope, rope_frequencies

TOL = dict(rtol=2e-5, atol=2e-6)
LOOSE_TOL = dict(rtol=5e-5, atol=5e-6)   # gradients sum O(10) float32 terms


# ----------------------------------------------------------------------------- references

def np_mscale(factor, mscale=1.0):
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def np_rope_frequencies(N, a):
  """(inverse frequencies [N / 2] float32, cos/sin factor) as transformers computes them:
  rope_type 'default' or 'yarn' (modeling_rope_utils._compute_yarn_parameters, step by step)."""
  if not a.yarn_factor:
    return np.float32(a.rope_theta) ** (-np.arange(0, N, 2, dtype=np.float32) / np.float32(N)), 1.0
  f, base, orig = a.yarn_factor, a.rope_theta, a.yarn_original_max_len
  if a.yarn_mscale and a.yarn_mscale_all_dim:
    attention_factor = np_mscale(f, a.yarn_mscale) / np_mscale(f, a.yarn_mscale_all_dim)
  else:
    attention_factor = np_mscale(f)
  dim_of = lambda rot: (N * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
  low, high = dim_of(a.yarn_beta_fast), dim_of(a.yarn_beta_slow)
  if a.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, N - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(N // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  pos_freqs = np.float32(base) ** (np.arange(0, N, 2, dtype=np.float32) / np.float32(N))
  extrapolation_factor = 1 - ramp
  inv = (1.0 / (f * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
  return inv.astype(np.float32), attention_factor


def ref_rope(x_TN, a, offset=0):
  """RoPE of one head's [T, N] at positions offset.. . 'halves': x cos + rotate_half(x) sin
  (Llama); 'pairs': each (x_2i, x_2i+1) as the complex number x_2i + i x_2i+1 times
  factor * e^(i angle), written back interleaved (DeepSeek-V2's apply_rotary_emb)."""
  T, N = x_TN.shape
  inv, factor = np_rope_frequencies(N, a)
  angle = (offset + np.arange(T, dtype=np.float32))[:, None] * inv[None, :]
  cos, sin = factor * np.cos(angle), factor * np.sin(angle)
  if a.rope_layout == 'pairs':
    re, im = x_TN[:, 0::2], x_TN[:, 1::2]
    return jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(T, N)
  rotate_half = jnp.concatenate([-x_TN[:, N // 2:], x_TN[:, :N // 2]], -1)
  return x_TN * np.concatenate([cos] * 2, -1) + rotate_half * np.concatenate([sin] * 2, -1)


def ref_head(q_TN, k_TN, v_TM, mask_TT, scale):
  s = jnp.where(mask_TT, (q_TN @ k_TN.T) * scale, -jnp.inf)
  return jax.nn.softmax(s, axis=-1) @ v_TM


def ref_gqa(p, x_BTD, a, attention):
  """GQA / MHA / SWA one head at a time with the biases and q/k norm that `p` and `a` hold."""
  H, N, T = a.num_heads, a.head_dim, x_BTD.shape[1]
  G = p['wk'].shape[1]
  mask = ref_mask(T, a.window if attention == 'swa' else None)
  out = []
  for x in x_BTD:
    q, k, v = (jnp.einsum('td,dhn->thn', x, p[w]) for w in ('wq', 'wk', 'wv'))
    if a.qkv_bias:
      q, k, v = q + p['bq'].reshape(H, N), k + p['bk'].reshape(G, N), v + p['bv'].reshape(G, N)
    if a.qk_norm and a.qk_norm_scope == 'projection':   # OlmoeAttention: q_norm(q_proj(x))
      q = ref_rms_norm(q.reshape(T, H * N), p['q_norm'], a.norm_eps).reshape(T, H, N)
      k = ref_rms_norm(k.reshape(T, G * N), p['k_norm'], a.norm_eps).reshape(T, G, N)
    elif a.qk_norm:
      q, k = ref_rms_norm(q, p['q_norm'], a.norm_eps), ref_rms_norm(k, p['k_norm'], a.norm_eps)
    y = 0.0
    for h in range(H):
      g = h // (H // G)
      o = ref_head(ref_rope(q[:, h], a), ref_rope(k[:, g], a), v[:, g], mask, N ** -0.5)
      y = y + o @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def ref_mla(p, x_BTD, a):
  """MLA one head at a time; DeepseekV3Attention's scaling: qk_head_dim ** -0.5, times
  mscale(factor, mscale_all_dim) ** 2 under YaRN with mscale_all_dim set."""
  Nn, R, C, Q = a.mla.qk_nope_head_dim, a.mla.qk_rope_head_dim, a.mla.kv_lora_rank, a.mla.q_lora_rank
  scale = (Nn + R) ** -0.5
  if a.yarn_factor and a.yarn_mscale_all_dim:
    scale *= np_mscale(a.yarn_factor, a.yarn_mscale_all_dim) ** 2
  mask = ref_mask(x_BTD.shape[1])
  out = []
  for x in x_BTD:
    kv_a = x @ p['wkv_a']
    latent = ref_rms_norm(kv_a[:, :C], p['kv_norm'], a.norm_eps)
    k_rope = ref_rope(kv_a[:, C:], a)
    q_in = ref_rms_norm(x @ p['wq_a'], p['q_norm'], a.norm_eps) if Q else x
    y = 0.0
    for h in range(a.num_heads):
      q = q_in @ (p['wq_b'] if Q else p['wq'])[:, h]
      q = jnp.concatenate([q[:, :Nn], ref_rope(q[:, Nn:], a)], -1)
      kv = latent @ p['wkv_b'][:, h]
      o = ref_head(q, jnp.concatenate([kv[:, :Nn], k_rope], -1), kv[:, Nn:], mask, scale)
      y = y + o @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def attn_cfg(**kw) -> AttentionConfig:
  return AttentionConfig(d_model=32, num_layers=1, **kw)


# ----------------------------------------------------------------------------- YaRN frequencies

# transformers 5.23 (torch 2.13, CPU): ROPE_INIT_FUNCTIONS['yarn'](LlamaConfig(head_dim=N,
# rope_parameters=...)) -> (inv_freq as float32, attention_factor), for these model.attn settings.
HF_YARN = {
    'deepseek_v3': (16, dict(rope_theta=10000.0, yarn_factor=40.0, yarn_original_max_len=4096,
                             yarn_mscale=1.0, yarn_mscale_all_dim=1.0),
                    [1.0, 0.3162277638912201, 0.10000000149011612, 0.023914724588394165, 0.005124999675899744,
                     0.0008498621755279601, 2.499999936844688e-05, 7.905694474175107e-06], 1.0),
    'qwen_yarn': (16, dict(rope_theta=1e6, yarn_factor=4.0, yarn_original_max_len=32768),
                  [1.0, 0.17782793939113617, 0.03162277862429619, 0.004217559937387705, 0.0005000000237487257,
                   4.4456985051510856e-05, 7.905693564680405e-06, 1.405853367941745e-06], 1.138629436111989),
    'untruncated_mscales': (16, dict(rope_theta=500.0, yarn_factor=8.0, yarn_original_max_len=64,
                                     yarn_beta_fast=16.0, yarn_beta_slow=2.0, yarn_mscale=0.707,
                                     yarn_mscale_all_dim=1.0, yarn_truncate=False),
                            [1.0, 0.26784446835517883, 0.03486943244934082, 0.01215615589171648,
                             0.005590170156210661, 0.0025707141030579805, 0.0011821769876405597,
                             0.0005436398205347359], 0.9495608824621653),
    'clamped_ramp': (8, dict(rope_theta=10000.0, yarn_factor=4.0, yarn_original_max_len=4),
                     [1.0, 0.02500000037252903, 0.0024999999441206455, 0.0002500000118743628], 1.138629436111989),
}


@pytest.mark.parametrize('case', list(HF_YARN))
def test_yarn_frequencies_and_attention_factor_match_transformers_and_the_numpy_reference(case):
  N, kw, hf_inv, hf_factor = HF_YARN[case]
  a = attn_cfg(**kw)
  inv, factor = rope_frequencies(N, a)
  np.testing.assert_array_equal(np.asarray(inv), np.asarray(hf_inv, np.float32))   # bit for bit on CPU
  assert factor == pytest.approx(hf_factor, rel=1e-12)
  np_inv, np_factor = np_rope_frequencies(N, a)
  np.testing.assert_allclose(np_inv, hf_inv, rtol=1e-6)
  assert np_factor == pytest.approx(hf_factor, rel=1e-12)


def test_yarn_off_keeps_the_plain_frequencies_bit_for_bit():
  """Defaults are today's RoPE: theta ** (-2i / N) exactly as before YaRN existed."""
  for theta in (10000.0, 5e5):
    inv, factor = rope_frequencies(64, attn_cfg(rope_theta=theta))
    np.testing.assert_array_equal(inv, theta ** (-jnp.arange(0, 64, 2, dtype=jnp.float32) / 64))
    assert factor == 1.0
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 16))
  np.testing.assert_array_equal(rope(x, attn_cfg(rope_theta=500.0)), rope(x, 500.0))


# ----------------------------------------------------------------------------- rope layouts

ROPE_CASES = {
    'halves': dict(),
    'pairs': dict(rope_layout='pairs'),
    'halves_yarn': dict(yarn_factor=4.0, yarn_original_max_len=4),
    'pairs_yarn_untruncated': dict(rope_layout='pairs', yarn_factor=8.0, yarn_original_max_len=6,
                                   yarn_mscale=0.707, yarn_mscale_all_dim=1.0, yarn_truncate=False),
}


@pytest.mark.parametrize('case', list(ROPE_CASES))
@pytest.mark.parametrize('offset', [0, 5])
def test_rope_layouts_match_reference_output_layout_and_scores(case, offset):
  """'pairs' returns the rotated pairs de-interleaved (as apply_rotary_pos_emb_interleave does):
  the reference's interleaved output permuted evens-then-odds, so q . k is the same."""
  a = attn_cfg(**ROPE_CASES[case])
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 7, 1, 16))
  q_lib, k_lib = rope(q, a, offset)[0, :, 0], rope(k, a, offset)[0, :, 0]
  q_ref, k_ref = ref_rope(q[0, :, 0], a, offset), ref_rope(k[0, :, 0], a, offset)
  perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)]) if a.rope_layout == 'pairs' else np.arange(16)
  chex.assert_trees_all_close(q_lib, q_ref[:, perm], **TOL)
  chex.assert_trees_all_close(q_lib @ k_lib.T, q_ref @ k_ref.T, **TOL)
  if a.rope_layout == 'pairs':   # not the halves rotation in disguise
    assert float(jnp.max(jnp.abs(q_lib - rope(q, attn_cfg(**{**ROPE_CASES[case], 'rope_layout': 'halves'}),
                                              offset)[0, :, 0]))) > 1e-2


# ----------------------------------------------------------------------------- attention forward / grad

ALL = dict(qkv_bias=True, qk_norm=True, qk_norm_scope='projection', rope_layout='pairs', yarn_factor=4.0,
           yarn_original_max_len=4)
GQA_CASES = {
    'gqa_bias': ('gqa', dict(qkv_bias=True)),
    'gqa_projection_qk_norm': ('gqa', dict(qk_norm=True, qk_norm_scope='projection')),
    'gqa_head_qk_norm_pairs': ('gqa', dict(qk_norm=True, rope_layout='pairs')),
    'gqa_yarn_attention_factor': ('gqa', dict(yarn_factor=4.0, yarn_original_max_len=4)),
    'gqa_pairs_yarn_mscales_untruncated': ('gqa', dict(rope_layout='pairs', yarn_factor=8.0, yarn_original_max_len=6,
                                                       yarn_beta_fast=16.0, yarn_beta_slow=2.0, yarn_mscale=0.707,
                                                       yarn_mscale_all_dim=1.0, yarn_truncate=False)),
    'gqa_all': ('gqa', ALL),
    'mqa_all': ('gqa', dict(ALL, num_kv_heads=1)),
    'mha_all': ('mha', ALL),
    'swa_all': ('swa', dict(ALL, window=4)),
}


def grad_and_output(fn, p, x, r):
  def f(p, x):
    y = fn(p, x)
    return jnp.sum(y * r), y
  return jax.jit(jax.grad(f, (0, 1), has_aux=True))(p, x)


@pytest.mark.parametrize('case', list(GQA_CASES))
def test_gqa_family_hf_options_forward_and_grad_match_naive_reference(case):
  attention, attn = GQA_CASES[case]
  a, p, x, r = attention_problem(attention, 12, shapes={}, attn=attn)
  g_lib, y_lib = grad_and_output(lambda p, x: ATTENTIONS[attention].apply(p, x, a)[0], p, x, r)
  g_ref, y_ref = grad_and_output(lambda p, x: ref_gqa(p, x, a, attention), p, x, r)
  assert float(jnp.std(y_ref)) > 1e-2
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **LOOSE_TOL)


MLA_CASES = {
    'mla_pairs': dict(attn=dict(rope_layout='pairs')),
    # DeepSeek-V3: YaRN with mscale = mscale_all_dim (cos/sin factor 1, softmax scale x mscale^2)
    'mla_v3_yarn': dict(attn=dict(yarn_factor=4.0, yarn_original_max_len=4, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)),
    'mla_pairs_yarn_q_lora': dict(attn=dict(rope_layout='pairs', yarn_factor=8.0, yarn_original_max_len=6,
                                            yarn_mscale=0.707, yarn_mscale_all_dim=0.707),
                                  mla=dict(q_lora_rank=12)),
    'mla_yarn_cos_sin_factor_only': dict(attn=dict(rope_layout='pairs', yarn_factor=4.0, yarn_original_max_len=4)),
}


@pytest.mark.parametrize('case', list(MLA_CASES))
def test_mla_rope_layout_and_yarn_forward_and_grad_match_naive_reference(case):
  a, p, x, r = attention_problem('mla', 12, shapes={}, **MLA_CASES[case])
  g_lib, y_lib = grad_and_output(lambda p, x: ATTENTIONS['mla'].apply(p, x, a)[0], p, x, r)
  g_ref, y_ref = grad_and_output(lambda p, x: ref_mla(p, x, a), p, x, r)
  assert float(jnp.std(y_ref)) > 1e-2
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **LOOSE_TOL)


# ----------------------------------------------------------------------------- params: groups, axes

def test_biases_and_projection_norms_are_vectors_split_like_their_heads():
  """bq/bk/bv and the projection q/k norm scales: flat [H * N] / [G * N] (transformers' layout),
  logical axis 'heads' / 'kv_heads'; in the default 'vectors' group, never decayed, not Muon
  matrices, not width-scaled; split over 'tensor' as the projections' heads are."""
  cfg = tiny_model_config(attn=dict(qkv_bias=True, qk_norm=True, qk_norm_scope='projection'), base_width=16)
  specs = model.model_specs(cfg)
  H, G, N = cfg.attn.num_heads, cfg.attn.num_kv_heads, cfg.attn.head_dim
  attn = specs['moe_blocks']['attn']
  want = {'bq': (H * N, 'heads'), 'bk': (G * N, 'kv_heads'), 'bv': (G * N, 'kv_heads'),
          'q_norm': (H * N, 'heads'), 'k_norm': (G * N, 'kv_heads')}
  for name, (size, axis) in want.items():
    assert attn[name].shape == (cfg.num_moe_layers, size) and attn[name].axes == ('layers', axis), name
  o = configs.base_config().optim
  axes = params.logical_axes(specs)
  labels = optim.group_labels(o, axes)
  matrix, hidden = optim.parse_rule('matrix', 'test'), optim.parse_rule(transfer.HIDDEN, 'test')
  rules = dict(configs.base_config().sharding)
  for kind in ('dense_blocks', 'moe_blocks'):
    for name in want:
      path, ax = f'{kind}/attn/{name}', axes[kind]['attn'][name]
      assert labels[kind]['attn'][name] == 'vectors', path
      assert not matrix(path, ax) and not hidden(path, ax) and optim.muon_dims(ax) is None, path
      assert sharding.logical_to_spec(ax, rules, ('data', 'fsdp', 'tensor')) == jax.sharding.PartitionSpec(
          None, 'tensor'), path
    assert labels[kind]['attn']['wq'] == 'hidden'
  transfer.optim_config(o, cfg, axes)   # no group mixes width-scaled and other params


@pytest.mark.parametrize('attention,attn', [('gqa', dict(qkv_bias=True)), ('swa', dict(qkv_bias=True, window=4)),
                                            ('gqa', dict(qkv_bias=True, num_kv_heads=1))])
def test_qk_clip_with_biases_brings_over_threshold_heads_to_tau(attention, attn):
  """q = x wq + bq: QK-clip scales the bias with its projection, so the logits still scale by gamma."""
  from moejax import qk_clip
  a, p, x, _ = attention_problem(attention, 12, shapes={}, attn=attn)
  assert float(jnp.min(jnp.abs(p['bq']))) > 0   # the biases are really there
  _, before = ATTENTIONS[attention].apply(p, x, a)
  tau = float(jnp.sort(before)[1]) * 0.999 + float(jnp.sort(before)[2]) * 0.001   # 2 heads clip
  stacked = jax.tree.map(lambda w: w[None], p)
  clipped = jax.tree.map(lambda w: w[0], ATTENTIONS[attention].qk_clip(
      stacked, qk_clip.clip_factors(before, tau)[None], a))
  _, after = ATTENTIONS[attention].apply(clipped, x, a)
  over = np.asarray(before > tau)
  assert 0 < over.sum() < a.num_heads
  np.testing.assert_allclose(np.asarray(after)[over], tau, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(after)[~over], np.asarray(before)[~over], rtol=1e-5)
  np.testing.assert_array_equal(clipped['bv'], p['bv'])
