"""Precision policies (`config.model.precision`) and the fp8 matmul used by the MLP weights.

  policy  parameters  compute   expert + dense MLP matmuls
  fp32    float32     float32
  bf16    float32     bfloat16
  fp8     float32     bfloat16  fp8: e4m3 operands forward, e5m2 gradients backward

Whatever the policy, parameters (the master weights the optimizer updates) stay float32 and the
reductions stay float32: router scores and top-k, softmax, RMS norms and the loss (see model.py,
moe.route, layers.rms_norm).

The fp8 matmuls run through qwix (`einsum_for(True)` = `qwix_fp8_einsum`; the grouped matmuls:
moejax.grouped_matmul): operands quantized to e4m3 with current absmax scales per channel (per row
of the activations, per output column of the weights), the dot taken over the float8 values with
the scales applied to its output, and the output's cotangent quantized to e5m2 for both backward
matmuls (dx = g w^T, dw = x^T g). XLA lowers those float8 dots to the backend's fp8 GEMMs where it
has them (Hopper and later GPUs; `python -m moejax.tools.device_check` looks for them in the
compiled HLO) and upcasts them elsewhere (CPU), so the CPU result is the same rounding, emulated.

`fp8_einsum` is the older per-tensor quantize-dequantize emulation (one scale amax / max(e4m3)
per operand, e5m2 cotangent); it stays as the reference the qwix path is tested against.
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


def einsum_dimension_numbers(spec: str):
  """'nsd,ndf->nsf' -> (dot_general dimension numbers, the permutation from dot_general's output
  order (batch, x's free, w's free) to the spec's output order). Two operands, no repeated or
  summed-away-alone letters (every letter of an operand is in the other operand or the output)."""
  ins, out = spec.replace(' ', '').split('->')
  a, b = ins.split(',')
  if len(set(a)) != len(a) or len(set(b)) != len(b) or any(c not in a + b for c in out):
    raise ValueError(f'einsum {spec!r}: not a two-operand contraction')
  batch = [c for c in a if c in b and c in out]
  contract = [c for c in a if c in b and c not in out]
  if any(c not in b and c not in out for c in a) or any(c not in a and c not in out for c in b):
    raise ValueError(f'einsum {spec!r}: a letter summed over one operand alone')
  free_a = [c for c in a if c not in b]
  free_b = [c for c in b if c not in a]
  dnums = (([a.index(c) for c in contract], [b.index(c) for c in contract]),
           ([a.index(c) for c in batch], [b.index(c) for c in batch]))
  natural = batch + free_a + free_b
  return dnums, tuple(natural.index(c) for c in out)


def _qwix_fp8_config():
  from qwix._src.core import dot_general_qt   # the pure-function core (no Flax interception)
  return dot_general_qt.DotGeneralQtConfig(lhs_qtype=E4M3, rhs_qtype=E4M3, dlhs_grad_qtype=E5M2,
                                           drhs_grad_qtype=E5M2)


def qwix_fp8_einsum(spec: str, x, w):
  """jnp.einsum(spec, x, w) through qwix's fp8 dot_general (e4m3 forward, e5m2 backward)."""
  from qwix._src.core import dot_general_qt
  dnums, perm = einsum_dimension_numbers(spec)
  y = dot_general_qt.dot_general_qt(x, w, dnums, _qwix_fp8_config())
  if perm != tuple(range(len(perm))):
    y = jnp.transpose(y, perm)
  return y.astype(jnp.result_type(x, w))


def einsum_for(fp8: bool):
  return qwix_fp8_einsum if fp8 else jnp.einsum
