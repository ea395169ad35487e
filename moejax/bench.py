"""Benchmarks behind `make bench`: training throughput, compile time and MoE layer efficiency.

Writes a markdown report (`--out`, default docs/perf.md). All figures in one report come from one
run on one machine; compare them as ratios, not across machines.
"""
import datetime
import importlib.util
import platform
import subprocess
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from moejax import flops, model, sharding
from moejax.data import pipeline
from moejax.layers import swiglu
from moejax.params import init_params
from moejax.state import init_state, setup
from moejax.train import make_train_step, to_global

_OUT = flags.DEFINE_string('out', 'docs/perf.md', 'Markdown report to write.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per throughput figure.')
_WARMUP = flags.DEFINE_integer('warmup', 40, 'Steps after compiling timed separately (the router settles).')


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def throughput(config, steps: int, warmup: int) -> dict:
  """Trains 1 + warmup + steps real steps on real batches with the trainer's own jitted step.

  Reports the first `warmup` steps after compiling (routing still settling from its init) and the
  `steps` after them separately: dropless cost follows the load imbalance (MaxVio)."""
  config.mesh = {'data': 1, 'expert': 1}
  s = setup(config, devices=jax.devices()[:1])
  t = config.train
  data = pipeline.train_iterator(pipeline.train_dataset(
      config.data.dir, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed))
  batches = [to_global(next(data), s.batch_sharding) for _ in range(warmup + steps + 1)]
  state, step = init_state(s), make_train_step(s)
  tokens = t.batch_size * t.seq_len
  peak = flops.peak_flops_per_device()

  def timed(window):
    nonlocal state
    loads, start = [], time.perf_counter()
    for b in window:
      state, out = step(state, b)
      loads.append(out.get('load_LE'))
    jax.block_until_ready(out)
    dt = (time.perf_counter() - start) / len(window)
    r = {'step_ms': dt * 1e3, 'tokens_per_sec': tokens / dt,
         'mfu': flops.train_flops_per_token(config.model, t.seq_len) * tokens / dt / peak,
         'dropped_frac': float(out.get('moe/dropped_frac', 0.0))}
    if loads[0] is not None:
      load = np.stack(jax.device_get(loads))  # [steps, L, E]
      r['maxvio'] = float(((load.max(-1) - load.mean(-1)) / load.mean(-1)).max(-1).mean())
    return r

  first = timed(batches[:1])['step_ms'] / 1e3
  early = timed(batches[1:warmup + 1])
  steady = timed(batches[warmup + 1:])
  return {**steady, 'first_step_s': first, 'early': early}


def compile_seconds(config, num_layers: int) -> float:
  config.model.num_layers = num_layers
  config.mesh = {'data': 1, 'expert': 1}
  s = setup(config, devices=jax.devices()[:1])
  t = config.train
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), d, sharding=s.batch_sharding)
           for k, d in (('inputs', jnp.int32), ('targets', jnp.int32), ('loss_mask', jnp.float32))}
  start = time.perf_counter()
  make_train_step(s).lower(s.abstract_state, batch).compile()
  return time.perf_counter() - start


def time_fn(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def moe_layer_ratio(config, num_experts: int) -> dict:
  """Forward+backward time of one MoE layer (routed + shared experts) over a dense SwiGLU with the
  same active FLOPs (ffn = (top_k + shared) * expert_ffn_dim), on the same tokens."""
  m = config.model
  m.num_experts = num_experts
  mesh = sharding.make_mesh({'data': 1, 'expert': 1}, jax.devices()[:1])
  T, D = config.train.batch_size * config.train.seq_len, m.d_model
  key = jax.random.key(0)
  p_moe = init_params(model.moe_specs(m), key)
  p_dense = init_params(model.swiglu_specs(D, (m.top_k + m.num_shared_experts) * m.expert_ffn_dim, m), key)
  x_BTD = jax.random.normal(key, (config.train.batch_size, config.train.seq_len, D))
  bias = jnp.zeros((num_experts,))

  def moe_loss(p, x):
    y, aux = model.moe_ffn(p, bias, x, m, mesh, ())
    return jnp.sum(y * y), aux['load_E']

  def dense_loss(p, x):
    return jnp.sum(swiglu(p, x) ** 2)

  moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1), has_aux=True))
  dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
  t_moe, t_dense = time_fn(moe_step, p_moe, x_BTD), time_fn(dense_step, p_dense, x_BTD)
  load = np.asarray(moe_step(p_moe, x_BTD)[1])
  return {'moe_ms': t_moe * 1e3, 'dense_ms': t_dense * 1e3, 'ratio': t_moe / t_dense,
          'maxvio': float((load.max() - load.mean()) / load.mean()), 'tokens': T}


def git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  steps, warmup = _STEPS.value, _WARMUP.value
  lines = [
      '# Performance', '',
      f'Made by `make bench` (`python -m moejax.bench --out={_OUT.value}`) at commit `{git_commit()}` on '
      f'{datetime.date.today()}, on {platform.processor() or platform.machine()} with '
      f'{jax.device_count()} {jax.devices()[0].platform.upper()} device(s), jax {jax.__version__}, '
      f'float32. Throughput: the trainer\'s own jitted step (AdamW, bias balancing on) on real '
      f'batches of the Shakespeare corpus; "steady" = {steps} steps after the first {warmup} steps '
      f'past compilation, "early" = those {warmup} steps (the router still settles from its init, '
      f'so dropless dispatch pays for the imbalance). MaxVio = mean over the steps of the max over '
      f'layers of (max - mean)/mean expert load. '
      f'MFU uses active-parameter FLOPs and an estimated peak of '
      f'{flops.peak_flops_per_device() / 1e9:.0f} GFLOP/s per device (moejax/flops.py).', '',
      '## Speed bar: experiments/bench.py (MLA, d_model 256, 4 layers, top-2 + 1 shared, vocab 8192, batch 8 x 256)', '',
      '| routed experts | dispatch | steady step (ms) | steady tokens/s | steady MFU | steady MaxVio '
      '| early tokens/s | early MaxVio | dropped |',
      '|---|---|---|---|---|---|---|---|---|']
  for E in (16, 64):
    for dispatch in ('dropless', 'capacity'):
      c = load_config('experiments/bench.py')
      c.model.num_experts, c.model.dispatch = E, dispatch
      r = throughput(c, steps, warmup)
      e = r['early']
      row = (f'| {E} | {dispatch}{" 1.25" if dispatch == "capacity" else ""} | {r["step_ms"]:.0f} | '
             f'{r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | {r["maxvio"]:.2f} | '
             f'{e["tokens_per_sec"]:,.0f} | {e["maxvio"]:.2f} | {r["dropped_frac"]:.2%} |')
      print(row, flush=True)
      lines.append(row)

  c = load_config('experiments/default.py')
  r = throughput(c, steps, warmup)
  lines += ['', '## experiments/default.py (the `make train` model)', '',
            '| step (ms) | tokens/s | MFU | first step incl. compile (s) |', '|---|---|---|---|',
            f'| {r["step_ms"]:.0f} | {r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | {r["first_step_s"]:.1f} |']
  print(lines[-1], flush=True)

  lines += ['', '## Compile time of the train step (experiments/default.py, layers scanned)', '',
            '| layers | compile (s) |', '|---|---|']
  for L in (2, 8):
    lines.append(f'| {L} | {compile_seconds(load_config("experiments/default.py"), L):.1f} |')
    print(lines[-1], flush=True)

  lines += ['', '## MoE layer cost over a dense MLP with the same active FLOPs', '',
            'Forward + backward of one MoE layer (router, dropless dispatch, top-2 routed + 1 shared '
            'expert of FFN 256, d_model 256, 2048 tokens, freshly initialised router) over a dense '
            'SwiGLU of FFN 3 x 256 on the same tokens.', '',
            '| routed experts | MoE layer (ms) | dense MLP (ms) | ratio | MaxVio of the batch |',
            '|---|---|---|---|---|']
  for E in (8, 64):
    r = moe_layer_ratio(load_config('experiments/bench.py'), E)
    lines.append(f'| {E} | {r["moe_ms"]:.1f} | {r["dense_ms"]:.1f} | {r["ratio"]:.2f} | {r["maxvio"]:.2f} |')
    print(lines[-1], flush=True)
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
