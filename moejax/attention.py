"""Causal self-attention types behind one interface, selected by name (`config.model.attention`).

Each type is an `Attention(specs, apply)`: `specs(cfg)` declares its parameters (ParamSpec with
logical axes) and `apply(p, x_BTD, cfg)` returns y_BTD. Axis letters: B batch, T/S query/key
positions, D model, H query heads, G key-value heads, N head dim, R rope dim, C latent rank.
"""
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.layers import dense, rms_norm, rope
from moejax.params import ParamSpec


@dataclass(frozen=True)
class Attention:
  specs: Callable
  apply: Callable
  flops_per_token: Callable   # (cfg, seq_len) -> forward FLOPs of one layer for one token


def causal_softmax_attention(q_BTGHN, k_BSGN, v_BSGM):
  """softmax(q k^T / sqrt(N)) v with a causal mask; H query heads share each of G kv heads."""
  T = q_BTGHN.shape[1]
  scores = jnp.einsum('btghn,bsgn->bghts', q_BTGHN, k_BSGN).astype(jnp.float32)
  scores = scores * (q_BTGHN.shape[-1] ** -0.5)
  mask_TS = jnp.tril(jnp.ones((T, T), bool))
  scores = jnp.where(mask_TS, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGM.dtype)
  return jnp.einsum('bghts,bsgm->btghm', probs, v_BSGM)


# --- GQA: grouped-query attention with RoPE (MHA when num_kv_heads == num_heads) ---

def gqa_specs(cfg):
  D, H, G, N = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
  return {
      'wq': ParamSpec((D, H, N), ('embed', 'heads', 'head_dim'), scale=s),
      'wk': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wv': ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s),
      'wo': ParamSpec((H, N, D), ('heads', 'head_dim', 'embed'), scale=out),
  }


def gqa_apply(p, x_BTD, cfg):
  B, T, _ = x_BTD.shape
  G, N = cfg.num_kv_heads, cfg.head_dim
  q_BTHN = rope(dense(x_BTD, p['wq']), cfg.rope_theta)
  k_BTGN = rope(dense(x_BTD, p['wk']), cfg.rope_theta)
  v_BTGN = dense(x_BTD, p['wv'])
  o = causal_softmax_attention(q_BTHN.reshape(B, T, G, -1, N), k_BTGN, v_BTGN)
  return dense(o.reshape(B, T, -1, N), p['wo'], n_in=2)


def gqa_flops(cfg, seq_len):
  D, H, G, N = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  proj = 2 * D * N * (2 * H + 2 * G)
  return proj + 2 * seq_len * H * N   # causal: half of 2*(QK^T + AV) over seq_len keys


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


def mla_apply(p, x_BTD, cfg):
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
  o = causal_softmax_attention(q_BTHK[:, :, :, None], k_BTHK, v_BTHM)   # G = H groups of one head
  return dense(o[:, :, :, 0], p['wo'], n_in=2)


def mla_flops(cfg, seq_len):
  D, H = cfg.d_model, cfg.num_heads
  Nn, R, M, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * (Nn + R) if cfg.q_lora_rank else D * H * (Nn + R)
  proj = 2 * (q + D * (C + R) + C * H * (Nn + M) + H * M * D)
  return proj + seq_len * H * (Nn + R + M)


ATTENTIONS = {
    'gqa': Attention(gqa_specs, gqa_apply, gqa_flops),
    'mla': Attention(mla_specs, mla_apply, mla_flops),
}
