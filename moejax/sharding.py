"""Device mesh from `config.mesh`, and logical axis names -> shardings by `config.sharding` rules.

Parameters are declared with logical axis names (`('layers', 'expert', 'embed', 'mlp')`); the rules
map a logical name to a mesh axis, a tuple of mesh axes, or nothing (replicated). Changing the mesh
or the rules re-shards the model without touching model code.
"""
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def mesh_shape(mesh_cfg: dict, num_devices: int) -> dict[str, int]:
  """Resolves a `-1` axis size to the devices left over; sizes are validated elsewhere."""
  sizes = dict(mesh_cfg)
  known = math.prod(s for s in sizes.values() if s != -1)
  return {name: (num_devices // known if s == -1 else s) for name, s in sizes.items()}


def make_mesh(mesh_cfg: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  grid = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def logical_to_spec(axes: tuple, rules: dict) -> P:
  """('batch', None, 'embed') -> P(('data', 'expert'), None, None) under the rules."""
  out, used = [], set()
  for name in axes:
    mesh_axes = rules.get(name) if name is not None else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    if mesh_axes:
      mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis shards one dim only
      used.update(mesh_axes)
    out.append(mesh_axes[0] if mesh_axes and len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*out)


def named(mesh: Mesh, axes: tuple, rules: dict) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, rules))


def tree_shardings(mesh: Mesh, axes_tree, rules: dict):
  """A pytree of logical-axes tuples -> the matching pytree of NamedShardings."""
  return jax.tree.map(lambda a: named(mesh, a, rules), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
