"""Building blocks shared by the attention types and the feed-forward layers."""
import math

import jax
import jax.numpy as jnp


def dense(x, w, n_in: int = 1, einsum=jnp.einsum):
  """Contracts the last `n_in` dims of x with the first `n_in` of w, as one 2-D matmul.

  XLA:CPU runs a 3-D einsum such as 'btd,df->btf' (and its weight gradient) ~1.6x slower than
  the same product on flattened operands (measured), so every projection goes through here."""
  in_size = math.prod(w.shape[:n_in])
  y = einsum('md,df->mf', x.reshape(-1, in_size), w.reshape(in_size, -1))
  return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def rms_norm(x, scale, eps: float):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention-temperature correction for a context `factor` times the original
  (transformers' get_mscale): 0.1 * mscale * ln(factor) + 1, or 1 when factor <= 1."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg) -> float:
  """The factor on cos and sin under YaRN (transformers' rule): mscale(f, mscale) /
  mscale(f, mscale_all_dim) when both are set (non-zero), else mscale(f)."""
  f = cfg.yarn_factor
  if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
    return yarn_mscale(f, cfg.yarn_mscale) / yarn_mscale(f, cfg.yarn_mscale_all_dim)
  return yarn_mscale(f)


def rope_frequencies(N: int, cfg) -> tuple[jax.Array, float]:
  """(inverse frequencies [N / 2], factor on cos and sin) of RoPE over N dims.

  Plain: theta ** (-2i / N). YaRN (cfg.yarn_factor > 0), written as transformers'
  _compute_yarn_parameters so the bits match: each frequency blends its interpolated (/ factor)
  and original value by a linear ramp between the dims that turn beta_fast and beta_slow times
  over the original context (rounded outwards when yarn_truncate)."""
  theta = cfg.rope_theta
  factor = getattr(cfg, 'yarn_factor', 0.0)
  if not factor:   # this exact expression: runs from before YaRN keep their bits
    return theta ** (-jnp.arange(0, N, 2, dtype=jnp.float32) / N), 1.0
  pos_freqs = theta ** (jnp.arange(0, N, 2, dtype=jnp.float32) / N)
  orig = cfg.yarn_original_max_len

  def correction_dim(rotations):
    return N * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, N - 1)
  if low == high:
    high += 0.001   # transformers' guard against a zero-width ramp
  ramp = jnp.clip((jnp.arange(N // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv_freq, yarn_attention_factor(cfg)


class _Theta:
  """A bare RoPE base (callers that pass a number): halves layout, no YaRN."""
  rope_layout = 'halves'
  yarn_factor = 0.0

  def __init__(self, theta):
    self.rope_theta = theta


def rope(x_BTHN, cfg, offset=0):
  """Rotary embedding at positions offset..offset+T-1 (offset may be traced: decoding passes the
  position of its one token). `cfg`: the attention config (rope_theta, rope_layout, yarn_*) or a
  bare base theta.

  Layouts: 'halves' rotates dim i with dim i + N/2 (Llama, Qwen, OLMoE); 'pairs' rotates the
  interleaved pairs (2i, 2i+1) (DeepSeek with rope_interleave, V2's complex form) and, like
  transformers' apply_rotary_pos_emb_interleave, returns them de-interleaved (rotated evens, then
  odds). q and k get the same permutation, so q . k, the only thing attention reads, is unchanged."""
  cfg = _Theta(cfg) if isinstance(cfg, (int, float)) else cfg
  T, N = x_BTHN.shape[1], x_BTHN.shape[-1]
  inv_freq, scale = rope_frequencies(N, cfg)
  angle_TN = (offset + jnp.arange(T)).astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_TN)[None, :, None, :], jnp.sin(angle_TN)[None, :, None, :]
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  x = x_BTHN.astype(jnp.float32)
  if cfg.rope_layout == 'pairs':
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHN.dtype)


def swiglu(p, x, einsum=jnp.einsum):
  """SwiGLU feed-forward: (silu(x W_gate) * x W_up) W_down over the last dim of x."""
  h = jax.nn.silu(dense(x, p['w_gate'], einsum=einsum)) * dense(x, p['w_up'], einsum=einsum)
  return dense(h, p['w_down'], einsum=einsum)


def cross_entropy(logits_BTV, targets_BT, mask_BT):
  """Mean cross-entropy of the targets over the unmasked positions (float32 logits).

  logsumexp minus the target's logit picked by a compare with iota: the backward is then elementwise,
  where take_along_axis's would zero-fill and scatter a [B, T, V] buffer."""
  V = logits_BTV.shape[-1]
  is_target_BTV = jax.lax.broadcasted_iota(jnp.int32, (1, 1, V), 2) == targets_BT[..., None]
  target_logit_BT = jnp.sum(jnp.where(is_target_BTV, logits_BTV, 0.0), axis=-1)
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
  return jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
