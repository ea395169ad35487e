"""The attention interface and the softmax kernels shared by the softmax types.

Axis letters: B batch, T/S query/key positions, G key-value heads, H query heads per kv head,
N/M head dims, W window (block) length, C number of blocks.
"""
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

NEG = -1e30   # additive mask value (finite, so fully masked rows stay NaN-free)


@dataclass(frozen=True)
class Attention:
  specs: Callable             # cfg -> {name: ParamSpec}
  apply: Callable             # (p, x_BTD, cfg) -> y_BTD
  flops_per_token: Callable   # (cfg, seq_len) -> forward FLOPs of one layer for one token


def masked_softmax(scores, mask):
  """Softmax over the last axis where `mask`; rows with nothing unmasked give all zeros."""
  probs = jax.nn.softmax(jnp.where(mask, scores, NEG), axis=-1)
  return jnp.where(mask, probs, 0.0)


def causal_softmax_attention(q_BTGHN, k_BSGN, v_BSGM):
  """softmax(q k^T / sqrt(N)) v with a causal mask; H query heads share each of G kv heads."""
  T = q_BTGHN.shape[1]
  scores = jnp.einsum('btghn,bsgn->bghts', q_BTGHN, k_BSGN).astype(jnp.float32)
  scores = scores * (q_BTGHN.shape[-1] ** -0.5)
  mask_TS = jnp.tril(jnp.ones((T, T), bool))
  scores = jnp.where(mask_TS, scores, NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGM.dtype)
  return jnp.einsum('bghts,bsgm->btghm', probs, v_BSGM)


def _blocks(x_BT, W: int, C: int):
  """[B, T, ...] -> [B, C, W, ...], zero-padded at the end to C * W positions."""
  pad = C * W - x_BT.shape[1]
  x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
  return x_BT.reshape(x_BT.shape[0], C, W, *x_BT.shape[2:])


def sliding_window_attention(q_BTGHN, k_BTGN, v_BTGM, window: int):
  """Causal attention to the `window` latest keys (t - window < s <= t), blocked: each block of
  W = window queries reads only its own and the previous key block, so cost is O(T * window)."""
  B, T, G, H, N = q_BTGHN.shape
  W = min(window, T)
  C = -(-T // W)
  q_BCWGHN = _blocks(q_BTGHN, W, C)
  k_BCWGN, v_BCWGM = _blocks(k_BTGN, W, C), _blocks(v_BTGM, W, C)
  prev = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  k_BCSGN = jnp.concatenate([prev(k_BCWGN), k_BCWGN], axis=2)     # S = 2W keys: previous + own
  v_BCSGM = jnp.concatenate([prev(v_BCWGM), v_BCWGM], axis=2)
  scores = jnp.einsum('bcwghn,bcsgn->bcghws', q_BCWGHN, k_BCSGN).astype(jnp.float32) * N ** -0.5
  t_W, s_S = jnp.arange(W)[:, None] + W, jnp.arange(2 * W)[None, :]   # offsets from the previous block's start
  mask_WS = (s_S <= t_W) & (s_S > t_W - window)
  mask_CWS = mask_WS[None] & ((jnp.arange(C) > 0)[:, None, None] | (s_S >= W)[None])  # block 0 has no previous
  probs = jax.nn.softmax(jnp.where(mask_CWS[None, :, None, None], scores, NEG), axis=-1)
  o = jnp.einsum('bcghws,bcsgm->bcwghm', probs.astype(v_BTGM.dtype), v_BCSGM)
  return o.reshape(B, C * W, G, H, -1)[:, :T]
