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
  # (p, x_BTD, cfg, segment_ids_BT=None) -> (y_BTD, logit_max_H): with segment ids, a position
  # attends only within its own document; logit_max_H is each query head's largest attention logit
  # (after the 1/sqrt(d) scale) over the batch, float32 (the diagnostic and QK-clip's input).
  apply: Callable
  flops_per_token: Callable   # (cfg, seq_len) -> forward FLOPs of one layer for one token
  # (cfg, batch, max_len, dtype) -> the decode cache pytree for sequences of up to max_len tokens.
  init_cache: Callable
  # (p, x_BD, cache, pos, cfg) -> (y_BD, cache): the output for one new token per row at position
  # `pos` (a scalar, the same for every row) given the cache of positions 0..pos-1; equals apply's
  # output at that position.
  decode: Callable
  # (p stacked over L layers, gamma_LH, cfg) -> p with QK-clip applied (moejax.qk_clip); None when
  # rescaling the projections would not rescale the logits (the type refuses optim.qk_clip).
  qk_clip: Callable | None = None
  supports: frozenset = frozenset()   # options of model.attn it honours: 'qk_norm', 'sinks', 'softcap'
  # (cfg, seq_len, tp) -> (saved elements, matmul-output elements) per token of one layer, the
  # activation estimate of moejax.tools.memory (heads split over `tp`); None: no estimate yet.
  activations: Callable | None = None


def scale_heads(w, factor_LH, head_axis: int):
  """w [L, ..., heads at head_axis (counted without L), ...] times factor [L, heads]."""
  shape = [factor_LH.shape[0]] + [1] * (w.ndim - 1)
  shape[head_axis + 1] = factor_LH.shape[1]
  return w * factor_LH.reshape(shape).astype(w.dtype)


def same_segment(seg_q, seg_k):
  """[..., T] x [..., S] -> [..., T, S]: True where query and key are in the same document
  (everything, when there are no segment ids)."""
  if seg_q is None:
    return True
  return seg_q[..., :, None] == seg_k[..., None, :]


def logit_max(scores, mask, head_axes: tuple):
  """Max of the unmasked scores, kept per head (axes `head_axes`), flattened to [heads]."""
  s = jnp.where(mask, scores, -jnp.inf)
  other = tuple(a for a in range(s.ndim) if a not in head_axes)
  return jax.lax.stop_gradient(jnp.max(s, axis=other).reshape(-1).astype(jnp.float32))


def masked_softmax(scores, mask):
  """Softmax over the last axis where `mask`; rows with nothing unmasked give all zeros."""
  probs = jax.nn.softmax(jnp.where(mask, scores, NEG), axis=-1)
  return jnp.where(mask, probs, 0.0)


def softmax_probs(scores, mask, softcap: float = 0.0, sink=None):
  """Softmax over the last axis of the unmasked scores, optionally soft-capped (cap * tanh(s / cap),
  Gemma 2) and with a learned per-head sink logit that joins the denominator only (StreamingLLM /
  gpt-oss attention sinks; `sink` broadcasts against scores without the last axis)."""
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask, scores, NEG)
  if sink is None:
    return jax.nn.softmax(scores, axis=-1)
  sink = jnp.broadcast_to(sink.astype(jnp.float32), scores.shape[:-1])[..., None]
  return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


def causal_softmax_attention(q_BTGHN, k_BSGN, v_BSGM, segment_ids_BT=None, softcap=0.0, sink_GH=None):
  """softmax(q k^T / sqrt(N)) v with a causal (and document) mask; H query heads share each of G
  kv heads. Returns o_BTGHM and logit_max over [G * H] query heads (before any soft cap)."""
  T = q_BTGHN.shape[1]
  scores = jnp.einsum('btghn,bsgn->bghts', q_BTGHN, k_BSGN).astype(jnp.float32)
  scores = scores * (q_BTGHN.shape[-1] ** -0.5)
  mask_BTS = jnp.tril(jnp.ones((T, T), bool)) & same_segment(segment_ids_BT, segment_ids_BT)
  mask_BGHTS = jnp.expand_dims(mask_BTS, (-4, -3)) if mask_BTS.ndim == 3 else mask_BTS
  sink = None if sink_GH is None else sink_GH[:, :, None]
  probs = softmax_probs(scores, mask_BGHTS, softcap, sink).astype(v_BSGM.dtype)
  return jnp.einsum('bghts,bsgm->btghm', probs, v_BSGM), logit_max(scores, mask_BGHTS, (1, 2))


def _blocks(x_BT, W: int, C: int):
  """[B, T, ...] -> [B, C, W, ...], zero-padded at the end to C * W positions."""
  pad = C * W - x_BT.shape[1]
  x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
  return x_BT.reshape(x_BT.shape[0], C, W, *x_BT.shape[2:])


def sliding_window_attention(q_BTGHN, k_BTGN, v_BTGM, window: int, segment_ids_BT=None,
                             softcap=0.0, sink_GH=None):
  """Causal attention to the `window` latest keys (t - window < s <= t) of the same document,
  blocked: each block of W = window queries reads only its own and the previous key block, so cost
  is O(T * window). Returns o_BTGHM and logit_max over [G * H] query heads."""
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
  real_CW = (jnp.arange(C)[:, None] * W + jnp.arange(W)[None, :]) < T   # not a padding query
  mask = (mask_CWS & real_CW[..., None])[None, :, None, None]           # [B, C, G, H, W, S]
  if segment_ids_BT is not None:
    seg_BCW = _blocks(segment_ids_BT, W, C)
    seg_BCS = jnp.concatenate([prev(seg_BCW), seg_BCW], axis=2)
    mask = mask & same_segment(seg_BCW, seg_BCS)[:, :, None, None]
  sink = None if sink_GH is None else sink_GH[:, :, None]
  probs = softmax_probs(scores, mask, softcap, sink)
  o = jnp.einsum('bcghws,bcsgm->bcwghm', probs.astype(v_BTGM.dtype), v_BCSGM)
  return o.reshape(B, C * W, G, H, -1)[:, :T], logit_max(scores, mask, (2, 3))


# --- decoding: one query per row against a cache ---

def cache_write(cache_BS, x_B, index):
  """cache_BS with x_B written at `index` (traced) of axis 1."""
  return jax.lax.dynamic_update_slice_in_dim(cache_BS, x_B[:, None].astype(cache_BS.dtype), index, 1)


def decode_softmax_attention(q_BGHN, k_BSGN, v_BSGM, mask_S, softcap=0.0, sink_GH=None):
  """softmax(q k^T / sqrt(N)) v for one query per row over the cached keys where mask_S: o_BGHM."""
  scores = jnp.einsum('bghn,bsgn->bghs', q_BGHN, k_BSGN).astype(jnp.float32)
  probs = softmax_probs(scores * q_BGHN.shape[-1] ** -0.5, mask_S, softcap, sink_GH)
  return jnp.einsum('bghs,bsgm->bghm', probs.astype(v_BSGM.dtype), v_BSGM)


def ring_cache(batch: int, window: int, max_len: int, G: int, N: int, dtype) -> dict:
  """Keys and values of the latest min(window, max_len) positions, position s in slot s % size."""
  size = min(window, max_len)
  return {'k': jnp.zeros((batch, size, G, N), dtype), 'v': jnp.zeros((batch, size, G, N), dtype)}


def ring_attention(q_BGHN, k_BGN, v_BGN, cache, pos, softcap=0.0, sink_GH=None):
  """Sliding-window decode step: writes this position's key/value into the ring, then attends to
  every filled slot (the ring holds exactly the positions pos - size < s <= pos, so the window
  mask is the ring itself; softmax does not care about the slot order). Returns o_BGHN, cache."""
  size = cache['k'].shape[1]
  cache = {'k': cache_write(cache['k'], k_BGN, pos % size),
           'v': cache_write(cache['v'], v_BGN, pos % size)}
  o = decode_softmax_attention(q_BGHN, cache['k'], cache['v'], jnp.arange(size) <= pos, softcap, sink_GH)
  return o, cache
