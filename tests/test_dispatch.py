"""The dispatch implementations (moejax.moe.DISPATCHES) against the naive per-token reference and
each other, on 8 fake CPU devices, and the ragged_all_to_all offset arithmetic (moejax.a2a) on
hand-computed cases and through the numpy ragged_all_to_all of tests/reference.py."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_SHAPES, make_test_mesh, tiny_model_config
from reference import (T, TOL, lib_value_and_grad, make_moe_inputs, ref_capacity_keep_per_shard, ref_choose,
                       ref_value_and_grad, simulate_ragged_all_to_all)

from moejax import a2a, moe
from moejax import router as router_lib

DROPLESS = ('dropless', 'ragged_dot', 'gmm', 'tokamax', 'ragged_a2a')
CAPACITY = ('capacity', 'capacity_a2a')


def moe_cfg(**kw):
  """The tiny ModelConfig with sigmoid scores and routed_scaling 2.5 (as in tests/test_moe.py)."""
  return tiny_model_config(router=dict(score='sigmoid', routed_scaling=2.5), **kw)


def test_every_dispatch_is_either_dropless_or_capacity_here():
  assert set(DROPLESS + CAPACITY) == set(moe.DISPATCHES)


# ----------------------------------------------------------------------------- auto

@pytest.mark.parametrize('platform,expert,fp8,expected', [
    ('cpu', 1, False, 'dropless'), ('cpu', 8, False, 'dropless'),
    ('gpu', 1, False, 'ragged_dot'), ('gpu', 4, False, 'ragged_a2a'), ('gpu', 4, True, 'ragged_a2a'),
    ('tpu', 1, False, 'gmm'), ('tpu', 8, False, 'gmm')])
def test_auto_dispatch_picks_the_platform_implementation(platform, expert, fp8, expected):
  assert moe.resolve_dispatch('auto', platform, expert, fp8) == expected
  assert moe.resolve_dispatch('capacity_a2a', platform, expert, fp8) == 'capacity_a2a'


# ----------------------------------------------------------------------------- agreement

def _skewed_bias(cfg):
  """Every token picks expert 3 (and one other): one device gets all of the group's tokens."""
  return jnp.zeros(cfg.num_experts).at[3].set(10.0)


# Cases chosen so that each implementation meets its hard case once: the a2a variants under expert
# parallelism (and one device receiving the whole group when skewed), gmm through the interpreter.
DROPLESS_CASES = [('ragged_dot', 'single', False), ('ragged_dot', 'expert8', True), ('gmm', 'single', True),
                  ('tokamax', 'single', True),
                  ('ragged_a2a', 'data2_expert4', False), ('ragged_a2a', 'expert8', True)]
_DROPLESS_REFS = {}


def _dropless_refs(mesh_name, skew):
  """(reference, 'dropless') outputs and grads, computed once per (mesh, skew)."""
  if (mesh_name, skew) not in _DROPLESS_REFS:
    cfg = moe_cfg(dispatch='dropless')
    args, bias, r = make_moe_inputs(cfg, seed=6)
    if skew:
      bias = _skewed_bias(cfg)
    chosen = ref_choose(args[0], args[1], bias, cfg.router)
    g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r)(args)
    g_dl, (y_dl, _, _, _) = lib_value_and_grad(cfg, make_test_mesh(MESH_SHAPES[mesh_name]), bias, r)(args)
    _DROPLESS_REFS[mesh_name, skew] = (args, bias, r), (y_ref, g_ref), (y_dl, g_dl)
  return _DROPLESS_REFS[mesh_name, skew]


@pytest.mark.parametrize('dispatch,mesh_name,skew', DROPLESS_CASES,
                         ids=[f'{d}-{m}-{"skewed" if s else "random"}' for d, m, s in DROPLESS_CASES])
def test_dropless_dispatches_match_reference_and_dropless_forward_and_grad(dispatch, mesh_name, skew):
  (args, bias, r), ref, dropless = _dropless_refs(mesh_name, skew)
  cfg = moe_cfg(dispatch=dispatch)
  g, (y, dropped, _, _) = lib_value_and_grad(cfg, make_test_mesh(MESH_SHAPES[mesh_name]), bias, r)(args)
  assert float(dropped) == 0.0
  chex.assert_trees_all_close((y, g), ref, **TOL)
  chex.assert_trees_all_close((y, g), dropless, **TOL)


CAPACITY_CASES = [('capacity', 'data2_expert4'), ('capacity_a2a', 'single'), ('capacity_a2a', 'data2_expert4'),
                  ('capacity_a2a', 'expert8')]   # 'capacity' on single and expert8: tests/test_moe.py


@pytest.mark.parametrize('dispatch,mesh_name', CAPACITY_CASES)
def test_capacity_dispatches_drop_the_same_assignments_as_the_per_shard_hand_count(dispatch, mesh_name):
  """Capacity is per batch shard (8 shards of 2 tokens on 8 devices, 1 of 16 on one), whether the
  shards are data or expert parallel, and whatever the transport."""
  mesh = make_test_mesh(MESH_SHAPES[mesh_name])
  cf = 0.75
  cfg = moe_cfg(dispatch=dispatch, capacity_factor=cf)
  args, bias, r = make_moe_inputs(cfg, seed=3)
  bias = bias.at[0].add(0.6)   # expert 0 overflows in most shards; other experts too
  chosen = ref_choose(args[0], args[1], bias, cfg.router)
  shards = mesh.size
  C = int(np.ceil(cf * (T // shards) * cfg.top_k / cfg.num_experts))
  keep, n_dropped = ref_capacity_keep_per_shard(chosen, C, cfg.num_experts, shards)
  assert 0 < n_dropped < T * cfg.top_k
  g, (y, dropped, _, _) = lib_value_and_grad(cfg, mesh, bias, r)(args)
  g_ref, y_ref = ref_value_and_grad(chosen, cfg.router, r, keep=keep)(args)
  assert float(dropped) == n_dropped
  chex.assert_trees_all_close(y, y_ref, **TOL)
  chex.assert_trees_all_close(g, g_ref, **TOL)


def test_zero_computation_experts_are_not_dispatched_by_the_a2a_variants():
  """Ids >= num_experts (identity experts) leave the routed output of every transport alone."""
  mesh = make_test_mesh(MESH_SHAPES['expert8'])
  cfg = moe_cfg(dispatch='dropless')
  args, bias, r = make_moe_inputs(cfg, seed=9)
  routing = router_lib.route(args[0], args[1], bias, cfg.router, seq_len=8)
  routing = dataclasses.replace(routing, expert_TK=routing.expert_TK.at[::3, 0].set(cfg.num_experts))
  outs = {}
  for d in ('dropless', 'ragged_a2a', 'capacity_a2a'):
    c = moe_cfg(dispatch=d, capacity_factor=8.0)
    outs[d] = jax.jit(lambda a, c=c: moe.routed_experts(a[0], routing, *a[2:], c.dispatch, mesh,
                                                          ('data', 'expert')))(args)
  for d, (y, dropped) in outs.items():
    assert float(dropped) == 0.0, d
    chex.assert_trees_all_close(y, outs['dropless'][0], **TOL, custom_message=d)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_one_device_dispatch_has_no_collective_in_forward_or_backward(dispatch):
  """On a one-device mesh (every axis of size 1) the dispatch runs outside shard_map, whose transpose
  would all-reduce the expert weight gradients over the size-1 axes (XLA:CPU keeps that copy)."""
  cfg = moe_cfg(dispatch=dispatch)
  args, bias, r = make_moe_inputs(cfg, seed=6)
  mesh = make_test_mesh({'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1})
  hlo = lib_value_and_grad(cfg, mesh, bias, r).lower(args).compile().as_text()
  assert 'all-reduce' not in hlo and 'all-gather' not in hlo and 'reduce-scatter' not in hlo


# ----------------------------------------------------------------------------- a2a arithmetic

def test_ragged_plan_two_devices_by_hand():
  # Device 0 routes 3, 0, 1, 2 rows to experts 0-3; device 1 routes 0, 4, 2, 0. Device 0 owns
  # experts 0-1, device 1 experts 2-3.
  p = a2a.plan([[3, 0, 1, 2], [0, 4, 2, 0]], 2)
  np.testing.assert_array_equal(p['send_sizes'], [[3, 3], [4, 2]])
  np.testing.assert_array_equal(p['input_offsets'], [[0, 3], [0, 4]])
  np.testing.assert_array_equal(p['recv_sizes'], [[3, 4], [3, 2]])
  np.testing.assert_array_equal(p['recv_offsets'], [[0, 3], [0, 3]])
  np.testing.assert_array_equal(p['output_offsets'], [[0, 0], [3, 3]])
  np.testing.assert_array_equal(a2a.received_row_experts(p['recv_counts'][0], 8),
                                [0, 0, 0, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(a2a.received_row_experts(p['recv_counts'][1], 8),
                                [0, 1, 1, 0, 0, 2, 2, 2])


def test_ragged_plan_four_devices_with_empty_senders_and_receivers_by_hand():
  counts = [[2, 0, 1, 0],    # one expert per device
            [0, 0, 0, 0],    # device 1 sends nothing
            [1, 3, 0, 2],
            [0, 1, 0, 5]]
  p = a2a.plan(counts, 4)
  np.testing.assert_array_equal(p['send_sizes'], counts)
  np.testing.assert_array_equal(p['input_offsets'], [[0, 2, 2, 3], [0, 0, 0, 0], [0, 1, 4, 4], [0, 0, 1, 1]])
  np.testing.assert_array_equal(p['recv_sizes'], [[2, 0, 1, 0], [0, 0, 3, 1], [1, 0, 0, 0], [0, 0, 2, 5]])
  np.testing.assert_array_equal(p['recv_offsets'], [[0, 2, 2, 3], [0, 0, 0, 3], [0, 1, 1, 1], [0, 0, 0, 2]])
  np.testing.assert_array_equal(p['output_offsets'], [[0, 0, 0, 0], [2, 0, 1, 0], [2, 0, 1, 0], [3, 3, 1, 2]])


def _labelled_rows(counts_DE):
  """Each device's send buffer, sorted by expert: row = src * 10_000 + expert * 100 + rank."""
  return [np.array([s * 10_000 + e * 100 + i for e, n in enumerate(row) for i in range(n)], np.int64)
          for s, row in enumerate(counts_DE)]


@pytest.mark.parametrize('num_devices,local', [(2, 2), (4, 1), (4, 2)])
def test_ragged_plan_delivers_every_row_to_its_owner_source_by_source(num_devices, local):
  rng = np.random.default_rng(num_devices * 10 + local)
  counts = rng.integers(0, 4, size=(num_devices, num_devices * local))
  counts[0] = 0                      # an idle sender
  counts[:, :local] = 0              # and an idle receiver
  p = a2a.plan(counts, num_devices)
  num_rows = int(counts.sum())
  out = simulate_ragged_all_to_all(_labelled_rows(counts), p, num_rows)
  for d in range(num_devices):
    mine = range(d * local, (d + 1) * local)
    expected = [s * 10_000 + e * 100 + i for s in range(num_devices) for e in mine
                for i in range(counts[s, e])]
    np.testing.assert_array_equal(out[d][:len(expected)], expected)
    assert (out[d][len(expected):] == -1).all()   # nothing written past the received rows
    row_experts = np.asarray(a2a.received_row_experts(p['recv_counts'][d], num_rows))
    np.testing.assert_array_equal(row_experts[:len(expected)], [x // 100 % 100 - d * local for x in expected])
    assert (row_experts[len(expected):] == local).all()
