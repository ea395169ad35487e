"""Config validation before anything compiles: each problem is one line that names the field."""
import math
import os

import jax

from moejax import optim, sharding, transfer
from moejax.attention import ATTENTIONS
from moejax.errors import ConfigError, check  # noqa: F401 (ConfigError: re-exported)
from moejax.model import model_specs
from moejax.model_config import ModelConfig
from moejax.params import is_spec, logical_axes

_check = check   # the checks below read as before


def _positive(cfg, section: str, *names: str):
  for name in names:
    value = cfg[section][name]
    _check(isinstance(value, (int, float)) and value > 0, f'{section}.{name}',
           f'must be positive, got {value!r}')


def profile_steps(spec) -> tuple[int, int] | None:
  """train.profile_steps 'A,B' (or 'A') -> the steps (A, B) to trace, 1 <= A <= B; '' -> None."""
  spec = str(spec).strip()
  if not spec:
    return None
  parts = spec.split(',')
  ok = len(parts) <= 2 and all(p.strip().isdigit() for p in parts)
  first, last = (int(parts[0]), int(parts[-1])) if ok else (0, 0)
  _check(ok and 1 <= first <= last, 'train.profile_steps',
         f"must be 'A,B' with 1 <= A <= B (the steps to trace), got {spec!r}")
  return first, last


def validate_mesh(config, num_devices: int) -> dict:
  sizes = dict(config.mesh)
  for axis, size in sizes.items():
    _check(axis in sharding.MESH_AXES, f'mesh.{axis}',
           f'unknown mesh axis; choose from {", ".join(sharding.MESH_AXES)}')
    _check(isinstance(size, int) and (size >= 1 or size == -1), f'mesh.{axis}',
           f'size must be a positive integer or -1, got {size!r}')
  _check(sum(s == -1 for s in sizes.values()) <= 1, 'mesh', 'at most one axis may be -1')
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    _check(num_devices % known == 0, 'mesh',
           f'fixed axis sizes (product {known}) do not divide the {num_devices} devices')
  sizes = sharding.mesh_shape(sizes, num_devices)
  _check(math.prod(sizes.values()) == num_devices, 'mesh',
         f'axis sizes {sizes} multiply to {math.prod(sizes.values())}, not the {num_devices} devices')
  return sizes


def validate_sharding(config, sizes: dict):
  """The rules name known logical and mesh axes, and every sharded parameter dim divides evenly
  (uneven shards would need padding; the fix is a smaller mesh axis or an emptier rule)."""
  rules = dict(config.sharding)
  specs = model_specs(ModelConfig.from_config(config.model))
  used = {a for s in jax.tree.leaves(specs, is_leaf=is_spec) for a in s.axes}
  for name, value in rules.items():
    field = f'sharding.{name}'
    _check(name in sharding.LOGICAL_AXES or name in used, field,
           f'unknown logical axis; choose from {", ".join(sharding.LOGICAL_AXES)}')
    _check(value is None or isinstance(value, (str, tuple, list)), field,
           f'must be comma-separated mesh axes, got {value!r}')
    axes = sharding.rule_axes(value)
    for axis in axes:
      _check(axis in sharding.MESH_AXES, field,
             f'names unknown mesh axis {axis!r}; choose from {", ".join(sharding.MESH_AXES)}')
    _check(len(set(axes)) == len(axes), field, f'names a mesh axis twice: {value!r}')
  if sizes.get('expert', 1) > 1:
    _check('expert' in sharding.rule_axes(rules.get('expert')), 'sharding.expert',
           f'must include the expert mesh axis when mesh.expert = {sizes["expert"]} '
           '(the expert weights would be replicated)')
  for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
    spec = sharding.logical_to_spec(s.axes, rules, tuple(sizes))
    for dim, (name, mesh_axes) in enumerate(zip(s.axes, spec)):
      n = math.prod(sizes[a] for a in sharding.rule_axes(mesh_axes))
      _check(s.shape[dim] % n == 0, f'sharding.{name}',
             f'parameter {jax.tree_util.keystr(path)} dim {dim} (size {s.shape[dim]}) is not '
             f'divisible by mesh axes {"x".join(sharding.rule_axes(mesh_axes))} ({n}); '
             f'use a smaller mesh axis or map {name!r} to fewer axes')


def validate(config, num_devices: int, check_data: bool = True):
  """Raises ConfigError naming the first field that cannot work; returns the mesh axis sizes."""
  mc = ModelConfig.from_config(config.model)   # each component checks its own fields
  _positive(config, 'train', 'steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'eval_batches')
  _positive(config, 'checkpoint', 'every', 'max_to_keep')
  profile_steps(config.train.get('profile_steps', ''))
  _positive(config, 'optim', 'lr', 'clip_norm')
  _check(config.optim.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0')
  _check(config.optim.eps > 0, 'optim.eps', 'must be positive')
  _check(config.optim.qk_clip >= 0, 'optim.qk_clip', f'must be >= 0, got {config.optim.qk_clip}')
  _check(not (config.optim.qk_clip and mc.attn.qk_norm), 'optim.qk_clip',
         'has no effect with model.attn.qk_norm (the norm undoes the rescaled projections)')
  refusing = sorted({n for n in mc.layer_attentions if ATTENTIONS[n].qk_clip is None})
  _check(not (config.optim.qk_clip and refusing), 'optim.qk_clip',
         f'not supported by attention {", ".join(refusing)} (rescaling its projections would not '
         'rescale its logits)')
  _check(mc.mtp.depth < config.train.seq_len, 'model.mtp.depth',
         f'{mc.mtp.depth} must be smaller than train.seq_len ({config.train.seq_len}): depth k needs '
         'the token k + 1 positions ahead')
  axes = logical_axes(model_specs(mc))
  optim.validate_optim(config.optim, axes, config.train.steps)
  transfer.optim_config(config.optim, mc, axes)
  sizes = validate_mesh(config, num_devices)
  # The expert dispatch (moejax.moe) splits experts over 'expert' and their hidden units over
  # 'tensor' whatever the storage rules.
  _check(config.model.num_experts % sizes.get('expert', 1) == 0, 'model.num_experts',
         f'{config.model.num_experts} is not divisible by mesh.expert ({sizes.get("expert", 1)})')
  _check(config.model.expert_ffn_dim % sizes.get('tensor', 1) == 0, 'model.expert_ffn_dim',
         f'{config.model.expert_ffn_dim} is not divisible by mesh.tensor ({sizes.get("tensor", 1)})')
  validate_sharding(config, sizes)
  batch_axes = [a for a in sharding.rule_axes(config.sharding.get('batch')) if a in sizes]
  dp = math.prod(sizes[a] for a in batch_axes)
  _check(config.train.batch_size % dp == 0, 'train.batch_size',
         f'{config.train.batch_size} is not divisible by the data-parallel size {dp} '
         f'(mesh axes {"x".join(batch_axes) or "none"})')
  if check_data:
    validate_data(config)
  return sizes


def validate_data(config):
  from moejax.data import pipeline, shards
  w = config.data.get('workers', 0)
  _check(isinstance(w, int) and w >= 0, 'data.workers', f'must be an integer >= 0, got {w!r}')
  d = config.data.dir
  _check(os.path.isdir(d), 'data.dir',
         f'{d} does not exist and data.raw ({config.data.raw}) has no text to prepare it from; '
         'run `make data` or point --config.data.dir at prepared data')
  try:
    manifest = shards.load_manifest(d)
  except shards.DataError as e:
    raise ConfigError(f'data.dir: {e}') from None
  try:
    for source in pipeline.sources_from_config(config.data):
      _check(os.path.isdir(source.dir), f'data.sources.{source.name}.dir', f'{source.dir} does not exist')
  except pipeline.DataError as e:
    raise ConfigError(str(e)) from None
  _check(manifest['vocab_size'] <= config.model.vocab_size, 'model.vocab_size',
         f'{config.model.vocab_size} is smaller than the tokenizer vocabulary ({manifest["vocab_size"]}) in {d}')
  return manifest
