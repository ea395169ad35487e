"""The sharded train state: built from the config (or its abstract shape for restoring).

State = {step, params, opt_state, router_bias, balance_coef} (+ router_momentum with SMEBU, and
mtp_router_bias[, mtp_router_momentum] for MoE blocks among the MTP modules); the router bias and
the balance coefficients per MoE layer are updated by the train step, not by the optimizer.
Shardings come from the parameters' logical axes and `config.sharding`; the optimizer state takes
the shardings of the parameters it mirrors. Building the state reads no data (moejax.data.ensure prepares it for training).
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from moejax import grow, model, optim, sharding, transfer
from moejax.model_config import ModelConfig
from moejax.params import init_params, logical_axes
from moejax.validate import validate


@dataclass
class Setup:
  """Everything derived from the config that the step functions close over."""
  config: object
  model: ModelConfig            # the typed model config the step functions pass on
  mesh: object
  tx: object
  state_shardings: dict
  batch_sharding: object
  abstract_state: dict


def mirror_shardings(abstract_opt, abstract_params, param_shardings, default):
  """Shards every optimizer-state leaf that mirrors a parameter (its key path ends with the
  parameter's path and it has the parameter's shape) like that parameter; the rest `default`.

  Works for any chain, including `optax.partition` groups whose states hold only their own leaves."""
  container_keys = (jax.tree_util.DictKey, jax.tree_util.SequenceKey)   # params: dicts and lists
  key = lambda k: k.key if isinstance(k, jax.tree_util.DictKey) else k.idx
  by_path = {}
  for (path, a), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                           jax.tree.leaves(param_shardings)):
    by_path[tuple(key(k) for k in path)] = (a.shape, sh)

  def one(path, leaf):
    keys = []
    for k in reversed(path):   # the trailing run of dict keys and list indices
      if not isinstance(k, container_keys):
        break
      keys.insert(0, key(k))
    for i in range(len(keys)):
      hit = by_path.get(tuple(keys[i:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default
  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def setup(config, devices=None) -> Setup:
  """Validates the config (no data read) and builds the mesh, optimizer and abstract state."""
  devices = jax.devices() if devices is None else devices
  sizes = validate(config, len(devices), check_data=False)
  return build_setup(config, sharding.make_mesh(sizes, devices))


def build_setup(config, mesh) -> Setup:
  """The optimizer, shardings and abstract state of an already validated config on `mesh`, which
  may be an AbstractMesh (shapes and shardings only, e.g. moejax.tools.memory)."""
  rules = dict(config.sharding)
  mc = ModelConfig.from_config(config.model)
  specs = model.model_specs(mc)
  param_shardings = sharding.tree_shardings(mesh, logical_axes(specs), rules)
  optim_config = transfer.optim_config(config.optim, mc, logical_axes(specs))
  tx, _ = optim.make_optimizer(optim_config, config.train.steps, logical_axes(specs))
  rep = sharding.replicated(mesh)
  abstract_params = jax.eval_shape(lambda: init_params(specs, jax.random.key(0)))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = mirror_shardings(abstract_opt, abstract_params, param_shardings, rep)
  L = mc.num_moe_layers
  state_shardings = {'step': rep, 'params': param_shardings, 'opt_state': opt_shardings,
                     'router_bias': rep, 'balance_coef': rep}
  abstract_state = {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': abstract_params,
      'opt_state': abstract_opt,
      'router_bias': jax.ShapeDtypeStruct((L, mc.router.num_routed), jnp.float32),
      'balance_coef': jax.ShapeDtypeStruct((L,), jnp.float32),
  }
  if mc.router.balancer == 'smebu':   # the bias velocity of the momentum-damped update
    state_shardings['router_momentum'] = rep
    abstract_state['router_momentum'] = jax.ShapeDtypeStruct((L, mc.router.num_routed), jnp.float32)
  for key in mtp_router_keys(mc):     # the MTP modules' MoE blocks: their own bias (moejax.mtp)
    state_shardings[key] = rep
    abstract_state[key] = jax.ShapeDtypeStruct((mc.mtp_moe_layers, mc.router.num_routed), jnp.float32)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
  batch_sharding = sharding.named(mesh, ('batch', None), rules)
  return Setup(config, mc, mesh, tx, state_shardings, batch_sharding, abstract_state)


def mtp_router_keys(mc: ModelConfig) -> tuple[str, ...]:
  """The state entries of the MTP modules' MoE blocks' routing (none without them)."""
  if not mc.mtp_moe_layers:
    return ()
  return ('mtp_router_bias',) + (('mtp_router_momentum',) if mc.router.balancer == 'smebu' else ())


def init_state(s: Setup):
  """A new run's state: params drawn from the specs (init scales under `model.base_width`, see
  moejax.transfer), or grown from `init.grow_from` (moejax.grow) with a fresh optimizer state."""
  specs = transfer.init_specs(model.model_specs(s.model), s.model)
  start = grow.grown_start(s.config)

  def init(key, start):
    params = init_params(specs, key) if start is None else start['params']
    router_bias = (jnp.zeros(s.abstract_state['router_bias'].shape, jnp.float32) if start is None
                   else start['router_bias'])
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': s.tx.init(params),
             'router_bias': router_bias,
             'balance_coef': jnp.full(s.abstract_state['balance_coef'].shape,
                                      s.model.loss.balance_weight, jnp.float32)}
    for key in ('router_momentum',) + mtp_router_keys(s.model):
      if key in s.abstract_state:
        state[key] = jnp.zeros(s.abstract_state[key].shape, jnp.float32)
    return state
  return jax.jit(init, out_shardings=s.state_shardings)(jax.random.key(s.config.seed), start)
