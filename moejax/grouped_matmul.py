"""Grouped matmuls of rows sorted by expert: y_RF[r] = x_RD[r] @ w_LDF[l] for the rows r of group l
(group l = the next group_sizes_L[l] rows; rows past the groups are unspecified, callers mask them).

Axis letters: R rows, D input, F output, L groups (local experts).

Implementations, by the dispatch name that uses them (moejax.moe.DISPATCHES):
  'ragged_dot'  `jax.lax.ragged_dot` (XLA's own lowering on every backend; the CPU reference)
  'gmm'         the Pallas megablox grouped matmul (TPU kernel; the Pallas interpreter elsewhere)
  'tokamax'     `tokamax.ragged_dot`: Mosaic GPU / Triton on GPU, Mosaic on TPU; on CPU its kernels
                refuse and it falls back to its XLA implementation (correct, not faster)
fp8 (`model.precision = 'fp8'`): every implementation runs qwix's `ragged_dot_qt` instead, e4m3
operands forward (absmax scales per row of x, per output column of w over all its experts), e5m2 gradients
backward; it lowers to `ragged_dot` over float8 operands, which XLA maps onto the backend's fp8
GEMMs where it has them (the device check looks for them in the compiled HLO).
"""
import math

import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def _ragged_dot(x_RD, w_LDF, group_sizes_L):
  return jax.lax.ragged_dot(x_RD, w_LDF, group_sizes_L)


def _tile(n: int) -> int:
  return math.gcd(n, 128)


def _megablox_gmm(x_RD, w_LDF, group_sizes_L):
  """Pallas megablox `gmm` (TPU kernel; run by the Pallas interpreter elsewhere)."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm
  R, D = x_RD.shape
  tiling = (_tile(R), _tile(D), _tile(w_LDF.shape[2]))
  return gmm(x_RD, w_LDF, group_sizes_L.astype(jnp.int32), x_RD.dtype, tiling,
             interpret=jax.devices()[0].platform != 'tpu')


def _tokamax(x_RD, w_LDF, group_sizes_L):
  """tokamax's ragged_dot with its default choice: the fastest kernel the device has, else XLA."""
  import tokamax   # imported here: the CPU path never needs it
  return tokamax.ragged_dot(x_RD, w_LDF, group_sizes_L.astype(jnp.int32))


IMPLEMENTATIONS = {'ragged_dot': _ragged_dot, 'gmm': _megablox_gmm, 'tokamax': _tokamax}


def _fp8_config():
  from qwix._src.core import ragged_dot_qt
  return ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=E4M3, rhs_qtype=E4M3, dlhs_grad_qtype=E5M2,
                                         drhs_grad_qtype=E5M2)


def _fp8_ragged_dot(x_RD, w_LDF, group_sizes_L):
  from qwix._src.core import ragged_dot_qt
  out = ragged_dot_qt.ragged_dot_qt(x_RD, w_LDF, group_sizes_L.astype(jnp.int32), _fp8_config())
  return out.astype(x_RD.dtype)


def grouped_matmul(name: str, fp8: bool = False):
  """The (x_RD, w_LDF, group_sizes_L) -> y_RF function of implementation `name` (fp8: qwix's)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown grouped matmul {name!r} (known: {", ".join(IMPLEMENTATIONS)})')
  return _fp8_ragged_dot if fp8 else IMPLEMENTATIONS[name]
