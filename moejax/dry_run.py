"""A config's dry run: validate it and report the mesh, the parameter counts and the bytes per
device of the train state and the activations, without data, devices or compilation.

    python -m moejax.dry_run --config=experiments/speedrun_fineweb_edu.py [--num_devices=8] [--config.a.b=v]

`dry_run(config, num_devices)` returns the report (a few lines of text) or raises ConfigError naming
the first field that cannot work (the CLI prints it as one line, `error: ...`, and exits 2). The
config is checked as training checks it (moejax.validate), except for the prepared data, which need
not be on disk: the report lists the inputs (data dirs, task files) a run would read and whether
they are there. The state's bytes are exact for the shardings, computed on a
`jax.sharding.AbstractMesh` (moejax.footprint); the activations are the estimate of
moejax/tools/memory.py. XLA's own temporaries (all-gathered weights, exchange buffers) come on top.

num_devices=None: this process's devices when the mesh fits them, else the fewest the mesh's fixed
axis sizes need (so an 8-device config dry-runs on a 1-CPU laptop); the report says which.
"""
import math
import os
import sys

import jax

from moejax import flops, footprint, moe
from moejax.errors import ConfigError
from moejax.model_config import ModelConfig
from moejax.model import model_specs
from moejax.params import count
from moejax.validate import validate

GiB = footprint.GiB


def default_num_devices(config) -> tuple[int, str]:
  """(devices, why) for num_devices=None (see the module doc)."""
  sizes = dict(config.mesh)
  fixed = math.prod(s for s in sizes.values() if isinstance(s, int) and s > 0)
  have = jax.device_count()
  platform = jax.devices()[0].platform
  flexible = -1 in sizes.values()
  if (have % fixed == 0) if flexible else have == fixed:
    return have, f'this process has {have} {platform} device{"s" * (have != 1)}'
  return fixed, (f'the fewest its mesh needs; this process has {have} {platform} '
                 f'device{"s" * (have != 1)}, --num_devices chooses')


def _inputs(config) -> list[tuple[str, str, bool]]:
  """(field, path, exists) of everything a run reads from disk besides the config."""
  from moejax.data import pipeline
  out = [('data.dir', config.data.dir, os.path.isfile(os.path.join(config.data.dir, 'manifest.json')))]
  if config.data.get('sources'):
    try:
      sources = pipeline.sources_from_config(config.data)
    except pipeline.DataError as e:
      raise ConfigError(str(e)) from None
    out += [(s.field + '.dir', s.dir, os.path.isfile(os.path.join(s.dir, 'manifest.json'))) for s in sources]
  for path in [p.strip() for p in str(config.eval.get('tasks', '') or '').split(',') if p.strip()]:
    out.append(('eval.tasks', path, os.path.isfile(path) or
                (os.path.isdir(path) and any(f.endswith('.jsonl') for f in os.listdir(path)))))
  return out


def _row(name: str, n: int) -> str:
  return f'  {name:<12}{n:>18,} B  {n / GiB:8.2f} GiB'


def dry_run(config, num_devices: int | None = None) -> str:
  """The dry-run report of `config` on `num_devices` devices (None: see the module doc); raises
  ConfigError (one line naming the field) when the config cannot work."""
  if num_devices is None:
    num_devices, why = default_num_devices(config)
  else:
    why = 'as asked'
  if not isinstance(num_devices, int) or num_devices < 1:
    raise ConfigError(f'num_devices: must be a positive integer, got {num_devices!r}')
  sizes = validate(config, num_devices, check_data=False)
  inputs = _inputs(config)
  mem = footprint.memory(config, sizes)
  m = ModelConfig.from_config(config.model)
  t = config.train
  total, active = count(model_specs(m)), footprint.active_params(config.model)
  L, dense = m.num_layers, m.num_layers - m.num_moe_layers
  experts = (f'{m.num_experts} routed experts top-{m.top_k} + {m.num_shared_experts} shared, '
             f'expert FFN {m.expert_ffn_dim}' if L > dense else 'no MoE layers')
  tokens = t.batch_size * t.seq_len
  step_flops = flops.train_flops_per_token(m, t.seq_len) * tokens
  dispatch = {p: moe.resolve_dispatch(config.model.dispatch, p, sizes.get('expert', 1),
                                      config.model.precision == 'fp8') for p in ('gpu', 'tpu', 'cpu')}
  target = config.train.get('target_loss', 0) or 0
  lines = [
      f'dry run: config OK on {num_devices} device{"s" * (num_devices != 1)} ({why}); nothing allocated, no data read',
      'mesh: ' + ' x '.join(f'{a}={s}' for a, s in sizes.items()),
      f'model: {L} layers ({dense} dense + {L - dense} MoE), d_model {m.d_model}, {experts}, '
      f'vocab {m.vocab_size}, attention {config.model.attention}',
      f'params: {total:,} total ({total / 1e9:.2f}B) / {active:,} active per token ({active / 1e9:.2f}B)',
      f'precision {config.model.precision}, remat {config.model.remat}, dispatch {config.model.dispatch}'
      + (' (' + ', '.join(f'{p}: {d}' for p, d in dispatch.items()) + ')' if config.model.dispatch == 'auto' else ''),
      f'batch: {t.batch_size} x {t.seq_len} = {tokens:,} tokens per step, {mem.tokens_per_device:,} per device; '
      f'{step_flops:.3g} model FLOPs per step ({step_flops / num_devices:.3g} per device)',
      f'steps: {t.steps:,}' + (f', or until eval/loss <= {target} (evaluated every {t.eval_every} steps)'
                               if target else ''),
      'per device:',
      _row('params', mem.params),
      _row('grads', mem.grads),
      _row('optimizer', mem.opt_state),
      _row('other', mem.other),
      _row('activations', mem.activations) + '  (estimate)',
      _row('total', mem.total) + '  (+ XLA temporaries)',
      'inputs (not needed for a dry run):',
  ]
  lines += [f'  {field} {path}: {"present" if ok else "missing"}' for field, path, ok in inputs]
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags
  try:
    print(dry_run(flags.FLAGS.config, flags.FLAGS.num_devices or None))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  from moejax import cli
  _CONFIG = config_flags.DEFINE_config_file('config', 'experiments/default.py', 'Experiment config.')
  flags.DEFINE_integer('num_devices', 0, 'Devices of the mesh (0: this process\'s devices when the '
                       'mesh fits them, else the fewest the mesh needs).')
  cli.check_config_args(sys.argv, default=_CONFIG.default)
  app.run(main)
