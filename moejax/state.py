"""The sharded train state: built from the config (or its abstract shape for restoring).

State = {step, params, opt_state, router_bias, rng}. Shardings come from the parameters' logical
axes and `config.sharding`; the optimizer state takes the shardings of the parameters it mirrors.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from moejax import model, optim, sharding
from moejax.data.prepare import prepare
from moejax.params import init_params, logical_axes
from moejax.validate import validate, validate_data


@dataclass
class Setup:
  """Everything derived from the config that the step functions close over."""
  config: object
  mesh: object
  tx: object
  schedule: object
  state_shardings: dict
  batch_sharding: object
  abstract_state: dict


def ensure_data(config):
  """Prepares `data.dir` from the raw text in `data.raw` (a no-op when it is up to date)."""
  d = config.data
  if d.raw and os.path.isdir(d.raw):
    msg = prepare(Path(d.raw), Path(d.dir), d.vocab_size, None, 0.05, config.seed,
                  variant_regex=d.get('variant_regex', ''))
    if 'up to date' not in msg:
      print(msg, flush=True)


def setup(config, devices=None) -> Setup:
  devices = jax.devices() if devices is None else devices
  sizes = validate(config, len(devices), check_data=False)
  ensure_data(config)
  validate_data(config)
  mesh = sharding.make_mesh(sizes, devices)
  rules = dict(config.sharding)
  specs = model.model_specs(config.model)
  param_shardings = sharding.tree_shardings(mesh, logical_axes(specs), rules)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  rep = sharding.replicated(mesh)
  abstract_params = jax.eval_shape(lambda: init_params(specs, jax.random.key(0)))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: rep)
  L = model.num_moe_layers(config.model)
  state_shardings = {'step': rep, 'params': param_shardings, 'opt_state': opt_shardings,
                     'router_bias': rep, 'rng': rep}
  abstract_state = {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': abstract_params,
      'opt_state': abstract_opt,
      'router_bias': jax.ShapeDtypeStruct((L, config.model.num_experts), jnp.float32),
      'rng': jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
  batch_sharding = sharding.named(mesh, ('batch', None), rules)
  return Setup(config, mesh, tx, schedule, state_shardings, batch_sharding, abstract_state)


def init_state(s: Setup):
  specs = model.model_specs(s.config.model)

  def init(key):
    params = init_params(specs, key)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': s.tx.init(params),
            'router_bias': jnp.zeros(s.abstract_state['router_bias'].shape, jnp.float32),
            'rng': jax.random.key_data(jax.random.fold_in(key, 1))}
  return jax.jit(init, out_shardings=s.state_shardings)(jax.random.key(s.config.seed))
