"""Fused softmax attention for the training forward of GQA / MHA / SWA / MLA, behind
`model.attn.implementation`; the XLA path (moejax.attention.core, scores materialised) is the
reference each is tested against.

  'xla'                    core.causal_softmax_attention / sliding_window_attention (the CPU path)
  'dot_product_attention'  `jax.nn.dot_product_attention`: cuDNN flash attention on GPU for bf16 /
                           fp16 inputs, its XLA implementation otherwise; no soft cap
  'tokamax'                `tokamax.dot_product_attention`: Mosaic GPU / Mosaic TPU flash attention;
                           on CPU its kernels refuse and it runs its XLA implementation
  'auto'                   cpu -> 'xla'; gpu -> 'dot_product_attention' ('tokamax' with a soft cap);
                           tpu -> 'tokamax'; 'xla' everywhere with attention sinks (no kernel has them)

Causality, the sliding window (t - window < s <= t) and document masks (segment ids, as a boolean
[B, 1, T, S] mask) are passed to the kernels; MLA's value head dim differs from its query/key head
dim, so for jax.nn the narrower side is zero-padded (zeros change neither q.k nor the output).
The kernels return no logits, so logit_max_H (the diagnostic and QK-clip's input) comes from a
separate forward-only pass over blocks of queries: one extra QK^T, never the whole [T, S] at once.

Axis letters: B batch, T/S query/key positions, G key-value heads, H query heads per kv head,
N query/key head dim, M value head dim, Q query block.
"""
import jax
import jax.numpy as jnp

from moejax.attention.core import same_segment

IMPLEMENTATIONS = ('xla', 'dot_product_attention', 'tokamax', 'auto')
FUSED = ('dot_product_attention', 'tokamax')
LOGIT_BLOCK = 512   # queries per block of the logit-max pass


def resolve(name: str, platform: str, softcap: float = 0.0, sinks: bool = False) -> str:
  """'auto' -> the implementation for the backend (module docstring); other names as given."""
  if name != 'auto':
    return name
  if sinks or platform == 'cpu':
    return 'xla'
  if platform == 'tpu':
    return 'tokamax'
  if platform in ('gpu', 'cuda', 'rocm'):
    return 'tokamax' if softcap else 'dot_product_attention'
  return 'xla'


def _mask_B1TS(segment_ids_BT):
  if segment_ids_BT is None:
    return None
  return same_segment(segment_ids_BT, segment_ids_BT)[:, None]


def logit_max(q_BTGHN, k_BSGN, segment_ids_BT=None, window: int | None = None, block: int = LOGIT_BLOCK):
  """Each query head's largest causal (windowed, same-document) logit q.k / sqrt(N) over the batch,
  [G * H] float32, as the XLA path reports it; computed over blocks of `block` queries."""
  B, T, G, H, N = q_BTGHN.shape
  Q = min(block, T)
  C = -(-T // Q)
  pad = C * Q - T
  q_CBQGHN = jnp.pad(q_BTGHN, [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)]).reshape(B, C, Q, G, H, N).swapaxes(0, 1)
  seg_BT = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
  s_S = jnp.arange(T)

  def one_block(args):
    c, q_BQGHN = args
    t_Q = c * Q + jnp.arange(Q)
    mask_QS = (s_S[None] <= t_Q[:, None]) & (t_Q[:, None] < T)
    if window is not None:
      mask_QS &= s_S[None] > t_Q[:, None] - window
    seg_BQ = jnp.take(seg_BT, jnp.minimum(t_Q, T - 1), axis=1)
    mask_BQS = mask_QS[None] & (seg_BQ[:, :, None] == seg_BT[:, None, :])
    scores = jnp.einsum('bqghn,bsgn->bghqs', q_BQGHN, k_BSGN).astype(jnp.float32) * N ** -0.5
    scores = jnp.where(mask_BQS[:, None, None], scores, -jnp.inf)
    return jnp.max(scores, axis=(0, 3, 4))   # [G, H]

  k_BSGN = jax.lax.stop_gradient(k_BSGN)
  per_block = jax.lax.map(one_block, (jnp.arange(C), jax.lax.stop_gradient(q_CBQGHN)))
  return per_block.max(0).reshape(-1)


def _jax_nn(q_BTKN, k_BSKN, v_BSKM, mask, window, scale):
  """jax.nn.dot_product_attention (cuDNN on GPU for half precision); pads MLA's unequal head dims."""
  N, M = q_BTKN.shape[-1], v_BSKM.shape[-1]
  if M < N:
    v_BSKM = jnp.pad(v_BSKM, [(0, 0)] * 3 + [(0, N - M)])
  elif N < M:
    q_BTKN = jnp.pad(q_BTKN, [(0, 0)] * 3 + [(0, M - N)])
    k_BSKN = jnp.pad(k_BSKN, [(0, 0)] * 3 + [(0, M - N)])
  half = q_BTKN.dtype in (jnp.bfloat16, jnp.float16)
  impl = 'cudnn' if half and jax.default_backend() in ('gpu', 'cuda') else None
  o = jax.nn.dot_product_attention(q_BTKN, k_BSKN, v_BSKM, mask=mask, scale=scale, is_causal=True,
                                   local_window_size=None if window is None else (window - 1, 0),
                                   implementation=impl)
  return o[..., :M]


def _tokamax(q_BTKN, k_BSKN, v_BSKM, mask, window, scale, softcap):
  import tokamax   # imported here: the CPU path never needs it
  return tokamax.dot_product_attention(
      q_BTKN, k_BSKN, v_BSKM, mask=mask, scale=scale, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      logits_soft_cap=softcap or None)


def fused_attention(implementation: str, q_BTGHN, k_BSGN, v_BSGM, segment_ids_BT=None,
                    window: int | None = None, softcap: float = 0.0):
  """Causal (windowed when `window`) attention through a fused kernel: o_BTGHM and logit_max_H."""
  B, T, G, H, N = q_BTGHN.shape
  q_BTKN = q_BTGHN.reshape(B, T, G * H, N)   # kv head g serves query heads g*H .. g*H + H-1
  mask = _mask_B1TS(segment_ids_BT)
  if implementation == 'dot_product_attention':
    if softcap:
      raise ValueError("model.attn.implementation 'dot_product_attention' has no soft cap; use 'tokamax' or 'xla'")
    o = _jax_nn(q_BTKN, k_BSGN, v_BSGM, mask, window, N ** -0.5)
  elif implementation == 'tokamax':
    o = _tokamax(q_BTKN, k_BSGN, v_BSGM, mask, window, N ** -0.5, softcap)
  else:
    raise ValueError(f'not a fused attention implementation: {implementation!r}')
  o_BTGHM = o.reshape(B, T, G, H, -1).astype(v_BSGM.dtype)
  return o_BTGHM, logit_max(q_BTGHN, k_BSGN, segment_ids_BT, window)
