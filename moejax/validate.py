"""Config validation before anything compiles: each problem is one line that names the field."""
import math
import os


import jax

from moejax import moe, optim, precision, sharding, transfer
from moejax.attention import ATTENTIONS, parse_pattern
from moejax.model import REMAT_POLICIES
from moejax.params import is_spec


GQA_FAMILY = ('gqa', 'mha', 'swa')
DOCUMENT_MASKED = ('gqa', 'mha', 'swa', 'mla', 'nsa', 'kda')   # attention types that honour segment ids


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the field's name."""


def _check(ok: bool, field: str, problem: str):
  if not ok:
    raise ConfigError(f'{field}: {problem}')


def _positive(cfg, section: str, *names: str):
  for name in names:
    value = cfg[section][name]
    _check(isinstance(value, (int, float)) and value > 0, f'{section}.{name}',
           f'must be positive, got {value!r}')


def _one_of(value, choices, field: str):
  _check(value in choices, field, f'unknown name {value!r}; choose one of {sorted(choices)}')


def validate_model(m):
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
               'dense_ffn_dim', 'expert_ffn_dim'):
    _check(isinstance(m[name], int) and m[name] > 0, f'model.{name}', f'must be a positive integer, got {m[name]!r}')
  _check(m.num_experts >= 1, 'model.num_experts', f'must be >= 1, got {m.num_experts}')
  _check(1 <= m.top_k <= m.num_experts + m.num_zero_experts, 'model.top_k',
         f'{m.top_k} must be between 1 and model.num_experts ({m.num_experts})'
         + (f' + model.num_zero_experts ({m.num_zero_experts})' if m.num_zero_experts else ''))
  _check(0 <= m.num_dense_layers <= m.num_layers, 'model.num_dense_layers',
         f'{m.num_dense_layers} must be between 0 and model.num_layers ({m.num_layers})')
  _check(m.num_shared_experts >= 0, 'model.num_shared_experts', 'must be >= 0')
  _check(m.d_model % m.num_heads == 0, 'model.d_model',
         f'{m.d_model} is not divisible by model.num_heads ({m.num_heads})')
  _check(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads',
         f'model.num_heads ({m.num_heads}) is not divisible by {m.num_kv_heads}')
  _check(m.head_dim % 2 == 0 and m.qk_rope_head_dim % 2 == 0, 'model.head_dim',
         'rotary dims (head_dim, qk_rope_head_dim) must be even')
  _check(isinstance(m.attention, str), 'model.attention', f'must be a name or a comma pattern, got {m.attention!r}')
  for name in parse_pattern(m.attention):
    _one_of(name, ATTENTIONS, 'model.attention')
  for name in ('window', 'nsa_block', 'nsa_stride', 'nsa_select_block', 'kda_chunk', 'kda_conv'):
    _check(isinstance(m[name], int) and m[name] > 0, f'model.{name}', f'must be a positive integer, got {m[name]!r}')
  _check(isinstance(m.nsa_num_selected, int) and m.nsa_num_selected >= 2, 'model.nsa_num_selected',
         f'must be an integer >= 2 (the first and the local block are always selected), got {m.nsa_num_selected!r}')
  names = set(parse_pattern(m.attention))
  for flag, supported in (('qk_norm', GQA_FAMILY), ('attn_sinks', GQA_FAMILY),
                          ('attn_softcap', GQA_FAMILY + ('mla',)), ('document_mask', DOCUMENT_MASKED)):
    unsupported = sorted(names - set(supported))
    _check(not m[flag] or not unsupported, f'model.{flag}',
           f'not supported by attention {", ".join(unsupported)} (only by {", ".join(supported)})')
  _check(m.attn_softcap >= 0, 'model.attn_softcap', f'must be >= 0, got {m.attn_softcap}')
  _one_of(m.dispatch, moe.DISPATCH_NAMES, 'model.dispatch')
  _check(not (m.precision == 'fp8' and m.dispatch in moe.GROUPED_DISPATCHES), 'model.dispatch',
         f'{m.dispatch!r} has no fp8 path; use dropless, capacity or capacity_a2a with precision fp8')
  _one_of(m.block, ('standard', 'scmoe'), 'model.block')
  _one_of(m.router_score, ('sigmoid', 'softmax'), 'model.router_score')
  _one_of(m.remat, REMAT_POLICIES, 'model.remat')
  _one_of(m.compute_dtype, ('float32', 'bfloat16', 'float16'), 'model.compute_dtype')
  _one_of(m.precision, precision.POLICIES, 'model.precision')
  _check(m.capacity_factor > 0, 'model.capacity_factor', f'must be positive, got {m.capacity_factor}')
  _check(m.bias_update_rate >= 0, 'model.bias_update_rate', 'must be >= 0')
  _one_of(m.bias_update_mode, ('sign', 'proportional'), 'model.bias_update_mode')
  _one_of(m.bias_update_schedule, ('constant', 'linear'), 'model.bias_update_schedule')
  _one_of(m.balance_loss_scope, ('sequence', 'global'), 'model.balance_loss_scope')
  _check(m.num_zero_experts >= 0, 'model.num_zero_experts', f'must be >= 0, got {m.num_zero_experts}')
  if m.num_zero_experts:
    _check(0 < m.target_active_experts <= m.top_k, 'model.target_active_experts',
           f'{m.target_active_experts} must be in (0, model.top_k={m.top_k}] with zero-computation experts')
    _check(not m.bias_center, 'model.bias_center',
           'centring the bias update would cancel the steering towards target_active_experts')
  _check(m.balance_gnr_target >= 0, 'model.balance_gnr_target', 'must be >= 0')
  for name in ('balance_loss_weight', 'z_loss_weight', 'hidden_z_loss_weight'):
    _check(m[name] >= 0, f'model.{name}', f'must be >= 0, got {m[name]}')
  base = m.get('base_width', 0)
  _check(isinstance(base, int) and base >= 0, 'model.base_width', f'must be an integer >= 0 (0 = off), got {base!r}')


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
  from moejax.model import model_specs
  rules = dict(config.sharding)
  specs = model_specs(config.model)
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
  """Raises ConfigError naming the first field that cannot work."""
  validate_model(config.model)
  _positive(config, 'train', 'steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'eval_batches')
  _positive(config, 'checkpoint', 'every', 'max_to_keep')
  _positive(config, 'optim', 'lr', 'clip_norm')
  _check(config.optim.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0')
  _check(config.optim.eps > 0, 'optim.eps', 'must be positive')
  _check(config.optim.qk_clip >= 0, 'optim.qk_clip', f'must be >= 0, got {config.optim.qk_clip}')
  _check(not (config.optim.qk_clip and config.model.qk_norm), 'optim.qk_clip',
         'has no effect with model.qk_norm (the norm undoes the rescaled projections)')
  _check(not (config.optim.qk_clip and 'nsa' in parse_pattern(config.model.attention)), 'optim.qk_clip',
         'not supported by attention nsa (its compressed keys pass through an MLP)')
  from moejax.model import model_specs
  from moejax.params import logical_axes
  optim.validate_optim(config.optim, logical_axes(model_specs(config.model)), config.train.steps)
  transfer.optim_config(config.optim, config.model, logical_axes(model_specs(config.model)))
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
  from moejax.data import pipeline
  w = config.data.get('workers', 0)
  _check(isinstance(w, int) and w >= 0, 'data.workers', f'must be an integer >= 0, got {w!r}')
  d = config.data.dir
  _check(os.path.isdir(d), 'data.dir',
         f'{d} does not exist and data.raw ({config.data.raw}) has no text to prepare it from; '
         'run `make data` or point --config.data.dir at prepared data')
  try:
    manifest = pipeline.load_manifest(d)
  except pipeline.DataError as e:
    raise ConfigError(f'data.dir: {e}') from None
  try:
    for source in pipeline.sources_from_config(config.data):
      _check(os.path.isdir(source.dir), f'data.sources.{source.name}.dir', f'{source.dir} does not exist')
  except pipeline.DataError as e:
    raise ConfigError(str(e)) from None
  _check(manifest['vocab_size'] <= config.model.vocab_size, 'model.vocab_size',
         f'{config.model.vocab_size} is smaller than the tokenizer vocabulary ({manifest["vocab_size"]}) in {d}')
  return manifest
