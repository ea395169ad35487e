"""Every mesh layout (data x fsdp x expert x tensor) trains the same model as one device, with each
parameter and optimizer-state leaf sharded as the rules say.

One jitted train step per layout carries the whole check: with optim.b1 = 0 and no clipping, Adam's
first moment after step 1 is exactly the gradient, so the step's new optimizer state holds every
gradient, and its loss is the loss at the initial parameters.
"""
import math

import jax
import numpy as np
import pytest
from layouts import LAYOUTS, run_layout

from moejax import model, params, sharding

# What the default rules promise, written out independently of moejax.sharding: logical axis ->
# mesh axes it is split over (a mesh axis already used by an earlier dim of the leaf is skipped).
PROMISED = {'embed': ('fsdp', 'expert'), 'vocab': ('tensor',), 'heads': ('tensor',), 'kv_heads': ('tensor',),
            'mlp': ('tensor',), 'expert_mlp': ('tensor',), 'expert': ('expert',)}

# Hand-computed shard shapes of a few leaves (tiny model: V=128, D=32, H=8, G=4, N=4, E=8, F=16,
# 2 MoE layers).
SHARD_SHAPES = {
    'fsdp8': {'moe_blocks/ffn/w_gate': (2, 8, 4, 16), 'embed': (128, 4), 'moe_blocks/attn/wk': (2, 4, 4, 4)},
    'data2_fsdp2_expert2': {'moe_blocks/ffn/w_gate': (2, 4, 16, 16), 'embed': (128, 8),
                            'moe_blocks/attn/wk': (2, 8, 4, 4)},
    'fsdp2_tensor4': {'moe_blocks/ffn/w_gate': (2, 8, 16, 4), 'embed': (32, 16),
                      'moe_blocks/attn/wk': (2, 16, 1, 4)},
    'data2_expert2_tensor2': {'moe_blocks/ffn/w_gate': (2, 4, 32, 8), 'embed': (64, 16),
                              'moe_blocks/attn/wk': (2, 16, 2, 4)},
    'expert4_fsdp2_in_group': {'moe_blocks/ffn/w_gate': (2, 1, 32, 16), 'embed': (128, 4),
                               'moe_blocks/attn/wk': (2, 4, 4, 4)},
}
def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def grads_from_opt_state(opt_state) -> dict:
  """{param path: Adam mu leaf}; with b1 = 0 after one unclipped step, mu is the gradient."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, 'name', None) for k in path]
    if 'mu' in names:
      keys = [k.key for k in path[names.index('mu') + 1:]]
      out['/'.join(map(str, keys))] = np.asarray(leaf)
  return out


def param_axes(s):
  return {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(
      params.logical_axes(model.model_specs(s.model)), is_leaf=lambda x: isinstance(x, tuple))[0]}


def promised_shard_shape(shape, axes, sizes, rules_override):
  promised = dict(PROMISED)
  promised.update({k: sharding.rule_axes(v) for k, v in rules_override.items()})
  used, out = set(), []
  for n, name in zip(shape, axes):
    mesh = [a for a in promised.get(name, ()) if a not in used]
    used.update(mesh)
    out.append(n // math.prod(sizes[a] for a in mesh))
  return tuple(out)


def shard_shapes(leaf) -> set:
  return {tuple(sh.data.shape) for sh in leaf.addressable_shards}


# fsdp8 (~14 s) in the slow run: data2_fsdp2_expert2 and fsdp2_tensor4 shard over fsdp too
@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'fsdp8' else n for n in LAYOUTS])
def test_layout_loss_and_grads_equal_single_device(name):
  s, _, out_ref, new_ref = run_layout('single')
  _, _, out_got, new_got = run_layout(name)
  new_ref, new_got = jax.device_get(new_ref), jax.device_get(new_got)
  np.testing.assert_allclose(out_got['loss'], out_ref['loss'], rtol=1e-5)
  np.testing.assert_allclose(out_got['lm_loss'], out_ref['lm_loss'], rtol=1e-5)
  np.testing.assert_allclose(out_got['grad_norm'], out_ref['grad_norm'], rtol=1e-5)
  g_ref, g_got = grads_from_opt_state(new_ref['opt_state']), grads_from_opt_state(new_got['opt_state'])
  assert set(g_ref) == set(g_got) == set(param_axes(s)), sorted(g_ref)
  for k in g_ref:
    assert np.abs(g_ref[k]).max() > 0, k      # every parameter gets a gradient
    np.testing.assert_allclose(g_got[k], g_ref[k], rtol=1e-5, atol=1e-5 * np.abs(g_ref[k]).max(), err_msg=k)
  np.testing.assert_allclose(new_got['router_bias'], new_ref['router_bias'], rtol=1e-6, atol=1e-7)
  assert int(new_got['step']) == 1


@pytest.mark.parametrize('name', list(LAYOUTS))
def test_layout_shards_every_param_and_optimizer_leaf_as_the_rules_say(name):
  s, _, _, state = run_layout(name)    # the train step's output state
  sizes, overrides = LAYOUTS[name]
  axes = param_axes(s)
  leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  assert set(leaves) == set(axes)
  for path, leaf in leaves.items():
    want = promised_shard_shape(leaf.shape, axes[path], sizes, overrides)
    assert shard_shapes(leaf) == {want}, (path, axes[path], shard_shapes(leaf), want)
    if path in SHARD_SHAPES[name]:
      assert want == SHARD_SHAPES[name][path], (path, want)
    if 'expert' in axes[path] and sizes['expert'] > 1:    # never silently replicated
      assert want[axes[path].index('expert')] < leaf.shape[axes[path].index('expert')], path
    if 'embed' in axes[path] and sizes['fsdp'] > 1 and 'fsdp' not in str(overrides):
      assert math.prod(want) * sizes['fsdp'] <= leaf.size, path    # really split over fsdp
  # every optimizer-state leaf mirrors its parameter's sharding, or is a replicated scalar
  mirrored = 0
  for p, leaf in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]:
    keys = [k.key for k in p if isinstance(k, jax.tree_util.DictKey)]
    hits = [k for k in ('/'.join(keys[i:]) for i in range(len(keys))) if k in leaves]
    if hits and leaves[hits[0]].shape == leaf.shape:
      assert leaf.sharding.is_equivalent_to(leaves[hits[0]].sharding, leaf.ndim), path_str(p)
      assert shard_shapes(leaf) == shard_shapes(leaves[hits[0]]), path_str(p)
      mirrored += 1
    else:
      assert leaf.ndim == 0 and leaf.sharding.is_fully_replicated, (path_str(p), leaf.shape)
  assert mirrored == 2 * len(leaves)    # Adam's mu and nu for every parameter
