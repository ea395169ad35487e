"""Benchmarks behind `make bench`: throughput and MFU, MoE layer efficiency, step-time scaling with
sequence length and depth, compile time, a 1B-class step, and the memory table (docs/perf.md).

`python -m moejax.tools.bench --out=docs/perf.md [--sections=throughput,scaling,...] [--quick]
[--synthetic] [--force_balance]` also writes the rows of the throughput and MoE-ratio tables to the
report's name with .json (a list of dicts: section, experts, dispatch, force_balance, and
tokens_per_s or ratio and floor_ratio). `--sections=controllers` (not in the default list; `make
ablate-balancing` runs it) times the speed-bar step with each router controller.

All figures in one report come from one run on one device of one machine (the first of
`jax.devices()`, so the same command runs on CPU, GPU or TPU); compare them as ratios, not across
machines. `--quick` runs every section on the smoke model with a few steps: a check that the
report builds (tests/test_bench.py), not figures to quote.
"""
import datetime
import json
import importlib.util
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from moejax import flops, model, moe, precision
from moejax.data import pipeline
from moejax.params import count
from moejax.state import init_state, setup
from moejax.train import make_train_step, to_global
from moejax.data.ensure import ensure_data
from moejax.model_config import ModelConfig
from moejax.tools import memory, provenance
from moejax.tools.moe_ratio import moe_layer_ratio, time_fn  # noqa: F401 (time_fn: for bench_eval)

SECTIONS = ('throughput', 'controllers', 'scaling', 'compile', 'moe_ratio', 'mfu_1b', 'memory')
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != 'controllers')   # that one: make ablate-balancing

GiB = 2 ** 30


@dataclass(frozen=True)
class Plan:
  """Configs and sweeps of each section: the full run, or --quick (everything on the smoke model)."""
  speed_bar: str
  default: str
  big: str                     # the 1B-class config
  speed_bar_experts: tuple
  moe_experts: tuple           # routed experts of the MoE layer ratio (top_k as configured)
  seq_lens: tuple              # scaling at the default config's tokens per batch
  layers: tuple                # scaling at the default config's seq_len and batch
  compile_layers: tuple
  scaling_warmup: int
  scaling_steps: int


FULL = Plan('experiments/bench.py', 'experiments/default.py', 'experiments/moe_1b.py', (16, 64),
            (8, 64, 256), (128, 256, 512), (2, 4, 8), (2, 8), scaling_warmup=10, scaling_steps=10)
SMOKE = 'experiments/smoke.py'
QUICK = Plan(SMOKE, SMOKE, SMOKE, (8,), (8, 64, 256), (32, 64), (2, 3), (2,), scaling_warmup=1,
             scaling_steps=2)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def platform_name() -> str:
  return jax.devices()[0].platform


def resolve_precision(flag: str, policy: str, platform_: str) -> str:
  """The policy a config runs under (see --precision)."""
  if flag == 'config':
    return policy
  if flag != 'auto':
    return flag
  if platform_ == 'cpu':
    return 'fp32'
  return 'bf16' if policy == 'fp32' else policy


def prepare(config, precision_flag: str):
  """One device, the precision the flag asks for. Returns the config (changed in place)."""
  config.mesh = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}
  m = config.model
  m.precision = resolve_precision(precision_flag, m.precision, platform_name())
  return config


def describe(m, batch_size: int, seq_len: int) -> str:
  """A model's shape in a few words, from its config (so the report never misstates it)."""
  shared = f' + {m.num_shared_experts} shared' if m.num_shared_experts else ''
  return (f'{m.attention.upper()}, d_model {m.d_model}, {m.num_layers} layers ({m.num_dense_layers} '
          f'dense), {m.num_experts} experts of FFN {m.expert_ffn_dim}, top-{m.top_k}{shared}, '
          f'vocab {m.vocab_size}, batch {batch_size} x {seq_len}, {m.precision}')


def billions(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if platform.system() == 'Darwin' else r * 1024


def synthetic_batch(config) -> dict:
  """One fixed batch of tokens drawn uniformly from the vocabulary (the MaxText peer's synthetic
  data): no document boundaries, the same batch every step."""
  t = config.train
  rng = np.random.default_rng(config.seed)
  windows = rng.integers(1, config.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)
  return pipeline.windows_to_batch(windows, eod_id=0)


def bench_batches(config, n: int, synthetic: bool) -> list:
  """n host batches: config.data.dir's first n, or the synthetic batch n times."""
  if synthetic:
    return [synthetic_batch(config)] * n
  ensure_data(config)
  t = config.train
  data = pipeline.train_iterator(pipeline.train_dataset(
      config.data.dir, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed))
  return [next(data) for _ in range(n)]


def run_steps(config, steps: int, warmup: int, synthetic: bool = False) -> dict:
  """Compiles the trainer's own step ahead of time (timed), then runs 1 + warmup + steps real steps
  on real batches of config.data.dir (`synthetic`: one fixed random batch, no data read).

  Reports the first `warmup` steps after the first (routing still settling from its init) and the
  `steps` after them separately: dropless cost follows the load imbalance (MaxVio)."""
  s = setup(config, devices=jax.devices()[:1])
  t = config.train
  batches = [to_global(b, s.batch_sharding) for b in bench_batches(config, warmup + steps + 1, synthetic)]
  state = init_state(s)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batches[0].items()}
  start = time.perf_counter()
  step = make_train_step(s, diagnostics=False).lower(s.abstract_state, batch_spec).compile()
  compile_s = time.perf_counter() - start
  mem = step.memory_analysis()
  tokens = t.batch_size * t.seq_len
  peak = flops.peak_flops_per_device(t.peak_flops_per_device)

  def timed(window):
    nonlocal state
    loads, start = [], time.perf_counter()
    for b in window:
      state, out = step(state, b)
      loads.append(out.get('load_LE'))
    jax.block_until_ready(out)
    dt = (time.perf_counter() - start) / len(window)
    r = {'step_ms': dt * 1e3, 'tokens_per_sec': tokens / dt,
         'mfu': flops.train_flops_per_token(s.model, t.seq_len) * tokens / dt / peak,
         'dropped_frac': float(out.get('moe/dropped_frac', 0.0))}
    if loads[0] is not None:
      load = np.stack(jax.device_get(loads))  # [steps, L, E]
      r['maxvio'] = float(((load.max(-1) - load.mean(-1)) / load.mean(-1)).max(-1).mean())
    return r

  first = timed(batches[:1])['step_ms'] / 1e3
  early = timed(batches[1:warmup + 1]) if warmup else None
  steady = timed(batches[warmup + 1:])
  xla = None
  if mem is not None:   # buffers of the step: arguments + outputs (not aliased) + temporaries
    xla = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return {**steady, 'compile_s': compile_s, 'first_step_s': compile_s + first, 'early': early,
          'xla_bytes': xla}


def compile_seconds(config, num_layers: int) -> float:
  config.model.num_layers = num_layers
  s = setup(config, devices=jax.devices()[:1])
  t = config.train
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), d, sharding=s.batch_sharding)
           for k, d in (('inputs', jnp.int32), ('targets', jnp.int32), ('loss_mask', jnp.float32))}
  start = time.perf_counter()
  make_train_step(s, diagnostics=False).lower(s.abstract_state, batch).compile()
  return time.perf_counter() - start


def router_label(force_balance: bool) -> str:
  return 'forced balance' if force_balance else 'real'


def section_throughput(plan: Plan, steps: int, warmup: int, prec: str, balances: tuple, synthetic: bool,
                       rows: list) -> list:
  c = prepare(load_config(plan.speed_bar), prec)
  data = 'one fixed random batch' if synthetic else f'batches of {c.data.dir}'
  lines = [f'## Speed bar: {plan.speed_bar} ({describe(c.model, c.train.batch_size, c.train.seq_len)})', '',
           f'Data: {data}. Router "forced balance": its choice replaced by a balanced assignment '
           '(model.router.force_balance), so dispatch is timed apart from what the router learns.', '',
           '| routed experts | router | dispatch | steady step (ms) | steady tokens/s | steady MFU '
           '| steady MaxVio | early tokens/s | early MaxVio | dropped |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for E in plan.speed_bar_experts:
    for force_balance in balances:
      for dispatch in ('dropless', 'capacity'):
        c = prepare(load_config(plan.speed_bar), prec)
        c.model.num_experts, c.model.dispatch = E, dispatch
        c.model.router.force_balance = force_balance
        r = run_steps(c, steps, warmup, synthetic)
        e = r['early'] or r
        cf = f' {c.model.capacity_factor:g}' if dispatch == 'capacity' else ''
        lines.append(f'| {E} | {router_label(force_balance)} | {dispatch}{cf} | {r["step_ms"]:.0f} | '
                     f'{r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | {r["maxvio"]:.2f} | '
                     f'{e["tokens_per_sec"]:,.0f} | {e["maxvio"]:.2f} | {r["dropped_frac"]:.2%} |')
        rows.append({'section': 'throughput', 'experts': E, 'dispatch': dispatch,
                     'force_balance': force_balance, 'synthetic': synthetic,
                     'tokens_per_s': r['tokens_per_sec'], 'step_ms': r['step_ms'], 'mfu': r['mfu'],
                     'maxvio': r['maxvio'], 'dropped_frac': r['dropped_frac']})
        print(lines[-1], flush=True)

  c = prepare(load_config(plan.default), prec)
  r = run_steps(c, steps, warmup, synthetic)
  lines += ['', f'## {plan.default} (the `make train` model: '
            f'{describe(c.model, c.train.batch_size, c.train.seq_len)})', '',
            '| step (ms) | tokens/s | MFU | first step incl. compile (s) |', '|---|---|---|---|',
            f'| {r["step_ms"]:.0f} | {r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | {r["first_step_s"]:.1f} |']
  print(lines[-1], flush=True)
  return lines


CONTROLLERS = ('bias', 'quantile', 'smebu')   # model.router.balancer


def section_controllers(plan: Plan, steps: int, warmup: int, prec: str, rows: list) -> list:
  """The speed-bar step with each router controller (dropless, real batches): dispatch cost follows
  the load imbalance the controller leaves (make ablate-balancing)."""
  c = prepare(load_config(plan.speed_bar), prec)
  lines = [f'## Router controllers on the speed bar: {plan.speed_bar} '
           f'({describe(c.model, c.train.batch_size, c.train.seq_len)})', '',
           f'Dropless dispatch on batches of {c.data.dir}, from a fresh init: "early" = the {warmup} steps '
           f'after the first, "steady" = the {steps} after them. The config\'s own controller is '
           f'{c.model.router.balancer!r}.', '',
           '| routed experts | controller | steady tokens/s | steady MaxVio | early tokens/s | early MaxVio |',
           '|---|---|---|---|---|---|']
  for E in plan.speed_bar_experts:
    for balancer in CONTROLLERS:
      c = prepare(load_config(plan.speed_bar), prec)
      c.model.num_experts, c.model.dispatch, c.model.router.balancer = E, 'dropless', balancer
      r = run_steps(c, steps, warmup, False)
      e = r['early'] or r
      lines.append(f'| {E} | {balancer} | {r["tokens_per_sec"]:,.0f} | {r["maxvio"]:.2f} | '
                   f'{e["tokens_per_sec"]:,.0f} | {e["maxvio"]:.2f} |')
      rows.append({'section': 'controllers', 'experts': E, 'dispatch': 'dropless', 'balancer': balancer,
                   'force_balance': False, 'tokens_per_s': r['tokens_per_sec'], 'maxvio': r['maxvio'],
                   'early_tokens_per_s': e['tokens_per_sec'], 'early_maxvio': e['maxvio']})
      print(lines[-1], flush=True)
  return lines


def section_scaling(plan: Plan, prec: str) -> list:
  """Step time of the default config against sequence length (tokens per batch fixed) and depth."""
  base = prepare(load_config(plan.default), prec)
  B, S, L = base.train.batch_size, base.train.seq_len, base.model.num_layers
  tokens = B * S
  results = {}

  def measure(seq_len, layers):
    if (seq_len, layers) not in results:
      c = prepare(load_config(plan.default), prec)
      c.train.seq_len, c.train.batch_size, c.model.num_layers = seq_len, tokens // seq_len, layers
      r = run_steps(c, plan.scaling_steps, plan.scaling_warmup)
      r['flops'] = flops.train_flops_per_token(ModelConfig.from_config(c.model), seq_len) * tokens
      results[seq_len, layers] = r
    return results[seq_len, layers]

  lines = [f'## Step-time scaling: {plan.default}', '',
           f'The trainer\'s step at a fixed {tokens:,} tokens per batch (batch x seq_len), mean of '
           f'{plan.scaling_steps} steps after {plan.scaling_warmup} past the first (the same count for '
           f'every row, from a fresh init). "FLOP ratio" is the ratio the model FLOPs predict '
           f'(moejax/flops.py: attention grows with seq_len); a step ratio above it is overhead that '
           f'grows faster than the FLOPs.', '',
           '| seq_len | batch | layers | step (ms) | step ratio | FLOP ratio | MFU | MaxVio |',
           '|---|---|---|---|---|---|---|---|']
  ref = measure(S, L)
  rows = [(s, L) for s in plan.seq_lens] + [(S, l) for l in plan.layers if l != L]
  for seq_len, layers in rows:
    r = measure(seq_len, layers)
    lines.append(f'| {seq_len} | {tokens // seq_len} | {layers} | {r["step_ms"]:.0f} | '
                 f'{r["step_ms"] / ref["step_ms"]:.2f} | {r["flops"] / ref["flops"]:.2f} | {r["mfu"]:.1%} | '
                 f'{r.get("maxvio", 0.0):.2f} |')
    print(lines[-1], flush=True)
  return lines


def section_compile(plan: Plan, prec: str) -> list:
  lines = [f'## Compile time of the train step ({plan.default}, layers scanned)', '',
           '| layers | compile (s) |', '|---|---|']
  for L in plan.compile_layers:
    lines.append(f'| {L} | {compile_seconds(prepare(load_config(plan.default), prec), L):.1f} |')
    print(lines[-1], flush=True)
  return lines


def section_moe_ratio(plan: Plan, prec: str, quick: bool, balances: tuple, rows: list) -> list:
  c = prepare(load_config(plan.speed_bar), prec)
  m, t = c.model, c.train
  lines = ['## MoE layer cost over a dense MLP with the same active FLOPs', '',
           f'Forward + backward of one MoE layer ({plan.speed_bar}: router, top-{m.top_k} routed + '
           f'{m.num_shared_experts} shared expert(s) of FFN {m.expert_ffn_dim}, d_model {m.d_model}, '
           f'{t.batch_size * t.seq_len:,} tokens, freshly initialised router, {m.precision}) over a dense '
           f'SwiGLU of FFN {m.top_k + m.num_shared_experts} x {m.expert_ffn_dim} on the same tokens. '
           f'top_k stays {m.top_k} as the routed experts grow, so active FLOPs stay equal. The floor, '
           'measured in the same run: the same expert einsums on rows already sorted by expert and '
           'perfectly balanced ([E, T*K/E, D], one batched einsum per projection) plus the shared '
           'expert, with no router, sort, gather or combine; "floor ratio" = floor / dense, and '
           '"ratio / floor" is what routing and dispatch cost over it. Each time is the best of 3 '
           'rounds that time the three in turn. Router "forced balance": model.router.force_balance.', '',
           '| routed experts | router | dispatch | MoE layer (ms) | dense MLP (ms) | floor (ms) | ratio '
           '| floor ratio | ratio / floor | MaxVio of the batch |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for E in plan.moe_experts:
    for force_balance in balances:
      r = moe_layer_ratio(prepare(load_config(plan.speed_bar), prec), E, force_balance,
                          repeats=2 if quick else 10)
      lines.append(f'| {E} | {router_label(force_balance)} | {r["dispatch"]} | {r["moe_ms"]:.1f} | '
                   f'{r["dense_ms"]:.1f} | {r["floor_ms"]:.1f} | {r["ratio"]:.2f} | {r["floor_ratio"]:.2f} | '
                   f'{r["ratio"] / r["floor_ratio"]:.2f} | {r["maxvio"]:.2f} |')
      rows.append({'section': 'moe_ratio', 'experts': E, 'force_balance': force_balance, **r})
      print(lines[-1], flush=True)
  return lines


def shape_1b(flag: str, quick: bool, config) -> tuple:
  if quick:
    return config.train.batch_size, config.train.seq_len
  if flag == 'auto':
    return (1, 512) if platform_name() == 'cpu' else (4, 4096)
  b, s = flag.lower().split('x')
  return int(b), int(s)


def section_mfu_1b(plan: Plan, prec: str, quick: bool, steps: int, shape: str) -> list:
  """The 1B-class config's train step on one device, with plain SGD in place of AdamW."""
  c = prepare(load_config(plan.big), prec)
  c.train.batch_size, c.train.seq_len = shape_1b(shape, quick, c)
  c.optim.name = 'sgd'   # stateless: the moments of AdamW would add 2 x 4 bytes per parameter
  m = c.model
  r = run_steps(c, steps, 0)
  total, active = count(model.model_specs(ModelConfig.from_config(m))), memory.active_params(m)
  dispatch = moe.resolve_dispatch(m.dispatch, platform_name(), 1, precision.fp8_mlp(m))
  xla = f'{r["xla_bytes"] / GiB:.2f}' if r['xla_bytes'] is not None else 'n/a'
  lines = [f'## MFU of a 1B-class config: {plan.big}', '',
           f'{billions(total)} parameters, {billions(active)} active ({describe(m, c.train.batch_size, c.train.seq_len)}, '
           f'remat \'{m.remat}\', dispatch \'{dispatch}\'), on one device. Timed: the trainer\'s own '
           f'step (forward, backward, router-bias update, global-norm clipping, weight decay) with '
           f'plain SGD in place of AdamW (no optimizer state; AdamW would add '
           f'{2 * total * 4 / GiB:.1f} GiB of moments), on real batches of {c.data.dir}; mean of '
           f'{steps} step(s) after one untimed step past compilation. MFU counts model FLOPs (6 x active '
           f'parameters + attention), not the forward recomputed by remat. XLA buffers = arguments + '
           f'outputs + temporaries of the compiled step (`memory_analysis()`); peak RSS = the host '
           f'process\'s high-water mark so far in this run.', '',
           '| batch x seq_len | precision | compile (s) | step (s) | tokens/s | MFU | XLA buffers (GiB) '
           '| peak RSS (GiB) |', '|---|---|---|---|---|---|---|---|',
           f'| {c.train.batch_size} x {c.train.seq_len} | {m.precision} | {r["compile_s"]:.1f} | '
           f'{r["step_ms"] / 1e3:.2f} | {r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | {xla} | '
           f'{peak_rss_bytes() / GiB:.1f} |']
  print(lines[-1], flush=True)
  return lines


def header(argv, prec: str, quick: bool, steps: int, warmup: int, synthetic: bool) -> list:
  d = jax.devices()[0]
  rule = ("each config's own policy" if prec == 'config' else prec if prec != 'auto' else
          'fp32 on CPU (its peak below is float32), bf16 (or the config\'s fp8) elsewhere')
  peak_kind = 'an estimate for CPUs' if d.platform == 'cpu' else "the vendor's dense bf16 figure"
  lines = [
      '# Performance', '',
      f'Made by `{provenance.command("moejax.tools.bench", argv)}` (`make bench` runs it with '
      f'--out=docs/perf.md) at commit `{provenance.commit()}` on {datetime.date.today()}, on one {d.platform.upper()} device '
      f'(`{d.device_kind}`, {jax.device_count()} on the host) of a {platform.processor() or platform.machine()} '
      f'host with {os.cpu_count()} cores, jax {jax.__version__}. Precision: {rule}. '
      f'Throughput: the trainer\'s own jitted step (AdamW, bias balancing on) on '
      f'{"one fixed random batch repeated (--synthetic)" if synthetic else "real batches of the Shakespeare corpus"}; "steady" = {steps} steps after the first {warmup} steps past the first '
      f'step, "early" = those {warmup} steps (the router still settles from its init, so dropless '
      f'dispatch pays for the imbalance). MaxVio = mean over the steps of the max over layers of '
      f'(max - mean)/mean expert load. MFU uses active-parameter FLOPs and a peak of '
      f'{flops.peak_flops_per_device() / 1e9:,.0f} GFLOP/s per device (moejax/flops.py: {peak_kind}).', '']
  if quick:
    lines += [f'**Quick mode**: every section runs {SMOKE} shapes with {steps} step(s); this file checks '
              'that the report builds and holds no figures to quote.', '']
  return lines + PROFILE_HOWTO


PROFILE_HOWTO = [
    '## Reading a profile', '',
    'To see where a step\'s time goes, train with `--config.train.profile_steps=A,B`: the trainer '
    'writes a jax.profiler trace of steps A to B into `WORKDIR/profile/plugins/profile/<run>/` '
    '(`*.xplane.pb`). Open it with `xprof --logdir=WORKDIR/profile` or `tensorboard '
    '--logdir=WORKDIR/profile` (Profile tab, tensorboard-plugin-profile). In the trace viewer each '
    'step is one `jit_train_step` execution; on CPU the XLA ops run on the host thread rows, on GPU / '
    'TPU on the device rows. The op profile (or "HLO op stats") ranks the compiled ops by self time: '
    'a `fusion` is a group XLA fused, named after its root op, and `dot` / `convolution` / '
    'custom-call GEMMs are the matmuls that carry the FLOPs. Time in gathers, scatters, sorts, '
    '`dynamic-update-slice` and copies is the MoE dispatch\'s overhead (permute and unpermute); time '
    'between steps with no op running is the host (data, Python). Take A past the first step so '
    'compilation is not in the window.', '']


def define_flags():
  """The CLI (defined only when run as a program, so the module imports beside other tools)."""
  flags.DEFINE_string('out', 'docs/perf.md', 'Markdown report to write (rewritten after each section, '
                      'holding only the sections run).')
  flags.DEFINE_list('sections', list(DEFAULT_SECTIONS), f'Sections to run, in this order: {SECTIONS}.')
  flags.DEFINE_bool('quick', False, 'Smoke-model shapes and a few steps in every section.')
  flags.DEFINE_integer('steps', 10, 'Timed steps per throughput figure.')
  flags.DEFINE_integer('warmup', 40, 'Steps after the first timed separately (the router settles).')
  flags.DEFINE_string(
      'precision', 'auto', "Policy for every config: 'auto' = fp32 on CPU (the peak in moejax/flops.py "
      "is float32), elsewhere the config's own policy with fp32 raised to bf16; 'config' = each "
      "config's own; or fp32 / bf16 / fp8.")
  flags.DEFINE_string('shape_1b', 'auto', "batch x seq_len of the 1B-class step: 'auto' = 1x512 on CPU, "
                      "4x4096 elsewhere; or e.g. 2x1024.")
  flags.DEFINE_integer('steps_1b', 2, 'Timed steps of the 1B-class config (after one untimed).')
  flags.DEFINE_bool('synthetic', False, 'Throughput on one fixed random batch repeated (as the MaxText '
                    'peer times it) instead of Shakespeare batches.')
  flags.DEFINE_bool('force_balance', False, 'Add rows with the router\'s choice replaced by a balanced '
                    'assignment (model.router.force_balance) beside the real-router rows, in the '
                    'throughput and MoE-ratio sections.')


def main(argv):
  del argv   # the flags; the report quotes sys.argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  sections = [s.strip() for s in f.sections if s.strip()]
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    raise app.UsageError(f'--sections: unknown {unknown}; choose from {SECTIONS}')
  quick, prec = f.quick, f.precision
  plan = QUICK if quick else FULL
  steps, warmup = (2, 1) if quick else (f.steps, f.warmup)
  steps_1b = 1 if quick else f.steps_1b
  balances = (False, True) if f.force_balance else (False,)
  rows = []
  run = {
      'throughput': lambda: section_throughput(plan, steps, warmup, prec, balances, f.synthetic, rows),
      'controllers': lambda: section_controllers(plan, steps, warmup, prec, rows),
      'scaling': lambda: section_scaling(plan, prec),
      'compile': lambda: section_compile(plan, prec),
      'moe_ratio': lambda: section_moe_ratio(plan, prec, quick, balances, rows),
      'mfu_1b': lambda: section_mfu_1b(plan, prec, quick, steps_1b, f.shape_1b),
      'memory': lambda: memory.report().rstrip('\n').split('\n'),
  }
  lines = header(sys.argv[1:], prec, quick, steps, warmup, f.synthetic)
  for name in SECTIONS:
    if name not in sections:
      continue
    start = time.perf_counter()
    lines += run[name]() + ['']
    print(f'[{name}: {time.perf_counter() - start:.0f} s]', flush=True)
    write_report(f.out, lines, rows)   # after every section: a late failure keeps the rest
  print(f'wrote {f.out} and {json_path(f.out)}')


def json_path(out: str) -> str:
  return os.path.splitext(out)[0] + '.json'


def write_report(out: str, lines: list, rows: list):
  with open(out, 'w') as f:
    f.write('\n'.join(lines))
  with open(json_path(out), 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
