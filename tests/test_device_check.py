"""The accelerator check (moejax.tools.device_check): its references against naive loops, its
comparison failing a wrong implementation, the fp8 GEMM finder on compiled HLO text, the throughput
configs validating, and (slow) a whole run in-process on the tiniest plan."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import grouped_matmul as gm
from moejax.model_config import ModelConfig
from moejax.tools import bench, device_check as dc
from moejax.validate import validate

# Compiled HLO as XLA prints it (operands by name): a cuBLASLt fp8 GEMM and an upcast dot in a fusion.
GPU_HLO = '''HloModule jit_step
%fused_computation (param_0: f8e4m3fn[16,32]) -> f32[16,32] {
  %param_0 = f8e4m3fn[16,32]{1,0} parameter(0)
  ROOT %convert.1 = f32[16,32]{1,0} convert(%param_0)
}
ENTRY %main (p0: bf16[16,32], p1: bf16[32,8]) -> bf16[16,8] {
  %p0 = bf16[16,32]{1,0} parameter(0)
  %x8 = f8e4m3fn[16,32]{1,0} convert(%p0)
  %w8 = f8e4m3fn[8,32]{1,0} parameter(1)
  %gemm = (bf16[16,8]{1,0}, s8[1024]{0}) custom-call(%x8, %w8), custom_call_target="__cublas$lt$matmul$f8"
  %up = f32[16,32]{1,0} fusion(%x8), kind=kLoop, calls=%fused_computation
  %dot.2 = f32[16,16]{1,0} dot(%up, %up), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %gte = bf16[16,8]{1,0} get-tuple-element(%gemm), index=0
}
'''

TINY = dataclasses.replace(dc.QUICK, dispatch_shape=(16, 8, 4, 2, 8), attention_shape=(1, 8, 32), steps=1,
                           warmup=0, runs=(('bf16', True),))


def test_gemm_finder_sees_float8_operands_through_their_names_and_not_upcast_ones():
  found = dc.gemms(GPU_HLO)
  assert [(op, dc.has_float8(t)) for op, t in found] == [('custom-call', True), ('dot', False)]
  assert found[0][1] == ['f8e4m3fn[16,32]{1,0}', 'f8e4m3fn[8,32]{1,0}']


def test_fp8_on_cpu_compiles_to_gemms_over_upcast_operands():
  rows = dc.fp8_rows(quick=True)
  assert [r['gemms'] for r in rows] == [3, 3]   # forward, dx, dw of each
  if jax.devices()[0].platform == 'cpu':
    assert [r['fp8'] for r in rows] == [0, 0] and not dc.fp8_expected()


def test_dense_moe_reference_equals_a_per_token_loop():
  rng = np.random.default_rng(0)
  T, D, E, K, F = 6, 4, 3, 2, 5
  x, w = rng.standard_normal((T, D)), rng.random((T, K))
  wg, wu, wd = rng.standard_normal((E, D, F)), rng.standard_normal((E, D, F)), rng.standard_normal((E, F, D))
  e = np.stack([rng.permutation(E)[:K] for _ in range(T)])
  silu = lambda v: v / (1 + np.exp(-v))
  want = np.stack([sum(w[t, k] * (silu(x[t] @ wg[e[t, k]]) * (x[t] @ wu[e[t, k]])) @ wd[e[t, k]] for k in range(K))
                   for t in range(T)])
  got = dc.dense_moe_reference(*(jnp.asarray(a, jnp.float32) for a in (x, w, wg, wu, wd)), jnp.asarray(e))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_reference_equals_a_per_group_loop_with_zeros_past_the_groups():
  rng = np.random.default_rng(1)
  x, w, sizes = rng.standard_normal((10, 3)), rng.standard_normal((3, 3, 2)), np.array([4, 0, 3])
  want = np.zeros((10, 2))
  want[:4], want[4:7] = x[:4] @ w[0], x[4:7] @ w[2]
  np.testing.assert_allclose(dc.grouped_reference(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)), want,
                             rtol=1e-5, atol=1e-6)


def test_compare_fails_an_implementation_that_is_slightly_wrong():
  x = jax.random.normal(jax.random.key(0), (8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 4, 4))
  sizes, cot = jnp.asarray([3, 2, 3]), jnp.ones((8, 4))
  right, wrong = dc.compare(
      'grouped matmul', {'ragged_dot': gm.grouped_matmul('ragged_dot'),
                         'off': lambda x, w, g: gm.grouped_matmul('ragged_dot')(x, w, g) * 1.01},
      dc.grouped_reference, (x, w, sizes), cot)
  assert right['ok'] and right['fwd'] < 1e-6
  assert not wrong['ok'] and wrong['fwd'] > 5e-3 and wrong['grad'] > 5e-3


@pytest.mark.parametrize('shape', dc.FULL.shapes)
def test_throughput_shapes_validate_on_one_device(shape):
  c = dc.shape_config(shape, 'fp8', force_balance=True)
  validate(c, 1, check_data=False)
  assert c.model.router.force_balance and c.model.precision == 'fp8' and c.model.dispatch == 'auto'
  if shape == dc.QWEN3:
    m = ModelConfig.from_config(c.model)
    assert (m.d_model, m.num_experts, m.expert_ffn_dim, m.top_k, m.num_shared_experts) == (2048, 128, 768, 8, 0)
    assert (m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim) == (32, 4, 128)


@pytest.mark.slow   # ~2-4 min on 2 shared cores (compiles); the fast tests above cover the parts
def test_tiniest_run_writes_a_report_with_measured_rows(tmp_path):
  out = tmp_path / 'd.md'
  assert dc.run(['--quick'], TINY, str(out))
  text = out.read_text()
  assert f'(`{jax.devices()[0].device_kind}`' in text
  tests = ('| MoE dispatch |', '| grouped matmul |', *(f'| {a} attention |' for a, _ in dc.ATTENTION_CASES))
  platform = [l for l in text.split('\n') if l.startswith(tests)]
  assert len(platform) == len(dc.moe.DISPATCHES) + len(gm.IMPLEMENTATIONS) + 2 * len(dc.ATTENTION_CASES)
  assert all(l.endswith('| pass |') for l in platform)
  row = next(l for l in text.split('\n') if l.startswith(f'| {bench.SMOKE} |'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[1:3] == ['bf16', 'forced balance'] and float(cells[8].replace(',', '')) > 0
