"""Precision policies (moejax.precision): fp8 quantize-dequantize and matmul against numpy/ml_dtypes
references (forward and gradient), the fp8 error of one MoE layer, and short training per policy."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from moejax import model, precision
from moejax.params import logical_axes
from conftest import numpy_init_params, tiny_model_config


def ref_qdq(x, dtype):
  """Naive per-tensor current-amax quantize-dequantize in numpy."""
  x = np.asarray(x, np.float32)
  amax = np.abs(x).max()
  scale = amax / float(ml_dtypes.finfo(dtype).max) if amax > 0 else 1.0
  return (x / scale).astype(dtype).astype(np.float32) * scale


@pytest.mark.parametrize('dtype', [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_quantize_dequantize_matches_numpy_reference_and_keeps_amax(dtype):
  x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) * 3
  got = np.asarray(precision.quantize_dequantize(jnp.asarray(x), jnp.dtype(dtype)))
  np.testing.assert_allclose(got, ref_qdq(x, dtype), rtol=1e-6)
  assert np.abs(got).max() == pytest.approx(np.abs(x).max(), rel=1e-6)
  assert precision.quantize_dequantize(jnp.zeros((3,)), jnp.dtype(dtype)).sum() == 0


def test_fp8_einsum_forward_and_gradients_match_reference():
  rng = np.random.default_rng(1)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in [(16, 32), (32, 24), (16, 24)])
  y, vjp = jax.vjp(functools.partial(precision.fp8_einsum, 'md,df->mf'), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  xq, wq = ref_qdq(x, ml_dtypes.float8_e4m3fn), ref_qdq(w, ml_dtypes.float8_e4m3fn)
  gq = ref_qdq(g, ml_dtypes.float8_e5m2)
  np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('policy,dtype', [('fp32', jnp.float32), ('bf16', jnp.bfloat16), ('fp8', jnp.bfloat16)])
def test_compute_dtype_follows_the_policy_and_params_stay_float32_except_the_cast(policy, dtype):
  cfg = tiny_model_config(precision=policy)
  assert precision.compute_dtype(cfg) == jnp.dtype(dtype)
  p = numpy_init_params(model.model_specs(cfg), 0)
  cast = model.cast_params(p, cfg)
  flat = jax.tree_util.tree_flatten_with_path(cast)[0]
  for path, w in flat:
    name = jax.tree_util.keystr(path)
    kept = any(k in name for k in model.FLOAT32_PARAMS)   # norm scales and the router
    assert w.dtype == (jnp.float32 if kept else jnp.dtype(dtype)), name


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp8_moe_layer_relative_error_vs_fp32_is_bounded(single_mesh):
  cfg32 = tiny_model_config(dispatch='capacity', capacity_factor=8.0)
  cfg8 = tiny_model_config(dispatch='capacity', capacity_factor=8.0, precision='fp8')
  assert cfg8.dispatch.fp8 and not cfg32.dispatch.fp8
  p = numpy_init_params(model.moe_specs(cfg32), 0)
  x_BTD = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, cfg32.d_model)), jnp.float32)
  bias_E = jnp.zeros((cfg32.num_experts,))

  def run(cfg, x):
    # fp8 matmuls with float32 everywhere else (moe_ffn on float32 params and activations: the
    # policy's bf16 compute dtype is applied by forward's cast_params, not here), so the difference
    # is the fp8 rounding alone.
    with_f32 = lambda p, x: model.moe_ffn(p, bias_E, x, cfg, single_mesh, ())[0]
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(with_f32(p, x) * x), argnums=(0, 1)))
    return value_and_grad(p, x), jax.jit(with_f32)(p, x)

  (_, (gp32, gx32)), y32 = run(cfg32, x_BTD)
  (_, (gp8, gx8)), y8 = run(cfg8, x_BTD)
  fwd = _rel(y8, y32)
  grad_w = _rel(gp8['w_up'], gp32['w_up'])
  grad_x = _rel(gx8, gx32)
  print(f'fp8 vs fp32, one MoE layer: forward rel err {fwd:.3g}, dW_up {grad_w:.3g}, dx {grad_x:.3g}')
  assert 1e-3 < fwd < 0.1          # really rounded, and by about e4m3's 2^-4 relative step
  assert 1e-3 < grad_w < 0.2 and grad_x < 0.2


# ~30-50 s each: fp32 and bf16 are trained by the rest of the suite, fp8's numerics are checked
# against float32 in the fast run (layer and grouped-matmul errors)
@pytest.mark.slow
@pytest.mark.parametrize('policy', precision.POLICIES)
def test_each_policy_trains_with_finite_decreasing_loss(policy, single_mesh):
  cfg = tiny_model_config(precision=policy, num_layers=2)   # one dense block, one MoE block
  specs = model.model_specs(cfg)
  params = numpy_init_params(specs, 0)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))   # master weights
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 17)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': jnp.ones((4, 16))}
  bias = jnp.zeros((cfg.num_moe_layers, cfg.num_experts))
  tx = optax.adamw(1e-2)

  @jax.jit
  def step(params, opt_state):
    (loss, _), g = jax.value_and_grad(model.loss_fn, has_aux=True)(params, bias, batch, cfg, single_mesh)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(12):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all(), losses
  assert losses[-1] < losses[0] - 0.5, losses
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
