"""The grouped matmuls (moejax.grouped_matmul) against a numpy per-group loop, forward and gradient,
and their fp8 path (qwix ragged_dot_qt) against a numpy e4m3 quantize-dequantize reference; the
fp8 grouped dispatches end to end in an MoE layer (no longer refused)."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import numpy_init_params, tiny_model_config

from moejax import grouped_matmul as gm
from moejax import model

R, D, F = 40, 16, 24
GROUPS = np.array([10, 0, 25], np.int32)   # an empty group, and 5 rows past the groups


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((R, D)).astype(np.float32), rng.standard_normal((3, D, F)).astype(np.float32),
          rng.standard_normal((R, F)).astype(np.float32))


def ref_grouped(x, w, groups):
  """y[r] = x[r] @ w[l] over group l's rows; zeros past the groups."""
  y, start = np.zeros((x.shape[0], w.shape[2]), np.float32), 0
  for l, n in enumerate(groups):
    y[start:start + n] = x[start:start + n] @ w[l]
    start += n
  return y


def qdq_e4m3(x, axis):
  """Absmax quantize-dequantize to e4m3, one scale per slice reduced over `axis`."""
  amax = np.abs(x).max(axis=axis, keepdims=True)
  scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), 1.0)
  return (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def in_groups(a):
  return a[:GROUPS.sum()]


@pytest.mark.parametrize('name', list(gm.IMPLEMENTATIONS))
def test_grouped_matmul_matches_per_group_loop_forward_and_gradient(name):
  x, w, g = inputs()
  fn = gm.grouped_matmul(name)
  y = jax.jit(fn)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(GROUPS))
  np.testing.assert_allclose(in_groups(np.asarray(y)), in_groups(ref_grouped(x, w, GROUPS)), rtol=1e-5, atol=1e-5)
  mask = (np.arange(R) < GROUPS.sum())[:, None]
  dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.where(mask, fn(x, w, jnp.asarray(GROUPS)), 0) * g), (0, 1))(
      jnp.asarray(x), jnp.asarray(w))
  ref_dx = np.zeros_like(x)
  ref_dw = np.zeros_like(w)
  start = 0
  for l, n in enumerate(GROUPS):
    ref_dx[start:start + n] = g[start:start + n] @ w[l].T
    ref_dw[l] = x[start:start + n].T @ g[start:start + n]
    start += n
  # rows past the groups: unspecified (gmm leaves them unwritten; callers gather no token there)
  np.testing.assert_allclose(in_groups(np.asarray(dx)), in_groups(ref_dx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)


def test_fp8_grouped_matmul_equals_e4m3_rounded_operands_and_its_gradients_stay_close():
  x, w, g = inputs(1)
  fn = gm.grouped_matmul('ragged_dot', fp8=True)
  y = np.asarray(fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(GROUPS)))
  # scales: per row of x; per output column of w, over all experts
  ref = ref_grouped(qdq_e4m3(x, 1), qdq_e4m3(w, (0, 1)), GROUPS)
  np.testing.assert_allclose(in_groups(y), in_groups(ref), rtol=1e-5, atol=1e-4)
  exact = ref_grouped(x, w, GROUPS)
  rel = np.linalg.norm(in_groups(y - exact)) / np.linalg.norm(in_groups(exact))
  assert 1e-3 < rel < 0.1, rel                       # really rounded, by about e4m3's step
  mask = (np.arange(R) < GROUPS.sum())[:, None]
  grads = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.where(mask, f(x, w, jnp.asarray(GROUPS)), 0) * g), (0, 1))(
      jnp.asarray(x), jnp.asarray(w))
  (dx8, dw8), (dx, dw) = grads(fn), grads(gm.grouped_matmul('ragged_dot'))
  for got, want in ((in_groups(dx8), in_groups(dx)), (dw8, dw)):
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert 1e-3 < rel < 0.2, rel                     # e5m2 gradients, e4m3 residuals


def test_fp8_grouped_matmul_lowers_with_float8_operands():
  x, w, _ = inputs()
  hlo = jax.jit(gm.grouped_matmul('tokamax', fp8=True)).lower(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(GROUPS)).as_text()
  assert re.search(r'f8E4M3FN', hlo), 'no e4m3 operand in the lowered grouped matmul'


def test_unknown_grouped_matmul_names_the_choices():
  with pytest.raises(ValueError, match='tokamax'):
    gm.grouped_matmul('cutlass')


@pytest.mark.parametrize('dispatch', ['ragged_dot', 'tokamax'])
def test_fp8_grouped_dispatch_runs_and_stays_close_to_the_fp32_layer(dispatch, single_mesh):
  cfg32, cfg8 = tiny_model_config(dispatch=dispatch), tiny_model_config(dispatch=dispatch, precision='fp8')
  p = numpy_init_params(model.moe_specs(cfg32), 0)
  x_BTD = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, cfg32.d_model)), jnp.float32)
  bias_E = jnp.zeros((cfg32.num_experts,))

  def run(cfg):
    f = lambda p, x: model.moe_ffn(p, bias_E, x, cfg, single_mesh, ())[0]
    return jax.jit(f)(p, x_BTD), jax.jit(jax.grad(lambda p: jnp.sum(f(p, x_BTD) * x_BTD)))(p)

  (y32, g32), (y8, g8) = run(cfg32), run(cfg8)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert 1e-3 < rel(y8, y32) < 0.1
  assert rel(g8['w_up'], g32['w_up']) < 0.2
