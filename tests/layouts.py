"""The mesh layouts the layout and memory tests share: one tiny model trained one step per layout."""
import functools
import math

import jax
import numpy as np
from conftest import TINY_MODEL, numpy_init_params, update_model

from moejax import configs, model, sharding
from moejax.state import build_setup
from moejax.train import make_train_step
from moejax.validate import validate

# name -> (mesh sizes, sharding rule overrides)
LAYOUTS = {
    'fsdp8': ({'data': 1, 'fsdp': 8, 'expert': 1, 'tensor': 1}, {}),
    'data2_fsdp2_expert2': ({'data': 2, 'fsdp': 2, 'expert': 2, 'tensor': 1}, {}),
    'fsdp2_tensor4': ({'data': 1, 'fsdp': 2, 'expert': 1, 'tensor': 4}, {}),
    'data2_expert2_tensor2': ({'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 2}, {}),
    # experts split over expert x fsdp (fsdp inside each expert group), so their 'embed' stays whole
    'expert4_fsdp2_in_group': ({'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1}, {'expert': 'expert,fsdp'}),
}
SINGLE = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}

B, T = 8, 16
# Half the CPU compile time (the program and its numerics are the same up to fusion).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def layout_config(mesh: dict, rules: dict):
  c = configs.base_config()
  update_model(c.model, TINY_MODEL)
  # 8 query / 4 kv heads so that tensor=4 splits both; two MoE layers only (the shared expert
  # covers the 'mlp' axis) to keep compiles short
  update_model(c.model, dict(attn=dict(num_heads=8, num_kv_heads=4, head_dim=4), num_layers=2,
                             num_dense_layers=0, init_std=0.1,
                             loss=dict(balance_weight=0.01, z_weight=0.001)))
  c.train.batch_size, c.train.seq_len, c.train.steps = B, T, 10
  c.optim.b1, c.optim.clip_norm, c.optim.warmup_steps = 0.0, 1e9, 0   # mu after step 1 = grads
  c.mesh = dict(mesh)
  c.sharding.update(rules)
  return c


def make_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY_MODEL['vocab_size'], (B, T + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'loss_mask': (rng.random((B, T)) > 0.2).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def run_layout(name):
  """(setup, initial state on host, step outputs on host, state after one step on the devices).

  Every layout starts from the single-device initial state, placed with the layout's shardings."""
  mesh_sizes, rules = LAYOUTS[name] if name != 'single' else (SINGLE, {})
  c = layout_config(mesh_sizes, rules)
  n = math.prod(mesh_sizes.values())
  validate(c, n, check_data=False)
  s = build_setup(c, sharding.make_mesh(mesh_sizes, jax.devices()[:n]))
  if name == 'single':   # numpy draws: a jitted init_state would cost another compile
    p = numpy_init_params(model.model_specs(s.model), seed=0)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), s.abstract_state)
    state = jax.device_put({**zeros, 'params': p, 'opt_state': jax.jit(s.tx.init)(p),
                            'balance_coef': zeros['balance_coef'] + s.model.loss.balance_weight},
                           s.state_shardings)
  else:
    state = jax.device_put(run_layout('single')[1], s.state_shardings)
  host_init = jax.device_get(state)
  batch = {k: jax.device_put(v, s.batch_sharding) for k, v in make_batch().items()}
  step = make_train_step(s, diagnostics=False).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  new_state, out = step(state, batch)
  return s, host_init, jax.device_get(out), new_state
