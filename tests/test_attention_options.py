"""Document masking, QK-norm, attention sinks, soft-capping and the per-head max logit of the softmax
attention types, against a naive per-head reference; QK-clip (moejax.qk_clip) on GQA and MLA."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_init_params, tiny_model_config
from test_attention import ref_rms_norm, ref_rope

from moejax import params, qk_clip
from moejax.attention import ATTENTIONS

B, T = 2, 12
TOL = dict(rtol=2e-5, atol=2e-6)
# Row 0: documents of 5, 4 and 3 tokens; row 1: a single document.
SEGMENTS = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * T], np.int32)

CASES = {
    'gqa_segments': ('gqa', {}, True),
    'gqa_qknorm_sinks_softcap': ('gqa', {'qk_norm': True, 'attn_sinks': True, 'attn_softcap': 2.0}, True),
    'mha_sinks_no_segments': ('mha', {'attn_sinks': True}, False),
    'swa_segments_sinks_softcap': ('swa', {'window': 4, 'attn_sinks': True, 'attn_softcap': 3.0}, True),
    'mla_segments_softcap': ('mla', {'attn_softcap': 2.0}, True),
    'mla_lora_segments': ('mla', {'q_lora_rank': 12}, True),
}


def ref_head(q_TN, k_TN, v_TM, mask_TT, softcap=0.0, sink=None):
  """One head: naive masked softmax over T x T (+ optional cap and sink); also its max logit."""
  s = (q_TN @ k_TN.T) / np.sqrt(q_TN.shape[-1])
  s_max = jnp.max(jnp.where(mask_TT, s, -jnp.inf))
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask_TT, s, -jnp.inf)
  if sink is not None:
    s = jnp.concatenate([s, jnp.full((s.shape[0], 1), sink)], axis=1)
  probs = jax.nn.softmax(s, axis=-1)[:, :k_TN.shape[0]]
  return probs @ v_TM, s_max


def ref_mask(cfg, segments_T):
  t = np.arange(T)
  mask = t[None, :] <= t[:, None]
  if cfg.attention == 'swa':
    mask &= t[None, :] > t[:, None] - cfg.window
  if segments_T is not None:
    mask &= segments_T[:, None] == segments_T[None, :]
  return mask


def ref_softmax_type(p, x_BTD, cfg, segments_BT):
  """GQA/MHA/SWA/MLA one head at a time; returns y_BTD and the max logit per head [H]."""
  H = cfg.num_heads
  ys, maxes = [], []
  for b in range(x_BTD.shape[0]):
    x, y, m = x_BTD[b], 0.0, []
    mask = ref_mask(cfg, None if segments_BT is None else segments_BT[b])
    if cfg.attention == 'mla':
      Nn, C = cfg.qk_nope_head_dim, cfg.kv_lora_rank
      kv_a = x @ p['wkv_a']
      latent = ref_rms_norm(kv_a[:, :C], p['kv_norm'], cfg.norm_eps)
      k_rope = ref_rope(kv_a[:, C:], cfg.rope_theta)
      q_in = ref_rms_norm(x @ p['wq_a'], p['q_norm'], cfg.norm_eps) if cfg.q_lora_rank else x
    for h in range(H):
      if cfg.attention == 'mla':
        q = q_in @ (p['wq_b'] if cfg.q_lora_rank else p['wq'])[:, h]
        q = jnp.concatenate([q[:, :Nn], ref_rope(q[:, Nn:], cfg.rope_theta)], -1)
        kv = latent @ p['wkv_b'][:, h]
        k, v, sink = jnp.concatenate([kv[:, :Nn], k_rope], -1), kv[:, Nn:], None
      else:
        g = h // (H // p['wk'].shape[1])
        q, k, v = x @ p['wq'][:, h], x @ p['wk'][:, g], x @ p['wv'][:, g]
        if cfg.qk_norm:
          q, k = ref_rms_norm(q, p['q_norm'], cfg.norm_eps), ref_rms_norm(k, p['k_norm'], cfg.norm_eps)
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
        sink = p['sinks'][h] if cfg.attn_sinks else None
      o, s_max = ref_head(q, k, v, mask, cfg.attn_softcap, sink)
      y, _ = y + o @ p['wo'][h], m.append(s_max)
    ys.append(y)
    maxes.append(jnp.stack(m))
  return jnp.stack(ys), jnp.max(jnp.stack(maxes), axis=0)


def setup(attention, overrides, seed=0):
  cfg = tiny_model_config(attention=attention, init_std=0.3, **overrides)
  p = params.init_params(ATTENTIONS[attention].specs(cfg), jax.random.key(seed))
  # norm scales start at one and sinks at zero: perturb them so the test sees they are applied
  p = jax.tree_util.tree_map_with_path(
      lambda path, w: w + 0.5 * jax.random.normal(jax.random.key(9), w.shape)
      if any(n in jax.tree_util.keystr(path) for n in ('norm', 'sinks')) else w, p)
  kx, kr = jax.random.split(jax.random.key(seed + 1))
  return cfg, p, jax.random.normal(kx, (B, T, cfg.d_model)), jax.random.normal(kr, (B, T, cfg.d_model))


@pytest.mark.parametrize('case', list(CASES))
def test_softmax_attention_options_match_naive_reference_forward_grad_and_max_logit(case):
  attention, overrides, with_segments = CASES[case]
  cfg, p, x, r = setup(attention, overrides)
  seg = jnp.asarray(SEGMENTS) if with_segments else None

  def lib(p, x):
    y, logit_max = ATTENTIONS[attention].apply(p, x, cfg, seg)
    return jnp.sum(y * r), (y, logit_max)

  def ref(p, x):
    y, logit_max = ref_softmax_type(p, x, cfg, SEGMENTS if with_segments else None)
    return jnp.sum(y * r), (y, logit_max)

  g_lib, (y_lib, m_lib) = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(p, x)
  g_ref, (y_ref, m_ref) = jax.jit(jax.grad(ref, (0, 1), has_aux=True))(p, x)
  assert float(jnp.std(y_ref)) > 1e-2
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)
  assert m_lib.shape == (cfg.num_heads,)
  chex.assert_trees_all_close(m_lib, m_ref, **TOL)


def test_document_mask_changes_the_output_only_after_the_first_document():
  cfg, p, x, _ = setup('gqa', {})
  seg = jnp.asarray(SEGMENTS)
  y_doc, _ = ATTENTIONS['gqa'].apply(p, x, cfg, seg)
  y_all, _ = ATTENTIONS['gqa'].apply(p, x, cfg)
  np.testing.assert_allclose(y_doc[0, :5], y_all[0, :5], rtol=1e-5, atol=1e-6)  # first document
  assert float(jnp.max(jnp.abs(y_doc[0, 5:] - y_all[0, 5:]))) > 1e-3
  np.testing.assert_allclose(y_doc[1], y_all[1], rtol=1e-5, atol=1e-6)          # one document


def _stack(p):   # one layer -> a stack of L = 1, as qk_clip sees scanned params
  return jax.tree.map(lambda w: w[None], p)


@pytest.mark.parametrize('attention,overrides', [('gqa', {}), ('mla', {}), ('mla', {'q_lora_rank': 12})])
def test_qk_clip_brings_over_threshold_heads_to_tau_and_leaves_the_others(attention, overrides):
  cfg, p, x, _ = setup(attention, overrides)
  _, before = ATTENTIONS[attention].apply(p, x, cfg)
  tau = float(jnp.sort(before)[1]) * 0.999 + float(jnp.sort(before)[2]) * 0.001   # 2 heads clip
  clipped = jax.tree.map(lambda w: w[0], qk_clip.clip_attention(
      _stack(p), attention, qk_clip.clip_factors(before, tau)[None], cfg))
  _, after = ATTENTIONS[attention].apply(clipped, x, cfg)
  over = np.asarray(before > tau)
  assert 0 < over.sum() < cfg.num_heads
  np.testing.assert_allclose(np.asarray(after)[over], tau, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(after)[~over], np.asarray(before)[~over], rtol=1e-5)
  if attention == 'mla':   # the RoPE key is shared by every head: never rescaled
    np.testing.assert_array_equal(clipped['wkv_a'], p['wkv_a'])


def test_qk_clip_factors_ignore_nan_and_heads_under_tau():
  f = qk_clip.clip_factors(jnp.array([jnp.nan, 5.0, 20.0, 10.0]), 10.0)
  np.testing.assert_allclose(f, [1.0, 1.0, 0.5, 1.0])


def test_qk_clip_on_a_pattern_model_scales_the_right_layer_stacks():
  """'gqa,mla' over 4 layers (1 dense): each stack of each group gets its own layers' factors."""
  cfg = tiny_model_config(attention='gqa,mla', num_layers=4, num_dense_layers=1)
  from moejax import model
  p = numpy_init_params(model.model_specs(cfg), seed=0)
  logit_LH = jnp.array([[1.0] * 4, [50.0, 1.0, 1.0, 1.0], [1.0] * 4, [1.0, 1.0, 1.0, 25.0]])
  out = qk_clip.qk_clip(p, logit_LH, cfg, 10.0)
  # layer 1 = MoE layer 0 (mla, stack 1 of the unit ['mla', 'gqa']), head 0 gets gamma = 0.2
  mla_in, mla_out = p['moe_blocks'][0]['attn']['wq'], out['moe_blocks'][0]['attn']['wq']
  Nn = cfg.qk_nope_head_dim
  np.testing.assert_allclose(mla_out[0, :, 0, Nn:], 0.2 * mla_in[0, :, 0, Nn:], rtol=1e-6)
  np.testing.assert_allclose(mla_out[0, :, 1:], mla_in[0, :, 1:])
  # layer 3 = MoE layer 2 (mla again, second entry of that stack), head 3 gets gamma = 0.4
  np.testing.assert_allclose(mla_out[1, :, 3, Nn:], 0.4 * mla_in[1, :, 3, Nn:], rtol=1e-6)
  # every gqa layer and the dense block stayed under tau: untouched
  chex.assert_trees_all_equal(out['moe_blocks'][1], p['moe_blocks'][1])
  chex.assert_trees_all_equal(out['dense_blocks'], p['dense_blocks'])


@pytest.mark.slow   # two train-step compiles of the smoke model: ~50 s on 2 cores
def test_train_step_with_qk_clip_equals_the_unclipped_step_then_qk_clip():
  """The train step applies QK-clip after the optimizer update, from that step's own logits."""
  from test_config import smoke_config
  from moejax.state import init_state, setup
  from moejax.train import make_train_step
  c = smoke_config()
  c.mesh.data, c.mesh.expert = 1, 1
  c.train.batch_size, c.train.seq_len = 2, 16
  s = setup(c, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.model.vocab_size, (2, 17))
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32), 'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
           'loss_mask': jnp.ones((2, 16), jnp.float32),
           'segment_ids': jnp.ones((2, 16), jnp.int32), 'positions': jnp.tile(jnp.arange(16), (2, 1))}
  plain, out = make_train_step(s)(init_state(s), batch)
  logit_LH = out['attn_logit_max']
  tau = float(jnp.median(logit_LH))                  # about half the heads clip
  c.optim.qk_clip = tau
  clipped, _ = make_train_step(setup(c, devices=jax.devices()[:1]))(init_state(s), batch)
  expected = qk_clip.qk_clip(plain['params'], logit_LH, c.model, tau)
  chex.assert_trees_all_close(clipped['params'], expected, rtol=1e-6, atol=1e-9)
  assert not np.allclose(clipped['params']['moe_blocks']['attn']['wq'], plain['params']['moe_blocks']['attn']['wq'])
