"""Model growth: a new, deeper run starts from the layers of a trained shallower one, stacked
(LongCat-Flash's model-growth initialisation: a half-depth model trained first, its layer stack
repeated; G_stack in Du et al. 2024, 'Stacking Your Transformers').

`--config.init.grow_from=<workdir>` reads that run's config.json and the params and router bias
of its latest checkpoint. The rule, for each block kind (dense, MoE) separately and in layer order:
layer i of the new model copies layer i mod n of the source's n layers of that kind, so 2 MoE
layers -> 4 gives [l0, l1, l0, l1] (the whole stack repeated) and 3 -> 4 gives [l0, l1, l2, l0].
The router bias rows follow their MoE layers; embedding, final norm, head and MTP modules are
copied; the optimizer state, step, balance coefficients and MTP router bias start fresh. Only the
depth may change (`model.num_layers`, `model.num_dense_layers`): any other field that changes a
parameter's shape is a ConfigError naming it, and under an attention pattern every new layer must
copy a layer of its own attention type. Resuming from the workdir's own checkpoint ignores `init.grow_from`.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checkpoint, model
from moejax.attention import parse_pattern, repeating_unit
from moejax.errors import ConfigError
from moejax.model_config import ModelConfig
from moejax.params import init_params, is_spec

DEPTH_FIELDS = ('num_layers', 'num_dense_layers', 'dense_layers')
KINDS = (('dense_blocks', 'dense'), ('moe_blocks', 'moe'))


def layer_map(n_src: int, n_dst: int) -> list[int]:
  """Source layer of each new layer (of one kind): i mod n_src."""
  return [i % n_src for i in range(n_dst)]


def kind_names(m, kind: str) -> list[str]:
  """The attention type of each layer of one kind (config.model `m`), in layer order."""
  return list(model.kind_attentions(ModelConfig.from_config(m), 'dense' if kind == 'dense_blocks' else 'moe'))


def _flat(d: dict, prefix: str = '') -> dict:
  """{'attn': {'num_heads': 4}} -> {'attn.num_heads': 4}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _with(d: dict, dotted: str, value) -> dict:
  """A copy of nested dict d with the dotted key set to value."""
  d = copy.deepcopy(d)
  *path, last = dotted.split('.')
  node = d
  for k in path:
    node = node[k]
  node[last] = value
  return d


def _prefix_only(m, where: str):
  mc = ModelConfig.from_config(m)
  if mc.layer_kinds != tuple(sorted(mc.layer_kinds)):   # 'dense' < 'moe': dense ones first
    raise ConfigError(f'model.dense_layers: growing needs the dense layers first ({where} has '
                      f'{mc.dense_layers!r})')


def unstack(stacks, names: list[str]) -> list:
  """A kind's params (one stack, or one per position of the pattern's unit) -> per-layer trees
  (dense layers first: the kind's groups are the positions of its attention pattern's unit)."""
  U = len(repeating_unit(names))
  stacks = (stacks,) if U == 1 else tuple(stacks)
  return [jax.tree.map(lambda a: a[l // U], stacks[l % U]) for l in range(len(names))]


def restack(layers: list, names: list[str]):
  """Per-layer trees -> the layout `model.group_specs` declares for `names` (dense layers first)."""
  U = len(repeating_unit(names))
  return model.kind_layout([jax.tree.map(lambda *a: jnp.stack(a), *layers[j::U]) for j in range(U)])


def _shape_signature(m) -> dict:
  """Parameter shapes with depth left out: top-level leaves, and one block of each FFN kind per
  attention type of the pattern (whichever layers the depth gives each kind)."""
  mc = ModelConfig.from_config(m)
  specs = model.model_specs(mc)
  sig = {k: v.shape for k, v in specs.items() if is_spec(v)}
  if 'mtp_blocks' in specs:   # copied as they are (their routers' bias starts afresh)
    sig['mtp_blocks'] = jax.tree.map(lambda s: s.shape, specs['mtp_blocks'], is_leaf=is_spec)
  for key, ffn in KINDS:
    for name in sorted(set(parse_pattern(m.attention))):
      block = model.block_specs(mc, ffn, name)
      sig[f'{key}/{name}'] = jax.tree.map(lambda s: s.shape, block, is_leaf=is_spec)
  return sig


def check_compatible(src, dst, where: str):
  """Raises ConfigError naming the first model field (other than depth) whose value in the new
  config changes a parameter shape from the source run's, or a layer-type mismatch."""
  if _shape_signature(src) != _shape_signature(dst):
    d, s = dst.to_dict(), src.to_dict()
    fd, fs = _flat(d), _flat(s)
    for f in [k for k in fd if k not in DEPTH_FIELDS and k in fs and fs[k] != fd[k]]:
      trial = ml_collections.ConfigDict(_with(d, f, fs[f]))   # the new config with only f as in the source
      if _shape_signature(trial) != _shape_signature(dst):
        raise ConfigError(f'model.{f}: {fd[f]!r} here but {fs[f]!r} in {where}; growing changes '
                          'only the depth (model.num_layers, model.num_dense_layers)')
    raise ConfigError(f'init.grow_from: parameter shapes differ from those of {where}')
  for key, _ in KINDS:
    s_names, d_names = kind_names(src, key), kind_names(dst, key)
    if d_names and not s_names:
      raise ConfigError(f'model.num_dense_layers: the new model has {len(d_names)} {key} but {where} has none '
                        'to stack')
    for i, j in enumerate(layer_map(len(s_names), len(d_names))):
      if d_names[i] != s_names[j]:
        raise ConfigError(f'model.attention: {key} layer {i} ({d_names[i]}) would copy layer {j} '
                          f'({s_names[j]}) of {where}')


def grow_params(src_params, src, dst):
  """The new model's params: each kind's layers stacked by `layer_map`, the rest copied."""
  out = {k: v for k, v in src_params.items() if k not in dict(KINDS)}
  for key, _ in KINDS:
    s_names, d_names = kind_names(src, key), kind_names(dst, key)
    if d_names:
      layers = unstack(src_params[key], s_names)
      out[key] = restack([layers[j] for j in layer_map(len(s_names), len(d_names))], d_names)
  return out


def grow_router_bias(bias_LE, src, dst):
  idx = layer_map(ModelConfig.from_config(src).num_moe_layers, ModelConfig.from_config(dst).num_moe_layers)
  return bias_LE[np.asarray(idx, np.int32)] if idx else bias_LE[:0]


def load_source(workdir: str):
  """(model config, {'params', 'router_bias'} on one local device, step) of a run's latest checkpoint."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ConfigError(f'init.grow_from: {workdir} has no config.json (not a run directory)')
  with open(path) as f:
    src = ml_collections.ConfigDict(json.load(f)['model'])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mc = ModelConfig.from_config(src)
  specs = model.model_specs(mc)
  abstract = {
      'params': jax.eval_shape(lambda: init_params(specs, jax.random.key(0))),
      'router_bias': jax.ShapeDtypeStruct((mc.num_moe_layers, mc.router.num_routed), jnp.float32)}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  try:
    restored, step = checkpoint.restore_items(workdir, abstract)
  except FileNotFoundError as e:
    raise ConfigError(f'init.grow_from: {e}') from None
  return src, restored, step


def grown_start(config):
  """{'params', 'router_bias'} (host arrays) grown from `config.init.grow_from`, or None when unset."""
  workdir = config.get('init', {}).get('grow_from', '')
  if not workdir:
    return None
  src, restored, step = load_source(workdir)
  where = f'the source run {workdir}'
  _prefix_only(src, where)
  _prefix_only(config.model, 'the new model')
  check_compatible(src, config.model, where)
  dst = config.model
  start = jax.device_get({'params': grow_params(restored['params'], src, dst),
                          'router_bias': grow_router_bias(restored['router_bias'], src, dst)})
  maps = ', '.join(f'{key} {layer_map(len(kind_names(src, key)), len(kind_names(dst, key)))}'
                   for key, _ in KINDS if kind_names(dst, key))
  print(f'grown from {workdir} (step {step}): new layer <- source layer: {maps}', flush=True)
  return start
