"""Softmax attention types: GQA (MHA when every query head has its own kv head), SWA, MLA.

The training forward of each runs the implementation `model.attn.implementation` names
(moejax.attention.fused: 'xla', the reference with the scores materialised, or a fused kernel);
decoding (one query per row) always runs the XLA path.

Axis letters: B batch, T positions, D model, H query heads, G key-value heads, N head dim,
R rope dim, C latent rank.
"""
import moejax.attention.fused as fused   # the module, not the package (which imports this one)
from moejax.attention.core import (Attention, cache_write, causal_softmax_attention,
                                   decode_softmax_attention, ring_attention, ring_cache,
                                   scale_heads, sliding_window_attention, softmax_probs)
from moejax.layers import dense, rms_norm, rope, yarn_mscale
from moejax.params import ParamSpec
import jax
import jax.numpy as jnp


# --- GQA: grouped-query attention with RoPE ---

def gqa_specs(cfg, num_kv_heads: int | None = None):
  D, H, N = cfg.d_model, cfg.num_heads, cfg.head_dim
  G = num_kv_heads or cfg.num_kv_heads
  s, out = cfg.init_std, cfg.out_std
  specs = {
      'wq': ParamSpec((D, H, N), ('embed', 'heads', 'head_dim'), scale=s),
      'wk': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wv': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wo': ParamSpec((H, N, D), ('heads', 'head_dim', 'embed'), scale=out),
  }
  # Per-head vectors that span every head (projection q/k norm, biases) are stored flat, [H * N]
  # as transformers keeps them, with the one logical axis 'heads' / 'kv_heads' (it splits them
  # over the mesh as the projections' heads): one axis makes them vectors, not matrices, for the
  # optimizer rules (moejax.optim: group 'vectors', no weight decay, no Muon, no width scaling).
  if cfg.qk_norm and cfg.qk_norm_scope == 'projection':   # one RMSNorm over all heads (OLMoE)
    specs['q_norm'] = ParamSpec((H * N,), ('heads',), init='ones')
    specs['k_norm'] = ParamSpec((G * N,), ('kv_heads',), init='ones')
  elif cfg.qk_norm:   # RMSNorm of each head's query and key before RoPE (OLMo 2, Qwen 3)
    specs['q_norm'] = ParamSpec((N,), ('head_dim',), init='ones')
    specs['k_norm'] = ParamSpec((N,), ('head_dim',), init='ones')
  if cfg.qkv_bias:   # biases of the q, k, v projections (Qwen2, Qwen2-MoE)
    specs['bq'] = ParamSpec((H * N,), ('heads',), init='zeros')
    specs['bk'] = ParamSpec((G * N,), ('kv_heads',), init='zeros')
    specs['bv'] = ParamSpec((G * N,), ('kv_heads',), init='zeros')
  if cfg.sinks:   # one learned sink logit per query head
    specs['sinks'] = ParamSpec((H,), ('heads',), init='zeros')
  return specs


def mha_specs(cfg):
  return gqa_specs(cfg, num_kv_heads=cfg.num_heads)


def gqa_qkv(p, x_BTD, cfg, offset=0):
  """q_BTGHN, k_BTGN, v_BTGN with RoPE at positions offset..; G is read from the parameters (so
  MHA shares this)."""
  B, T, _ = x_BTD.shape
  G, N = p['wk'].shape[1], p['wk'].shape[2]
  q_BTHN, k_BTGN, v_BTGN = dense(x_BTD, p['wq']), dense(x_BTD, p['wk']), dense(x_BTD, p['wv'])
  if 'bq' in p:
    q_BTHN = q_BTHN + p['bq'].reshape(-1, N)
    k_BTGN, v_BTGN = k_BTGN + p['bk'].reshape(G, N), v_BTGN + p['bv'].reshape(G, N)
  if 'q_norm' in p and cfg.qk_norm_scope == 'projection':   # statistics over every head's dims
    q_BTHN = rms_norm(q_BTHN.reshape(B, T, -1), p['q_norm'], cfg.norm_eps).reshape(q_BTHN.shape)
    k_BTGN = rms_norm(k_BTGN.reshape(B, T, -1), p['k_norm'], cfg.norm_eps).reshape(k_BTGN.shape)
  elif 'q_norm' in p:
    q_BTHN = rms_norm(q_BTHN, p['q_norm'], cfg.norm_eps)
    k_BTGN = rms_norm(k_BTGN, p['k_norm'], cfg.norm_eps)
  q_BTHN, k_BTGN = rope(q_BTHN, cfg, offset), rope(k_BTGN, cfg, offset)
  return q_BTHN.reshape(B, T, G, -1, N), k_BTGN, v_BTGN


def _softmax_options(p, cfg, G: int) -> dict:
  sink = p['sinks'].reshape(G, -1) if 'sinks' in p else None
  return {'softcap': cfg.softcap, 'sink_GH': sink}


def gqa_out(p, o_BTGHN):
  B, T, _, _, N = o_BTGHN.shape
  return dense(o_BTGHN.reshape(B, T, -1, N), p['wo'], n_in=2)


def attend(cfg, q_BTGHN, k_BSGN, v_BSGM, segment_ids_BT=None, window=None, softcap=0.0, sink_GH=None):
  """Causal attention (to the `window` latest keys when given) by `cfg.implementation`:
  o_BTGHM and logit_max_H."""
  impl = fused.resolve(cfg.implementation, jax.default_backend(), softcap,
                       sink_GH is not None)
  if impl == 'xla':
    if window is None:
      return causal_softmax_attention(q_BTGHN, k_BSGN, v_BSGM, segment_ids_BT, softcap, sink_GH)
    return sliding_window_attention(q_BTGHN, k_BSGN, v_BSGM, window, segment_ids_BT, softcap, sink_GH)
  if sink_GH is not None:
    raise ValueError(f'model.attn.implementation {impl!r} has no attention sinks; use xla')
  return fused.fused_attention(impl, q_BTGHN, k_BSGN, v_BSGM, segment_ids_BT, window, softcap)


def gqa_apply(p, x_BTD, cfg, segment_ids_BT=None):
  G = p['wk'].shape[1]
  o, logit_max_H = attend(cfg, *gqa_qkv(p, x_BTD, cfg), segment_ids_BT, **_softmax_options(p, cfg, G))
  return gqa_out(p, o), logit_max_H


def swa_apply(p, x_BTD, cfg, segment_ids_BT=None):
  G = p['wk'].shape[1]
  o, logit_max_H = attend(cfg, *gqa_qkv(p, x_BTD, cfg), segment_ids_BT, cfg.window,
                          **_softmax_options(p, cfg, G))
  return gqa_out(p, o), logit_max_H


def _proj_flops(cfg, G):
  return 2 * cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * G)


def gqa_flops(cfg, seq_len, num_kv_heads=None):
  # causal: on average seq_len / 2 keys, 2 matmuls (QK^T, AV) of 2 FLOPs per multiply-add
  return _proj_flops(cfg, num_kv_heads or cfg.num_kv_heads) + 2 * seq_len * cfg.num_heads * cfg.head_dim


def mha_flops(cfg, seq_len):
  return gqa_flops(cfg, seq_len, num_kv_heads=cfg.num_heads)


def swa_flops(cfg, seq_len):
  keys = min(cfg.window, seq_len)   # each query reads about `window` keys
  return _proj_flops(cfg, cfg.num_kv_heads) + 4 * keys * cfg.num_heads * cfg.head_dim


# --- MLA: DeepSeek-V2/V3 multi-head latent attention (training form) ---

def mla_specs(cfg):
  D, H = cfg.d_model, cfg.num_heads
  Nn, R, M, C = cfg.mla.qk_nope_head_dim, cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim, cfg.mla.kv_lora_rank
  s, out = cfg.init_std, cfg.out_std
  specs = {
      'wkv_a': ParamSpec((D, C + R), ('embed', 'kv_lora'), scale=s),   # latent + shared rope key
      'kv_norm': ParamSpec((C,), ('kv_lora',), init='ones'),
      'wkv_b': ParamSpec((C, H, Nn + M), ('kv_lora', 'heads', 'head_dim'), scale=s),
      'wo': ParamSpec((H, M, D), ('heads', 'head_dim', 'embed'), scale=out),
  }
  if cfg.mla.q_lora_rank:
    specs['wq_a'] = ParamSpec((D, cfg.mla.q_lora_rank), ('embed', 'q_lora'), scale=s)
    specs['q_norm'] = ParamSpec((cfg.mla.q_lora_rank,), ('q_lora',), init='ones')
    specs['wq_b'] = ParamSpec((cfg.mla.q_lora_rank, H, Nn + R), ('q_lora', 'heads', 'head_dim'), scale=s)
  else:
    specs['wq'] = ParamSpec((D, H, Nn + R), ('embed', 'heads', 'head_dim'), scale=s)
  return specs


def latent_scale(cfg, rank: int) -> float:
  """Variance alignment (LongCat-Flash): the RMS-normalised latent has unit variance per dim, so
  its up-projection's output variance grows with the rank; sqrt(d_model / rank) makes it match a
  projection from d_model, whatever the rank."""
  return (cfg.d_model / rank) ** 0.5 if cfg.variance_alignment else 1.0


def mla_mscale(cfg) -> float:
  """DeepSeek's YaRN softmax-scale correction (DeepseekV2/V3Attention: scaling = qk_head_dim ** -0.5
  * mscale(factor, mscale_all_dim) ** 2 when mscale_all_dim is set), applied to q: same scores."""
  if not (cfg.yarn_factor and cfg.yarn_mscale_all_dim):
    return 1.0
  return yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2


def mla_apply(p, x_BTD, cfg, segment_ids_BT=None):
  Nn, C = cfg.mla.qk_nope_head_dim, cfg.mla.kv_lora_rank
  if cfg.mla.q_lora_rank:
    q_lat = rms_norm(dense(x_BTD, p['wq_a']), p['q_norm'], cfg.norm_eps)
    q_BTHK = dense(q_lat * latent_scale(cfg, cfg.mla.q_lora_rank), p['wq_b'])
  else:
    q_BTHK = dense(x_BTD, p['wq'])
  q_BTHK = jnp.concatenate([q_BTHK[..., :Nn], rope(q_BTHK[..., Nn:], cfg)], axis=-1) * mla_mscale(cfg)
  kv_a = dense(x_BTD, p['wkv_a'])
  latent_BTC = rms_norm(kv_a[..., :C], p['kv_norm'], cfg.norm_eps) * latent_scale(cfg, C)
  k_rope_BT1R = rope(kv_a[..., None, C:], cfg)          # one rope key for all heads
  kv_BTHK = dense(latent_BTC, p['wkv_b'])
  H = q_BTHK.shape[2]
  k_BTHK = jnp.concatenate(
      [kv_BTHK[..., :Nn], jnp.broadcast_to(k_rope_BT1R, (*k_rope_BT1R.shape[:2], H, k_rope_BT1R.shape[-1]))],
      axis=-1)
  v_BTHM = kv_BTHK[..., Nn:]
  o, logit_max_H = attend(cfg, q_BTHK[:, :, :, None], k_BTHK, v_BTHM,   # G = H groups of one head
                          segment_ids_BT, softcap=cfg.softcap)
  return dense(o[:, :, :, 0], p['wo'], n_in=2), logit_max_H


def mla_flops(cfg, seq_len):
  D, H = cfg.d_model, cfg.num_heads
  Nn, R, M, C = cfg.mla.qk_nope_head_dim, cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim, cfg.mla.kv_lora_rank
  q = D * cfg.mla.q_lora_rank + cfg.mla.q_lora_rank * H * (Nn + R) if cfg.mla.q_lora_rank else D * H * (Nn + R)
  proj = 2 * (q + D * (C + R) + C * H * (Nn + M) + H * M * D)
  return proj + seq_len * H * (Nn + R + M)


# --- decoding: one token per row against a cache ---

def gqa_init_cache(cfg, batch, max_len, dtype, num_kv_heads=None):
  """Keys (after QK-norm and RoPE) and values of every position: [B, max_len, G, N] each."""
  shape = (batch, max_len, num_kv_heads or cfg.num_kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def mha_init_cache(cfg, batch, max_len, dtype):
  return gqa_init_cache(cfg, batch, max_len, dtype, num_kv_heads=cfg.num_heads)


def gqa_decode(p, x_BD, cache, pos, cfg):
  G = p['wk'].shape[1]
  q, k, v = (a[:, 0] for a in gqa_qkv(p, x_BD[:, None], cfg, offset=pos))
  cache = {'k': cache_write(cache['k'], k, pos), 'v': cache_write(cache['v'], v, pos)}
  o_BGHN = decode_softmax_attention(q, cache['k'], cache['v'], jnp.arange(cache['k'].shape[1]) <= pos,
                                    **_softmax_options(p, cfg, G))
  return gqa_out(p, o_BGHN[:, None])[:, 0], cache


def swa_init_cache(cfg, batch, max_len, dtype):
  """A ring of the latest `window` keys and values: memory O(window), whatever max_len."""
  return ring_cache(batch, cfg.window, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)


def swa_decode(p, x_BD, cache, pos, cfg):
  G = p['wk'].shape[1]
  q, k, v = (a[:, 0] for a in gqa_qkv(p, x_BD[:, None], cfg, offset=pos))
  o_BGHN, cache = ring_attention(q, k, v, cache, pos, **_softmax_options(p, cfg, G))
  return gqa_out(p, o_BGHN[:, None])[:, 0], cache


def mla_init_cache(cfg, batch, max_len, dtype):
  """Only the normalised latent [B, max_len, C] and the shared RoPE key [B, max_len, R]."""
  return {'latent': jnp.zeros((batch, max_len, cfg.mla.kv_lora_rank), dtype),
          'k_rope': jnp.zeros((batch, max_len, cfg.mla.qk_rope_head_dim), dtype)}


def mla_decode(p, x_BD, cache, pos, cfg):
  """Absorbed MLA (DeepSeek-V2 sec. 2.1.3): k_nope_h = W_UK_h c and v_h = W_UV_h c are never
  formed; W_UK_h folds into the query (q_nope_h^T W_UK_h c = (W_UK_h^T q_nope_h)^T c) and W_UV_h
  into the output (sum_s p_s W_UV_h c_s = W_UV_h sum_s p_s c_s), so each step reads only the
  cached latents and RoPE keys."""
  Nn, C = cfg.mla.qk_nope_head_dim, cfg.mla.kv_lora_rank
  x_B1D = x_BD[:, None]
  if cfg.mla.q_lora_rank:
    q_lat = rms_norm(dense(x_B1D, p['wq_a']), p['q_norm'], cfg.norm_eps)
    q_B1HK = dense(q_lat * latent_scale(cfg, cfg.mla.q_lora_rank), p['wq_b'])
  else:
    q_B1HK = dense(x_B1D, p['wq'])
  q_nope_BHN = q_B1HK[:, 0, :, :Nn] * mla_mscale(cfg)
  q_rope_BHR = rope(q_B1HK[..., Nn:], cfg, pos)[:, 0] * mla_mscale(cfg)
  kv_a = dense(x_BD, p['wkv_a'])
  latent_BC = rms_norm(kv_a[..., :C], p['kv_norm'], cfg.norm_eps) * latent_scale(cfg, C)
  k_rope_BR = rope(kv_a[:, None, None, C:], cfg, pos)[:, 0, 0]
  cache = {'latent': cache_write(cache['latent'], latent_BC, pos),
           'k_rope': cache_write(cache['k_rope'], k_rope_BR, pos)}
  w_uk_CHN, w_uv_CHM = p['wkv_b'][..., :Nn], p['wkv_b'][..., Nn:]
  q_lat_BHC = jnp.einsum('bhn,chn->bhc', q_nope_BHN, w_uk_CHN)
  scores_BHS = (jnp.einsum('bhc,bsc->bhs', q_lat_BHC, cache['latent'])
                + jnp.einsum('bhr,bsr->bhs', q_rope_BHR, cache['k_rope'])).astype(jnp.float32)
  scores_BHS = scores_BHS * q_B1HK.shape[-1] ** -0.5
  probs = softmax_probs(scores_BHS, jnp.arange(cache['latent'].shape[1]) <= pos, cfg.softcap)
  o_lat_BHC = jnp.einsum('bhs,bsc->bhc', probs.astype(cache['latent'].dtype), cache['latent'])
  o_BHM = jnp.einsum('bhc,chm->bhm', o_lat_BHC, w_uv_CHM)
  return dense(o_BHM, p['wo'], n_in=2), cache


# --- QK-clip (moejax.qk_clip): rescale query/key projections so each head's logits scale by gamma ---

def gqa_qk_clip(p, gamma_LH, cfg):
  """A kv head is shared by its group: it takes sqrt(min gamma of the group) and each query head
  the rest, gamma_h / sqrt(min gamma), so every head's logits scale by exactly gamma_h."""
  del cfg
  L, H = gamma_LH.shape
  G = p['wk'].shape[2]                                     # wk [L, D, G, N]
  gamma_LGh = gamma_LH.reshape(L, G, H // G)
  k_factor_LG = jnp.sqrt(gamma_LGh.min(-1))
  q_factor_LH = (gamma_LGh / k_factor_LG[..., None]).reshape(L, H)
  out = {**p, 'wq': scale_heads(p['wq'], q_factor_LH, 1), 'wk': scale_heads(p['wk'], k_factor_LG, 1)}
  if 'bq' in p:   # q = x wq + bq: the bias scales with its projection (flat [L, H * N] -> per head)
    N = p['wq'].shape[-1]
    flat_scaled = lambda b, f: scale_heads(b.reshape(L, -1, N), f, 0).reshape(b.shape)
    out.update(bq=flat_scaled(p['bq'], q_factor_LH), bk=flat_scaled(p['bk'], k_factor_LG))
  return out


def mla_qk_clip(p, gamma_LH, cfg):
  """The per-head no-RoPE query and key parts by sqrt(gamma), the RoPE query part by gamma; the
  RoPE key is shared by all heads and is left alone."""
  Nn = cfg.mla.qk_nope_head_dim
  half = jnp.sqrt(gamma_LH)
  q_key = 'wq_b' if 'wq_b' in p else 'wq'
  q = p[q_key]                                             # [L, in, H, Nn + R]
  kv = p['wkv_b']                                          # [L, C, H, Nn + M]
  return {**p,
          q_key: jnp.concatenate([scale_heads(q[..., :Nn], half, 1),
                                  scale_heads(q[..., Nn:], gamma_LH, 1)], axis=-1),
          'wkv_b': jnp.concatenate([scale_heads(kv[..., :Nn], half, 1), kv[..., Nn:]], axis=-1)}


# --- activation estimates (moejax.tools.memory): per token, 2D (norm in/out) + projections + q, k
# after RoPE + output + the probabilities H x keys; the matmul outputs are the projections + D ---

def gqa_activations(cfg, seq_len: int, tp: int, num_kv_heads=None, keys=None):
  H = cfg.num_heads / tp
  G = (num_kv_heads or cfg.num_kv_heads) / tp
  D, N, keys = cfg.d_model, cfg.head_dim, keys or seq_len
  proj = H * N + 2 * G * N
  return 2 * D + proj + (H + G) * N + H * N + H * keys, proj + D


def mha_activations(cfg, seq_len: int, tp: int):
  return gqa_activations(cfg, seq_len, tp, num_kv_heads=cfg.num_heads)


def swa_activations(cfg, seq_len: int, tp: int):
  return gqa_activations(cfg, seq_len, tp, keys=min(cfg.window, seq_len) * 2)   # blocks of 2 windows


def mla_activations(cfg, seq_len: int, tp: int):
  D, H = cfg.d_model, cfg.num_heads / tp
  m = cfg.mla
  Nn, R, M, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
  q = H * (Nn + R)
  proj = (C + R) + q + H * (Nn + M) + m.q_lora_rank
  return 2 * D + proj + C + q + H * (Nn + R) + H * M + H * seq_len, proj + D


GQA_OPTIONS = frozenset({'qk_norm', 'sinks', 'softcap', 'qkv_bias'})
GQA = Attention(gqa_specs, gqa_apply, gqa_flops, gqa_init_cache, gqa_decode, gqa_qk_clip, GQA_OPTIONS,
                gqa_activations)
MHA = Attention(mha_specs, gqa_apply, mha_flops, mha_init_cache, gqa_decode, gqa_qk_clip, GQA_OPTIONS,
                mha_activations)
SWA = Attention(gqa_specs, swa_apply, swa_flops, swa_init_cache, swa_decode, gqa_qk_clip, GQA_OPTIONS,
                swa_activations)
MLA = Attention(mla_specs, mla_apply, mla_flops, mla_init_cache, mla_decode, mla_qk_clip,
                frozenset({'softcap'}), mla_activations)
