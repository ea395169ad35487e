"""Bytes per device of a config's train state and activations, from the shardings alone.

Nothing is allocated: the state's shapes come from `jax.eval_shape` (moejax.state.build_setup) and
its shardings from the config's rules on a `jax.sharding.AbstractMesh`, so any mesh size works on
one CPU. State bytes are exact for the shardings; the activations are an estimate whose formula is
documented in moejax/tools/memory.py (the table of docs/memory.md) and checked in
tests/test_memory.py. Used by `python -m moejax.tools.memory` and `moejax.dry_run`.
"""
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from moejax import model, precision, sharding
from moejax.attention import ATTENTIONS
from moejax.model_config import ModelConfig
from moejax.state import build_setup
from moejax.validate import validate

GiB = 2 ** 30


def abstract_mesh(sizes: dict) -> AbstractMesh:
  sizes = sharding.mesh_shape(sizes, math.prod(s for s in sizes.values() if s != -1))
  return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def leaf_bytes(leaf) -> int:
  """Bytes of one device's shard of an abstract leaf (a ShapeDtypeStruct with a sharding)."""
  shape = leaf.sharding.shard_shape(leaf.shape) if isinstance(leaf.sharding, NamedSharding) else leaf.shape
  return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def tree_bytes(tree) -> int:
  return sum(leaf_bytes(l) for l in jax.tree.leaves(tree))


@dataclass
class Memory:
  params: int          # bytes per device
  grads: int
  opt_state: int
  other: int           # router biases, balance coefficients, step, rng
  activations: int
  tokens_per_device: int

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt_state + self.other + self.activations


def state_bytes(config, mesh_sizes: dict) -> dict:
  """Bytes per device of each part of the train state on a mesh of `mesh_sizes` (abstract)."""
  n = math.prod(mesh_sizes.values())
  validate(config, n, check_data=False)
  s = build_setup(config, abstract_mesh(mesh_sizes))
  a = s.abstract_state
  return {'params': tree_bytes(a['params']), 'grads': tree_bytes(a['params']),
          'opt_state': tree_bytes(a['opt_state']),
          'other': tree_bytes({k: v for k, v in a.items() if k not in ('params', 'opt_state')})}


def tokens_per_device(config, mesh_sizes: dict) -> int:
  batch = [a for a in sharding.rule_axes(config.sharding.get('batch')) if a in mesh_sizes]
  return config.train.batch_size * config.train.seq_len // math.prod(mesh_sizes[a] for a in batch)


def attention_elements(cfg, name: str, seq_len: int, tp: int) -> tuple[float, float]:
  """(all saved elements, matmul outputs) per token of one attention layer: its table entry's
  estimate (moejax.attention, `Attention.activations`)."""
  estimate = ATTENTIONS[name].activations
  if estimate is None:
    have = ', '.join(n for n, a in ATTENTIONS.items() if a.activations is not None)
    raise ValueError(f'model.attention: attention {name} has no activation estimate in its table entry '
                     f'(those with one: {have})')
  return estimate(cfg.attn, seq_len, tp)


def dispatch_rows(cfg, tokens: int, mesh_sizes: dict, platform: str) -> float:
  """Rows per routed assignment in the largest buffers of the MoE layer's backward: 1 for the grouped
  matmuls; the capacity factor for the capacity dispatches; for 'dropless', its largest static layout,
  because the branches of its `lax.switch` share one allocation sized for the largest branch."""
  from moejax import moe
  ep = mesh_sizes.get('expert', 1)
  name = moe.resolve_dispatch(cfg.dispatch.name, platform, ep)
  E, K = cfg.num_experts, cfg.top_k
  if name in ('capacity', 'capacity_a2a'):
    return moe.capacity(tokens, K, E, cfg.dispatch.capacity_factor) * E / (tokens * K)
  if name != 'dropless':
    return 1.0
  T, E_local = tokens * ep, E // ep   # expert parallelism gathers the group's tokens
  return max(moe.layout_rows(l, T * K, E_local) for l in moe.dropless_layouts(T, K, E, E_local)) / (tokens * K)


def ffn_elements(cfg, kind: str, tp: int, compute_bytes: int, rows: float = 1.0) -> tuple[float, float]:
  """(all saved elements, matmul outputs) per token of one FFN (see module doc); `rows`: the
  dispatched rows per assignment (c in the module doc)."""
  D = cfg.d_model
  if kind == 'dense':
    F = cfg.dense_ffn_dim / tp
    return 2 * D + 3 * F, 2 * F + D
  F, K, S = cfg.expert_ffn_dim / tp, cfg.top_k, cfg.num_shared_experts
  E = cfg.router.num_routed
  f32 = 4 / compute_bytes
  routed = K * rows * (2 * D + 3 * F)
  shared = 3 * S * F
  return 2 * D + routed + shared + 2 * E * f32, 2 * S * F + (D if S else 0) + E * f32


def activation_bytes(config, mesh_sizes: dict, platform: str | None = None) -> int:
  """Estimated activation bytes per device of one train step (formula in the module doc) on
  `platform` (the default backend when None; it picks the 'auto' dispatch)."""
  m, t = ModelConfig.from_config(config.model), config.train
  b = jnp.dtype(precision.compute_dtype(m)).itemsize
  tp = mesh_sizes.get('tensor', 1)
  tokens = tokens_per_device(config, mesh_sizes)
  rows = dispatch_rows(m, tokens, mesh_sizes, platform or jax.default_backend()) if m.num_moe_layers else 1.0
  layers, backward = [], []
  for i, name in enumerate(m.layer_attentions):
    attn, attn_dots = attention_elements(m, name, t.seq_len, tp)
    ffn, ffn_dots = ffn_elements(m, m.layer_kinds[i], tp, b)
    padding = ffn_elements(m, m.layer_kinds[i], tp, b, rows)[0] - ffn   # the dispatch's extra rows
    if m.block == 'scmoe' and m.layer_kinds[i] == 'moe':   # second attention and two dense FFNs
      d, d_dots = ffn_elements(m, 'dense', tp, b)
      attn, attn_dots, ffn, ffn_dots = 2 * attn, 2 * attn_dots, ffn + 2 * d, ffn_dots + 2 * d_dots
    layers.append((attn + ffn, attn_dots + ffn_dots))
    backward.append(2 * (attn + ffn) + padding)
  head = 2 * m.d_model + 3 * m.vocab_size / tp * 4 / b
  L, D = len(layers), m.d_model
  # the backward of one block holds its residuals and their gradients at once, and the padding rows
  # of the dispatch's largest buffers once; the head's transient (logits) is live at another time
  transient = max(max(backward), head)
  if m.remat == 'none':
    saved = sum(a for a, _ in layers)
  elif m.remat == 'full':
    saved = L * D
  else:   # 'dots'
    saved = L * D + sum(d for _, d in layers)
  return int(tokens * (saved + transient) * b)


def memory(config, mesh_sizes: dict, platform: str | None = None) -> Memory:
  return Memory(**state_bytes(config, mesh_sizes), activations=activation_bytes(config, mesh_sizes, platform),
                tokens_per_device=tokens_per_device(config, mesh_sizes))


def active_params(m) -> int:
  """Parameters one token uses: all but the routed experts it is not sent to (`m`: config.model)."""
  from moejax.params import count
  m = ModelConfig.from_config(m)
  idle = 3 * m.d_model * m.expert_ffn_dim * (m.num_experts - m.top_k) * m.num_moe_layers
  return count(model.model_specs(m)) - idle
