"""The MoE layer's cost over a dense MLP of equal active FLOPs, and its floor (the bench's moe_ratio
section, moejax/tools/bench.py): forward + backward of one MoE layer, of a dense SwiGLU of FFN
(top_k + shared) x expert_ffn_dim, and of the layer's expert einsums on rows already sorted by
expert and perfectly balanced (no router, sort, gather or combine), timed in turn on one device.

Axis letters: B batch, T tokens, D model, E experts, C rows per expert, K top-k.
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import model, moe, precision, sharding
from moejax.layers import swiglu
from moejax.model_config import ModelConfig
from moejax.params import init_params


def time_fn(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def best_times(calls: dict, repeats: int, rounds: int = 3) -> dict:
  """name -> the best over `rounds` of the mean of `repeats` calls of (fn, args); the names are
  timed in turn each round, so a ratio of two compares them under the same machine load."""
  best = {name: math.inf for name in calls}
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      best[name] = min(best[name], time_fn(fn, *args, repeats=repeats))
  return best


def sum_of_squares(*ys) -> jax.Array:
  return sum(jnp.sum(jnp.square(y.astype(jnp.float32))) for y in ys)


def balanced_rows(x_TD, top_k: int, num_experts: int):
  """The floor's input: the T*K assignments already sorted by expert and perfectly balanced,
  x_ECD with C = ceil(T*K / E) rows per expert (token t*K + k mod T in row order)."""
  T, D = x_TD.shape
  C = -(-T * top_k // num_experts)
  return x_TD[jnp.arange(num_experts * C) % T].reshape(num_experts, C, D)


def floor_loss(p, x_ECD, x_BTD, m: ModelConfig):
  """The MoE layer without routing: the routed experts' SwiGLU on x_ECD (one batched einsum per
  projection, the FLOPs of the layer's expert compute) plus the shared expert on the tokens."""
  einsum = precision.einsum_for(precision.fp8_mlp(m))
  p = model.cast_params(p, m)
  experts = {k: p[k] for k in ('w_gate', 'w_up', 'w_down')}
  ys = [jax.vmap(lambda w, x: swiglu(w, x, einsum))(experts, x_ECD)]
  if 'shared' in p:
    ys.append(swiglu(p['shared'], x_BTD, einsum))
  return sum_of_squares(*ys)


def moe_layer_ratio(config, num_experts: int, force_balance: bool, repeats: int = 10) -> dict:
  """Forward+backward time of one MoE layer (routed + shared experts) over a dense SwiGLU with the
  same active FLOPs (ffn = (top_k + shared) * expert_ffn_dim), on the same tokens, in the config's
  compute dtype (float32 master weights cast as in the model), dispatch chosen for the platform;
  and of its floor (floor_loss: the same expert einsums, no routing) over the same dense SwiGLU.
  `force_balance`: the router's choice replaced by a balanced assignment (model.router.force_balance)."""
  config.model.num_experts, config.model.dispatch = num_experts, 'auto'
  config.model.router.force_balance = force_balance
  m = ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh({'data': 1, 'expert': 1}, jax.devices()[:1])
  B, T, D = config.train.batch_size, config.train.seq_len, m.d_model
  key = jax.random.key(0)
  p_moe = init_params(model.moe_specs(m), key)
  p_dense = init_params(model.swiglu_specs(D, (m.top_k + m.num_shared_experts) * m.expert_ffn_dim, m), key)
  x_BTD = jax.random.normal(key, (B, T, D)).astype(precision.compute_dtype(m))
  x_ECD = balanced_rows(x_BTD.reshape(B * T, D), m.top_k, num_experts)
  p_floor = {k: v for k, v in p_moe.items() if k != 'router'}
  bias = jnp.zeros((num_experts,))

  def moe_loss(p, x):
    y, aux = model.moe_ffn(model.cast_params(p, m), bias, x, m, mesh, ())
    return sum_of_squares(y), aux.load_E

  def dense_loss(p, x):
    return sum_of_squares(swiglu(model.cast_params(p, m), x))

  moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1), has_aux=True))
  dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
  floor_step = jax.jit(jax.grad(lambda p, xe, x: floor_loss(p, xe, x, m), argnums=(0, 1, 2)))
  t = best_times({'moe': (moe_step, (p_moe, x_BTD)), 'dense': (dense_step, (p_dense, x_BTD)),
                  'floor': (floor_step, (p_floor, x_ECD, x_BTD))}, repeats)
  load = np.asarray(moe_step(p_moe, x_BTD)[1])
  dispatch = moe.resolve_dispatch('auto', jax.devices()[0].platform, 1, precision.fp8_mlp(m))
  return {'moe_ms': t['moe'] * 1e3, 'dense_ms': t['dense'] * 1e3, 'floor_ms': t['floor'] * 1e3,
          'ratio': t['moe'] / t['dense'], 'floor_ratio': t['floor'] / t['dense'],
          'maxvio': float((load.max() - load.mean()) / load.mean()), 'tokens': B * T,
          'dispatch': dispatch}


# --- sections: each returns its markdown lines ---
