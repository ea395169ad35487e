"""Device mesh from `config.mesh`, and logical axis names -> shardings by `config.sharding` rules.

Parameters are declared with logical axis names (`('layers', 'expert', 'embed', 'expert_mlp')`); the
rules map a logical name to a mesh axis, a tuple of mesh axes, or nothing (replicated). Changing the
mesh or the rules re-shards the model without touching model code.

Mesh axes, outermost (slowest links) first; any may have size 1 or be absent:
  data    pure data parallelism: parameters replicated, batch split.
  fsdp    ZeRO-3 / FSDP: batch split and parameters + optimizer state split (the default rules put
          'embed', the model dim of every weight, here); the compiler all-gathers each weight
          where it is used and reduce-scatters its gradient.
  expert  expert parallelism: batch split and the experts of each MoE layer split (moejax.moe);
          by default the other weights' model dim is split over it too, as over fsdp.
  tensor  tensor (Megatron) parallelism: attention heads, MLP and expert hidden units and the
          vocabulary split; activations between blocks stay whole over it.
Rules naming an axis the mesh lacks ignore it, so one set of rules serves every mesh.
"""
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')
# Every logical axis name the model's parameters and activations use (see model.py, attention/).
LOGICAL_AXES = ('batch', 'layers', 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
                'expert', 'expert_mlp', 'kv_lora', 'q_lora')


def mesh_shape(mesh_cfg: dict, num_devices: int) -> dict[str, int]:
  """Resolves a `-1` axis size to the devices left over, in MESH_AXES order; sizes are validated
  elsewhere."""
  sizes = dict(mesh_cfg)
  known = math.prod(s for s in sizes.values() if s != -1)
  order = [a for a in MESH_AXES if a in sizes] + [a for a in sizes if a not in MESH_AXES]
  return {name: (num_devices // known if sizes[name] == -1 else sizes[name]) for name in order}


def make_mesh(mesh_cfg: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  grid = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def rule_axes(value) -> tuple:
  """A rule's value ('data,fsdp', 'fsdp', '' or None, or a tuple of names) as a tuple of mesh axes."""
  if isinstance(value, str):
    value = [] if value.strip() in ('', 'None') else value.split(',')
  return tuple(a.strip() for a in value or ())


def logical_to_spec(axes: tuple, rules: dict, mesh_axes=None) -> P:
  """('batch', None, 'embed') -> P(('data', 'fsdp', 'expert'), None, None) under the rules, with
  mesh axes outside `mesh_axes` (when given) dropped and each mesh axis used by one dim only."""
  out, used = [], set()
  for name in axes:
    mesh = rule_axes(rules.get(name)) if name is not None else ()
    mesh = tuple(a for a in mesh if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(mesh)
    out.append(mesh[0] if len(mesh) == 1 else (mesh or None))
  return P(*out)


def named(mesh, axes: tuple, rules: dict) -> NamedSharding:
  """`mesh` may be a Mesh or an AbstractMesh (for shapes only, e.g. moejax.tools.memory)."""
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh.axis_names))


def tree_shardings(mesh, axes_tree, rules: dict):
  """A pytree of logical-axes tuples -> the matching pytree of NamedShardings."""
  return jax.tree.map(lambda a: named(mesh, a, rules), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_axes(rules: dict, mesh) -> tuple:
  """The mesh axes the batch dimension is split over (for activation constraints and dispatch)."""
  return tuple(a for a in rule_axes(rules.get('batch')) if a in mesh.axis_names)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
