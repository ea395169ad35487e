"""Softmax attention types: GQA (MHA when every query head has its own kv head), SWA, MLA.

Axis letters: B batch, T positions, D model, H query heads, G key-value heads, N head dim,
R rope dim, C latent rank.
"""
from moejax.attention.core import Attention, causal_softmax_attention, sliding_window_attention
from moejax.layers import dense, rms_norm, rope
from moejax.params import ParamSpec
import jax.numpy as jnp


# --- GQA: grouped-query attention with RoPE ---

def gqa_specs(cfg, num_kv_heads: int | None = None):
  D, H, N = cfg.d_model, cfg.num_heads, cfg.head_dim
  G = num_kv_heads or cfg.num_kv_heads
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
  specs = {
      'wq': ParamSpec((D, H, N), ('embed', 'heads', 'head_dim'), scale=s),
      'wk': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wv': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wo': ParamSpec((H, N, D), ('heads', 'head_dim', 'embed'), scale=out),
  }
  if cfg.qk_norm:   # RMSNorm of each head's query and key before RoPE (OLMo 2, Qwen 3)
    specs['q_norm'] = ParamSpec((N,), ('head_dim',), init='ones')
    specs['k_norm'] = ParamSpec((N,), ('head_dim',), init='ones')
  if cfg.attn_sinks:   # one learned sink logit per query head
    specs['sinks'] = ParamSpec((H,), ('heads',), init='zeros')
  return specs


def mha_specs(cfg):
  return gqa_specs(cfg, num_kv_heads=cfg.num_heads)


def gqa_qkv(p, x_BTD, cfg):
  """q_BTGHN, k_BTGN, v_BTGN with RoPE; G is read from the parameters (so MHA shares this)."""
  B, T, _ = x_BTD.shape
  G, N = p['wk'].shape[1], p['wk'].shape[2]
  q_BTHN, k_BTGN = dense(x_BTD, p['wq']), dense(x_BTD, p['wk'])
  if 'q_norm' in p:
    q_BTHN = rms_norm(q_BTHN, p['q_norm'], cfg.norm_eps)
    k_BTGN = rms_norm(k_BTGN, p['k_norm'], cfg.norm_eps)
  q_BTHN, k_BTGN = rope(q_BTHN, cfg.rope_theta), rope(k_BTGN, cfg.rope_theta)
  return q_BTHN.reshape(B, T, G, -1, N), k_BTGN, dense(x_BTD, p['wv'])


def _softmax_options(p, cfg, G: int) -> dict:
  sink = p['sinks'].reshape(G, -1) if 'sinks' in p else None
  return {'softcap': cfg.attn_softcap, 'sink_GH': sink}


def gqa_out(p, o_BTGHN):
  B, T, _, _, N = o_BTGHN.shape
  return dense(o_BTGHN.reshape(B, T, -1, N), p['wo'], n_in=2)


def gqa_apply(p, x_BTD, cfg, segment_ids_BT=None):
  G = p['wk'].shape[1]
  o, logit_max_H = causal_softmax_attention(*gqa_qkv(p, x_BTD, cfg), segment_ids_BT,
                                            **_softmax_options(p, cfg, G))
  return gqa_out(p, o), logit_max_H


def swa_apply(p, x_BTD, cfg, segment_ids_BT=None):
  G = p['wk'].shape[1]
  o, logit_max_H = sliding_window_attention(*gqa_qkv(p, x_BTD, cfg), cfg.window, segment_ids_BT,
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
  Nn, R, M, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
  specs = {
      'wkv_a': ParamSpec((D, C + R), ('embed', 'kv_lora'), scale=s),   # latent + shared rope key
      'kv_norm': ParamSpec((C,), ('kv_lora',), init='ones'),
      'wkv_b': ParamSpec((C, H, Nn + M), ('kv_lora', 'heads', 'head_dim'), scale=s),
      'wo': ParamSpec((H, M, D), ('heads', 'head_dim', 'embed'), scale=out),
  }
  if cfg.q_lora_rank:
    specs['wq_a'] = ParamSpec((D, cfg.q_lora_rank), ('embed', 'q_lora'), scale=s)
    specs['q_norm'] = ParamSpec((cfg.q_lora_rank,), ('q_lora',), init='ones')
    specs['wq_b'] = ParamSpec((cfg.q_lora_rank, H, Nn + R), ('q_lora', 'heads', 'head_dim'), scale=s)
  else:
    specs['wq'] = ParamSpec((D, H, Nn + R), ('embed', 'heads', 'head_dim'), scale=s)
  return specs


def latent_scale(cfg, rank: int) -> float:
  """Variance alignment (LongCat-Flash): the RMS-normalised latent has unit variance per dim, so
  its up-projection's output variance grows with the rank; sqrt(d_model / rank) makes it match a
  projection from d_model, whatever the rank."""
  return (cfg.d_model / rank) ** 0.5 if cfg.variance_alignment else 1.0


def mla_apply(p, x_BTD, cfg, segment_ids_BT=None):
  Nn, C = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  if cfg.q_lora_rank:
    q_lat = rms_norm(dense(x_BTD, p['wq_a']), p['q_norm'], cfg.norm_eps)
    q_BTHK = dense(q_lat * latent_scale(cfg, cfg.q_lora_rank), p['wq_b'])
  else:
    q_BTHK = dense(x_BTD, p['wq'])
  q_BTHK = jnp.concatenate([q_BTHK[..., :Nn], rope(q_BTHK[..., Nn:], cfg.rope_theta)], axis=-1)
  kv_a = dense(x_BTD, p['wkv_a'])
  latent_BTC = rms_norm(kv_a[..., :C], p['kv_norm'], cfg.norm_eps) * latent_scale(cfg, C)
  k_rope_BT1R = rope(kv_a[..., None, C:], cfg.rope_theta)          # one rope key for all heads
  kv_BTHK = dense(latent_BTC, p['wkv_b'])
  H = q_BTHK.shape[2]
  k_BTHK = jnp.concatenate(
      [kv_BTHK[..., :Nn], jnp.broadcast_to(k_rope_BT1R, (*k_rope_BT1R.shape[:2], H, k_rope_BT1R.shape[-1]))],
      axis=-1)
  v_BTHM = kv_BTHK[..., Nn:]
  o, logit_max_H = causal_softmax_attention(q_BTHK[:, :, :, None], k_BTHK, v_BTHM,  # G = H groups
                                            segment_ids_BT, softcap=cfg.attn_softcap)  # of one head
  return dense(o[:, :, :, 0], p['wo'], n_in=2), logit_max_H


def mla_flops(cfg, seq_len):
  D, H = cfg.d_model, cfg.num_heads
  Nn, R, M, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * (Nn + R) if cfg.q_lora_rank else D * H * (Nn + R)
  proj = 2 * (q + D * (C + R) + C * H * (Nn + M) + H * M * D)
  return proj + seq_len * H * (Nn + R + M)


GQA = Attention(gqa_specs, gqa_apply, gqa_flops)
MHA = Attention(mha_specs, gqa_apply, mha_flops)
SWA = Attention(gqa_specs, swa_apply, swa_flops)
MLA = Attention(mla_specs, mla_apply, mla_flops)
