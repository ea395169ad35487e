"""Dense and MoE layers in any order (`model.dense_layers`, as Qwen's mlp_only_layers /
decoder_sparse_step): the model equals a plain loop over its layers in their true order, forward and
gradient, and the option is validated."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config

from moejax import model
from moejax.attention import ATTENTIONS
from moejax.errors import ConfigError
from moejax.layers import rms_norm, swiglu


def test_interleaved_dense_layers_equal_a_layer_by_layer_loop_forward_and_gradient():
  """4 layers, dense at 1 and 3: kinds [moe, dense, moe, dense]; each kind is one stack in its
  layer order (the unit [moe, dense] scanned twice)."""
  cfg = tiny_model_config(num_layers=4, num_dense_layers=0, dense_layers='1,3', init_std=0.3,
                          dispatch='dropless')
  assert cfg.layer_kinds == ('moe', 'dense', 'moe', 'dense') and cfg.num_moe_layers == 2
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  assert p['dense_blocks']['attn']['wq'].shape[0] == 2 and p['moe_blocks']['attn']['wq'].shape[0] == 2
  bias = jax.random.normal(jax.random.key(0), (2, cfg.num_experts)) * 0.1
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  r = jax.random.normal(jax.random.key(2), (2, 8, cfg.vocab_size))

  def lib(p):
    logits, (moe_aux, _) = model.forward(p, bias, tokens, cfg, mesh)
    return jnp.sum(logits * r), (logits, moe_aux.load_E)

  def loop(p):
    x = p['embed'][tokens]
    loads, seen = [], {'dense': 0, 'moe': 0}
    for kind in ('moe', 'dense', 'moe', 'dense'):
      j = seen[kind]
      seen[kind] += 1
      lp = jax.tree.map(lambda a: a[j], p[f'{kind}_blocks'])
      h = rms_norm(x, lp['attn_norm'], cfg.norm_eps)
      x = x + ATTENTIONS['gqa'].apply(lp['attn'], h, cfg.attn)[0]
      h = rms_norm(x, lp['ffn_norm'], cfg.norm_eps)
      if kind == 'dense':
        x = x + swiglu(lp['ffn'], h)
      else:
        y, aux = model.moe_ffn(lp['ffn'], bias[j], h, cfg, mesh, ())
        x = x + y
        loads.append(aux.load_E)
    logits = jnp.einsum('btd,dv->btv', rms_norm(x, p['final_norm'], cfg.norm_eps), p['head'])
    return jnp.sum(logits * r), (logits, jnp.stack(loads))

  g_lib, (logits, loads) = jax.jit(jax.grad(lib, has_aux=True))(p)
  g_ref, (ref_logits, ref_loads) = jax.jit(jax.grad(loop, has_aux=True))(p)
  chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loads, ref_loads)
  chex.assert_trees_all_close(g_lib, g_ref, rtol=1e-4, atol=1e-5)


def test_dense_layers_are_validated():
  with pytest.raises(ConfigError, match='model.dense_layers'):
    tiny_model_config(num_layers=4, dense_layers='1,4')
  with pytest.raises(ConfigError, match='model.dense_layers'):
    tiny_model_config(num_layers=4, dense_layers='one')
