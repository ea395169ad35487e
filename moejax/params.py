"""Parameter declarations: shape + logical axis names + initializer, turned into arrays and shardings."""
import math
import zlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]   # one logical axis name per dimension
  init: str = 'normal'           # 'normal' | 'ones' | 'zeros'
  scale: float = 1.0             # std for 'normal'

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f'ParamSpec {self.shape} has axes {self.axes}')


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def stacked(specs, num: int):
  """Adds a leading 'layers' dimension to every spec (layers are scanned)."""
  return jax.tree.map(lambda s: ParamSpec((num, *s.shape), ('layers', *s.axes), s.init, s.scale),
                      specs, is_leaf=is_spec)


def init_params(specs, key):
  """Initialises every spec with its own key folded from its path (independent of tree order)."""
  def one(path, s: ParamSpec):
    if s.init == 'ones':
      return jnp.ones(s.shape, jnp.float32)
    if s.init == 'zeros':
      return jnp.zeros(s.shape, jnp.float32)
    k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
    return s.scale * jax.random.truncated_normal(k, -2.0, 2.0, s.shape, jnp.float32)
  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def logical_axes(specs):
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def count(specs) -> int:
  return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))
