"""Precision policies (`config.model.precision`) and the fp8 matmul used by the MLP weights.

  policy  parameters  compute   expert + dense MLP matmuls
  fp32    float32     float32
  bf16    float32     bfloat16
  fp8     float32     bfloat16  fp8: e4m3 operands forward, e5m2 gradients backward

Whatever the policy, parameters (the master weights the optimizer updates) stay float32 and the
reductions stay float32: router scores and top-k, softmax, RMS norms and the loss (see model.py,
moe.route, layers.rms_norm).

fp8 is per-tensor current scaling: each operand is scaled by amax / max(e4m3) at every call,
rounded to e4m3 and scaled back (quantize-dequantize); the output's cotangent is rounded to e5m2
the same way, so both backward matmuls (dx = g w^T, dw = x^T g) see e5m2 gradients and the e4m3
operands. On CPU this emulates fp8 rounding in the compute dtype; on GPU, XLA's GEMM rewriter fuses
the convert -> scale -> dot pattern into an fp8 GEMM where the hardware has one.
"""
import jax
import jax.numpy as jnp

POLICIES = ('fp32', 'bf16', 'fp8')
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def compute_dtype(cfg):
  """The activations' dtype under `cfg.precision`."""
  return jnp.dtype(jnp.float32) if cfg.precision == 'fp32' else jnp.dtype(jnp.bfloat16)


def fp8_mlp(cfg) -> bool:
  return cfg.precision == 'fp8'


def quantize_dequantize(x, dtype):
  """Rounds x to `dtype` with one scale per tensor from its current amax; returns x's dtype."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
  q = (x.astype(jnp.float32) / scale).astype(dtype)
  return (q.astype(jnp.float32) * scale).astype(x.dtype)


@jax.custom_vjp
def e4m3_operand(x):
  """Forward: x rounded to e4m3. Backward: the cotangent passes straight through."""
  return quantize_dequantize(x, E4M3)


e4m3_operand.defvjp(lambda x: (e4m3_operand(x), None), lambda _, g: (g,))


@jax.custom_vjp
def e5m2_cotangent(y):
  """Forward: identity. Backward: the cotangent rounded to e5m2."""
  return y


e5m2_cotangent.defvjp(lambda y: (y, None), lambda _, g: (quantize_dequantize(g, E5M2),))


def fp8_einsum(spec: str, x, w):
  """jnp.einsum(spec, x, w) with e4m3 operands and an e5m2 gradient (per-tensor current scaling)."""
  return e5m2_cotangent(jnp.einsum(spec, e4m3_operand(x), e4m3_operand(w)))


def einsum_for(fp8: bool):
  return fp8_einsum if fp8 else jnp.einsum
