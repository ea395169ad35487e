"""Every attention type gives the same loss and gradients with its heads split over the `tensor` mesh
axis (and the batch over `data`, the weights' embed dim over `fsdp`) as on one device, with the
documents of packed rows masked (for the types that honour segment ids)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, numpy_init_params

from moejax import configs, model, params, sharding
from moejax.validate import DOCUMENT_MASKED

B, T = 4, 16
MESH = {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
SINGLE = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}
TYPES = ['gqa', 'mha', 'mla', 'swa', 'nsa', 'kda']
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def problem(attention):
  c = configs.base_config()
  cfg = c.model
  cfg.update(TINY_MODEL)
  cfg.update(attention=attention, num_layers=2, num_dense_layers=1, window=4, nsa_block=4,
             nsa_stride=2, nsa_select_block=4, nsa_num_selected=2, kda_chunk=4, init_std=0.1)
  p = numpy_init_params(model.model_specs(cfg), seed=0)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
  segments = np.array([[1] * 6 + [2] * 10, [1] * 16, [1] * 3 + [2] * 5 + [3] * 8, [1] * 16])
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((B, T), np.float32),
           'segment_ids': segments.astype(np.int32)}
  bias = np.zeros((model.num_moe_layers(cfg), cfg.num_experts), np.float32)
  return c, p, bias, batch


def loss_and_grads(c, p, bias, batch, mesh_sizes):
  n = int(np.prod(list(mesh_sizes.values())))
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:n])
  rules = dict(c.sharding)
  shardings = sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(c.model)), rules)
  p = jax.device_put(p, shardings)
  batch = jax.device_put(batch, sharding.named(mesh, ('batch', None), rules))
  fn = functools.partial(model.loss_fn, cfg=c.model, mesh=mesh)
  grad = jax.jit(jax.value_and_grad(lambda p, b, x: fn(p, b, x)[0]))
  loss, g = grad.lower(p, bias, batch).compile(compiler_options=FAST_COMPILE)(p, bias, batch)
  return float(loss), jax.device_get(g), p


@pytest.mark.parametrize('attention', TYPES)
def test_attention_type_sharded_over_tensor_data_fsdp_equals_one_device(attention):
  c, p, bias, batch = problem(attention)
  c.model.document_mask = attention in DOCUMENT_MASKED
  loss1, g1, _ = loss_and_grads(c, p, bias, batch, SINGLE)
  loss8, g8, placed = loss_and_grads(c, p, bias, batch, MESH)
  # the heads really are split over 'tensor'
  wq = placed['dense_blocks']['attn']['wq']
  assert {s.data.shape[2] for s in wq.addressable_shards} == {c.model.num_heads // 2}
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  chex.assert_trees_all_close(g8, g1, rtol=1e-4, atol=1e-6)
