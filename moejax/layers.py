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


def rope(x_BTHN, theta: float, offset=0):
  """Rotary embedding (rotate-half form) at positions offset..offset+T-1 (offset may be traced:
  decoding passes the position of its one token)."""
  T, N = x_BTHN.shape[1], x_BTHN.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, N, 2, dtype=jnp.float32) / N)
  angle_TN = (offset + jnp.arange(T)).astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_TN)[None, :, None, :], jnp.sin(angle_TN)[None, :, None, :]
  x1, x2 = jnp.split(x_BTHN.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHN.dtype)


def swiglu(p, x, einsum=jnp.einsum):
  """SwiGLU feed-forward: (silu(x W_gate) * x W_up) W_down over the last dim of x."""
  h = jax.nn.silu(dense(x, p['w_gate'], einsum=einsum)) * dense(x, p['w_up'], einsum=einsum)
  return dense(h, p['w_down'], einsum=einsum)
