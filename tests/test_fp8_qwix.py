"""The qwix fp8 einsum (moejax.precision.qwix_fp8_einsum, the fp8 policy's matmul) against a numpy
per-channel e4m3 reference (forward) and the float32 einsum (gradients), the einsum-spec parsing,
and the policy picking it."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax import precision

SPECS = [('md,df->mf', (16, 32), (32, 24)), ('nsd,ndf->nsf', (3, 16, 32), (3, 32, 24)),
         ('nsf,nfd->nsd', (3, 16, 24), (3, 24, 32)), ('bd,fd->fb', (5, 8), (7, 8))]


def qdq_e4m3(x, axis):
  amax = np.abs(x).max(axis=axis, keepdims=True)
  scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), 1.0)
  return (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def contracted_axes(spec, operand):
  ins, out = spec.split('->')
  a, b = ins.split(',')
  mine, other = (a, b) if operand == 0 else (b, a)
  return tuple(i for i, c in enumerate(mine) if c in other and c not in out)


@pytest.mark.parametrize('spec,sx,sw', SPECS, ids=[s[0] for s in SPECS])
def test_qwix_fp8_einsum_equals_the_einsum_of_per_channel_e4m3_operands(spec, sx, sw):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(sx).astype(np.float32), rng.standard_normal(sw).astype(np.float32)
  got = np.asarray(precision.qwix_fp8_einsum(spec, jnp.asarray(x), jnp.asarray(w)))
  ref = np.einsum(spec, qdq_e4m3(x, contracted_axes(spec, 0)), qdq_e4m3(w, contracted_axes(spec, 1)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  exact = np.einsum(spec, x, w)
  assert 1e-3 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.1


def test_qwix_fp8_einsum_gradients_are_e5m2_close_to_float32():
  rng = np.random.default_rng(1)
  x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(16, 32), (32, 24), (16, 24)])
  f8 = jax.grad(lambda x, w: jnp.sum(precision.qwix_fp8_einsum('md,df->mf', x, w) * g), (0, 1))(x, w)
  f32 = jax.grad(lambda x, w: jnp.sum(jnp.einsum('md,df->mf', x, w) * g), (0, 1))(x, w)
  for a, b in zip(f8, f32):
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert 1e-3 < rel < 0.2, rel


def test_fp8_einsum_in_bf16_keeps_bf16_and_lowers_with_float8_types():
  x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 4), jnp.bfloat16)
  assert precision.qwix_fp8_einsum('md,df->mf', x, w).dtype == jnp.bfloat16
  hlo = jax.jit(jax.grad(lambda x, w: precision.qwix_fp8_einsum('md,df->mf', x, w).astype(jnp.float32).sum(),
                         (0, 1))).lower(x, w).as_text()
  assert 'f8E4M3FN' in hlo and 'f8E5M2' in hlo


def test_einsum_dimension_numbers_and_output_permutation():
  assert precision.einsum_dimension_numbers('nsd,ndf->nsf') == ((([2], [1]), ([0], [0])), (0, 1, 2))
  assert precision.einsum_dimension_numbers('bd,fd->fb') == ((([1], [1]), ([], [])), (1, 0))
  for bad in ('ab,bc,cd->ad', 'aa,ab->b', 'ab,cd->ad', 'ab,bc->ax'):
    with pytest.raises(ValueError):
      precision.einsum_dimension_numbers(bad)


def test_the_fp8_policy_uses_qwix_and_the_others_plain_einsum():
  assert precision.einsum_for(True) is precision.qwix_fp8_einsum
  assert precision.einsum_for(False) is jnp.einsum
