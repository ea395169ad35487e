"""The accelerator check: `python -m moejax.tools.device_check [--quick] --out=FILE.md`.

One script for a GPU or TPU host (under 8 minutes on one device), in three parts:
  1. Platform tests: every expert dispatch (moejax.moe.DISPATCHES), grouped matmul
     (moejax.grouped_matmul) and fused attention implementation (moejax.attention.fused) against an
     XLA reference, forward and gradient, largest error over the reference's largest value. On an
     accelerator they run in bfloat16 (the kernels' dtype; the reference is float32 on the same
     rounded inputs), on CPU in float32.
  2. fp8: the compiled HLO of the fp8 einsum and the fp8 grouped matmul (forward + backward): how
     many of their GEMMs take float8 operands (the backend's fp8 GEMMs) rather than upcast ones.
  3. Throughput and MFU of the trainer's own step on one fixed random batch at (a) the peer shape
     (experiments/bench.py), (b) a Qwen3-30B-A3B layer shape at reduced depth, (c)
     experiments/moe_1b.py; each in bf16 and fp8, with the real router and with forced balance.
`--quick` runs parts 1-2 on tiny shapes and part 3 on experiments/smoke.py (bf16 with the real
router, fp8 with forced balance) with a few steps: on CPU in minutes, a check that the script and
its report work, not figures to quote. Exits 1 when a platform test fails.
"""
import dataclasses
import datetime
import os
import re
import sys
import time
from types import SimpleNamespace

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from moejax import flops, grouped_matmul as gm, moe, precision, sharding
from moejax.attention import ATTENTIONS, fused
from moejax.configs import base_config
from moejax.model_config import ModelConfig
from moejax.params import init_params
from moejax.tools import bench, provenance

PEER, MOE_1B = 'experiments/bench.py', 'experiments/moe_1b.py'
QWEN3 = 'Qwen3-30B-A3B layers'
TOL = {'float32': 1e-4, 'bfloat16': 3e-2}   # largest error / the reference's largest |value|


@dataclasses.dataclass(frozen=True)
class Plan:
  dispatch_shape: tuple        # T tokens, D, E experts, K, F
  attention_shape: tuple       # B, T, d_model
  shapes: tuple                # names of the throughput shapes
  steps: int
  warmup: int
  quick: bool = False
  # (precision, model.router.force_balance) of each throughput row per shape
  runs: tuple = (('bf16', False), ('bf16', True), ('fp8', False), ('fp8', True))


FULL = Plan((512, 256, 16, 2, 128), (2, 256, 256), (PEER, QWEN3, MOE_1B), steps=5, warmup=2)
# each precision and router once: every compile of the trainer's step takes a minute on 2 CPU cores
QUICK = Plan((64, 32, 8, 2, 16), (2, 16, 64), (bench.SMOKE,), steps=2, warmup=1, quick=True,
             runs=(('bf16', False), ('fp8', True)))


def compute_dtype():
  return jnp.float32 if jax.devices()[0].platform == 'cpu' else jnp.bfloat16


def rel_error(got, want) -> float:
  """Largest |got - want| over the leaves, relative to the largest |want|."""
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in zip(got, want))
  return err / max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for w in want)


def compare(name: str, impls: dict, ref, args, cotangent, mask=None) -> list:
  """One row per implementation in `impls` (name -> fn): its forward and gradient (of
  sum(y * cotangent), w.r.t. every float argument) against ref's. The implementations run on args
  in the compute dtype, ref (once) in float32 on the same rounded values."""
  dtype = compute_dtype()
  low = [a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
  high = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in low]
  floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  tol = TOL[jnp.dtype(dtype).name]

  def grads(f, a):
    def loss(*a):
      y = f(*a)
      y = y if mask is None else jnp.where(mask, y, 0)
      return jnp.sum(y.astype(jnp.float32) * cotangent), y
    with jax.default_matmul_precision('highest'):
      return jax.jit(jax.grad(loss, floats, has_aux=True))(*a)

  g_ref, y_ref = grads(ref, high)
  rows = []
  for impl, fn in impls.items():
    g, y = grads(fn, low)
    fwd, grad = rel_error(y, y_ref), rel_error(g, g_ref)
    rows.append({'test': name, 'implementation': impl, 'dtype': jnp.dtype(dtype).name, 'fwd': fwd,
                 'grad': grad, 'tol': tol, 'ok': fwd <= tol and grad <= tol})
  return rows


# --- part 1: platform tests ---

def dense_moe_reference(x_TD, weight_TK, wg_EDF, wu_EDF, wd_EFD, expert_TK):
  """Every expert on every token (plain XLA einsums), combined with the routing's weights."""
  combine_TE = jnp.einsum('tke,tk->te', jax.nn.one_hot(expert_TK, wg_EDF.shape[0], dtype=x_TD.dtype), weight_TK)
  h_TEF = jax.nn.silu(jnp.einsum('td,edf->tef', x_TD, wg_EDF)) * jnp.einsum('td,edf->tef', x_TD, wu_EDF)
  return jnp.einsum('tef,efd,te->td', h_TEF, wd_EFD, combine_TE)


def dispatch_tests(shape) -> list:
  """Each dispatch on a 1-device mesh against dense_moe_reference; the capacity dispatches with a
  capacity factor of E, so they hold every assignment and drop none."""
  T, D, E, K, F = shape
  ks = jax.random.split(jax.random.key(0), 6)
  top_TK, expert_TK = jax.lax.top_k(jax.random.normal(ks[0], (T, E)), K)   # unbalanced, as a router
  args = (jax.random.normal(ks[1], (T, D)), jax.nn.softmax(top_TK, -1), 0.2 * jax.random.normal(ks[2], (E, D, F)),
          0.2 * jax.random.normal(ks[3], (E, D, F)), 0.2 * jax.random.normal(ks[4], (E, F, D)), expert_TK)
  cot = jax.random.normal(ks[5], (T, D))
  mesh = sharding.make_mesh({'data': 1, 'expert': 1}, jax.devices()[:1])

  def dispatch(name):
    cfg = moe.DispatchConfig(name=name, capacity_factor=float(E), num_experts=E)
    return lambda x, w, wg, wu, wd, e: moe.routed_experts(
        x, SimpleNamespace(expert_TK=e, weight_TK=w), wg, wu, wd, cfg, mesh, ())[0]
  return compare('MoE dispatch', {name: dispatch(name) for name in moe.DISPATCHES}, dense_moe_reference,
                 args, cot)


def grouped_reference(x_RD, w_LDF, group_sizes_L):
  """y[r] = x[r] @ w[group of r], from each row's own weight copy; zeros past the groups."""
  R, L = x_RD.shape[0], w_LDF.shape[0]
  group_R = jnp.searchsorted(jnp.cumsum(group_sizes_L), jnp.arange(R), side='right')
  y_RF = jnp.einsum('rd,rdf->rf', x_RD, w_LDF[jnp.minimum(group_R, L - 1)])
  return jnp.where((group_R < L)[:, None], y_RF, 0)


def grouped_matmul_tests(shape) -> list:
  T, D, E, K, F = shape
  R = T * K
  sizes = np.zeros(E, np.int32)
  sizes[::2] = R // E * 2 - 1          # every other group empty, E/2 rows past the groups
  ks = jax.random.split(jax.random.key(1), 3)
  args = (jax.random.normal(ks[0], (R, D)), jax.random.normal(ks[1], (E, D, F)), jnp.asarray(sizes))
  mask = (jnp.arange(R) < sizes.sum())[:, None]
  cot = jax.random.normal(ks[2], (R, F))

  def in_groups(mm):   # rows past the groups are unspecified, in y and in dx: callers mask both
    return lambda x, w, g: mm(jnp.where(mask, x, 0), w, g)
  impls = {name: in_groups(gm.grouped_matmul(name)) for name in gm.IMPLEMENTATIONS}
  return compare('grouped matmul', impls, in_groups(grouped_reference), args, cot, mask)


ATTENTION_CASES = (('gqa', {}), ('swa', {'window': 8}), ('mla', {}))


def attention_tests(shape) -> list:
  """Each fused implementation against the 'xla' path, causal with two documents per row."""
  B, T, D = shape
  segments_BT = jnp.asarray(np.repeat([[1] * (T // 2) + [2] * (T - T // 2)], B, 0), jnp.int32)
  rows = []
  for name, attn in ATTENTION_CASES:
    c = base_config().model
    c.attention, c.d_model, c.init_std = name, D, 0.3
    c.attn.update(num_heads=4, num_kv_heads=2, head_dim=D // 4, **attn)
    a = ModelConfig.from_config(c).attn
    p = init_params(ATTENTIONS[name].specs(a), jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    cot = jax.random.normal(jax.random.key(4), (B, T, D))
    leaves, tree = jax.tree.flatten(p)

    def run(impl):
      cfg = dataclasses.replace(a, implementation=impl)
      return lambda x, *w: ATTENTIONS[name].apply(jax.tree.unflatten(tree, w), x, cfg, segments_BT)[0]
    rows += compare(f'{name} attention', {impl: run(impl) for impl in fused.FUSED}, run('xla'), (x, *leaves), cot)
  return rows


# --- part 2: fp8 in the compiled HLO ---

INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([\w-]+)\(([^)]*)\)(.*)$')
GEMM_OPS = ('dot', 'ragged-dot', 'convolution', 'custom-call')
FLOAT8 = re.compile(r'^\(?f8e(4m3|5m2)')


def gemms(hlo: str) -> list:
  """(op, its operands' types) of each matmul instruction of an HLO module's text: dot, ragged-dot,
  convolution, and custom calls whose target names a matmul / GEMM (e.g. cuBLASLt's fp8 GEMM).
  Compiled HLO names operands without their types, so each is looked up in its computation."""
  found, types = [], {}
  for line in hlo.splitlines():
    if line.rstrip().endswith('{'):   # a computation starts: names are local to it
      types = {}
    m = INSTRUCTION.match(line)
    if not m:
      continue
    name, type_, op, operands, rest = m.groups()
    types[name] = type_
    if op not in GEMM_OPS or (op == 'custom-call' and not re.search(r'matmul|gemm', rest, re.I)):
      continue
    names = re.findall(r'%([\w.\-]+)', operands)
    found.append((op, [types.get(n, '?') for n in names]))
  return found


def has_float8(operand_types: list) -> bool:
  return any(FLOAT8.match(t) for t in operand_types)


def fp8_ops(quick: bool) -> dict:
  """The fp8 einsum and grouped matmul, forward + backward, in bfloat16 (the fp8 policy's compute)."""
  R, D, F, L = (64, 32, 32, 4) if quick else (2048, 1024, 1024, 8)
  x, w = jnp.ones((R, D), jnp.bfloat16), jnp.ones((D, F), jnp.bfloat16)
  w_L, sizes = jnp.ones((L, D, F), jnp.bfloat16), jnp.full((L,), R // L, jnp.int32)
  einsum = lambda x, w: precision.qwix_fp8_einsum('md,df->mf', x, w)
  grouped = lambda x, w: gm.grouped_matmul('ragged_dot', fp8=True)(x, w, sizes)
  return {'fp8 einsum (qwix dot_general)': (einsum, (x, w)),
          'fp8 grouped matmul (qwix ragged_dot)': (grouped, (x, w_L))}


def fp8_expected() -> bool:
  """Whether the device has fp8 GEMMs XLA uses: CUDA compute capability >= 8.9, or a TPU v5+/v6/v7."""
  d = jax.devices()[0]
  if d.platform == 'gpu':
    return float(getattr(d, 'compute_capability', '0') or 0) >= 8.9
  return d.platform == 'tpu' and not re.search(r'v[234]', d.device_kind)


def fp8_rows(quick: bool) -> list:
  rows = []
  for name, (fn, args) in fp8_ops(quick).items():
    # squared, so the forward's output is needed and its GEMM stays in the compiled step
    step = jax.jit(jax.grad(lambda *a: jnp.square(fn(*a).astype(jnp.float32)).sum(), (0, 1)))
    found = gemms(step.lower(*args).compile().as_text())
    fp8 = [f'{op}({", ".join(t)})' for op, t in found if has_float8(t)]
    rows.append({'op': name, 'gemms': len(found), 'fp8': len(fp8), 'example': fp8[0] if fp8 else '',
                 'operands': sorted({t.split('[')[0] for _, ts in found for t in ts})})
  return rows


# --- part 3: throughput ---

def qwen3_30b_a3b(num_layers: int = 4):
  """A Qwen3-30B-A3B layer shape (d_model 2048, GQA 32/4 heads of 128 with QK-norm, 128 experts of
  FFN 768, top-8, softmax router, no shared expert, vocab 151,936) at reduced depth, 2 x 4096 tokens."""
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_dense_layers = 151936, 2048, num_layers, 0
  m.attention = 'gqa'
  m.attn.update(num_heads=32, num_kv_heads=4, head_dim=128, qk_norm=True, rope_theta=1e6)
  m.num_experts, m.top_k, m.expert_ffn_dim, m.num_shared_experts = 128, 8, 768, 0
  m.router.score = 'softmax'
  c.train.batch_size, c.train.seq_len = 2, 4096
  return c


def shape_config(name: str, prec: str, force_balance: bool):
  """The config of throughput shape `name` on one device, per-platform dispatch and attention."""
  c = qwen3_30b_a3b() if name == QWEN3 else bench.load_config(name)
  if name == MOE_1B:
    c.train.batch_size, c.train.seq_len = bench.shape_1b('auto', False, c)
  c = bench.prepare(c, prec)
  c.model.dispatch, c.model.attn.implementation = 'auto', 'auto'
  c.model.router.force_balance = force_balance
  return c


def throughput_rows(plan: Plan) -> list:
  rows = []
  for name in plan.shapes:
    for prec, force_balance in plan.runs:
      c = shape_config(name, prec, force_balance)
      m = ModelConfig.from_config(c.model)
      r = bench.run_steps(c, plan.steps, plan.warmup, synthetic=True)
      rows.append({'shape': name, 'precision': prec, 'router': bench.router_label(force_balance),
                   'dispatch': moe.resolve_dispatch('auto', bench.platform_name(), 1),
                   'attention': fused.resolve('auto', bench.platform_name(), m.attn.softcap, m.attn.sinks),
                   'tokens': f'{c.train.batch_size} x {c.train.seq_len}', **r})
      print(rows[-1]['shape'], prec, rows[-1]['router'], f'{r["tokens_per_sec"]:,.0f} tokens/s', flush=True)
  return rows


# --- the report ---

def report(argv, plan: Plan, platform_rows: list, fp8: list, throughput: list, seconds: float) -> str:
  d = jax.devices()[0]
  peak = flops.peak_flops_per_device()
  lines = ['# Accelerator check', '',
           f'Made by `{provenance.command("moejax.tools.device_check", argv)}` at commit `{provenance.commit()}` '
           f'on {datetime.date.today()}, on one {d.platform.upper()} device (`{d.device_kind}`, '
           f'{jax.device_count()} on the host), jax {jax.__version__}; {seconds:.0f} s in all.', '']
  if plan.quick:
    lines += [f'**Quick mode**: tiny shapes and {plan.steps} step(s) ({bench.SMOKE} for the throughput); '
              'a check that the script works, not figures to quote.', '']
  lines += ['## Platform tests', '',
            'Each implementation against its XLA reference (dense MoE over every expert, a per-row grouped '
            'matmul, the `xla` attention path): largest error of the forward and of the gradients (w.r.t. '
            'every input) over the reference\'s largest value.', '',
            '| test | implementation | dtype | forward error | gradient error | tolerance | result |',
            '|---|---|---|---|---|---|---|']
  lines += [f'| {r["test"]} | {r["implementation"]} | {r["dtype"]} | {r["fwd"]:.1e} | {r["grad"]:.1e} | '
            f'{r["tol"]:.0e} | {"pass" if r["ok"] else "FAIL"} |' for r in platform_rows]
  expected = fp8_expected()
  lines += ['', '## fp8 in the compiled HLO', '',
            f'Matmul instructions (dot, ragged-dot, convolution, GEMM custom calls) of the compiled forward '
            f'+ backward, and how many take float8 operands. This device '
            f'{"has" if expected else "has no"} fp8 GEMMs that XLA uses'
            f'{"" if expected else " (XLA upcasts the float8 operands before the matmul: the rounding is emulated)"}.',
            '', '| op | GEMMs | with float8 operands | operand dtypes of the GEMMs | first fp8 GEMM |',
            '|---|---|---|---|---|']
  lines += [f'| {r["op"]} | {r["gemms"]} | {r["fp8"]} | {", ".join(r["operands"])} | {r["example"] or "none"} |'
            for r in fp8]
  lines += ['', '## Throughput', '',
            f'The trainer\'s own step (AdamW) on one fixed random batch, mean of {plan.steps} steps after '
            f'{plan.warmup + 1}; MFU = model FLOPs (6 x active parameters + attention) over a peak of '
            f'{peak / 1e12:,.1f} TFLOP/s (moejax/flops.py; the bf16 figure for fp8 rows too).', '',
            '| shape | precision | router | dispatch | attention | batch x seq_len | compile (s) | step (ms) '
            '| tokens/s | TFLOP/s | MFU | MaxVio |', '|---|---|---|---|---|---|---|---|---|---|---|---|']
  lines += [f'| {r["shape"]} | {r["precision"]} | {r["router"]} | {r["dispatch"]} | {r["attention"]} | '
            f'{r["tokens"]} | {r["compile_s"]:.1f} | {r["step_ms"]:.1f} | {r["tokens_per_sec"]:,.0f} | '
            f'{r["mfu"] * peak / 1e12:.2f} | {r["mfu"]:.1%} | {r.get("maxvio", 0.0):.2f} |' for r in throughput]
  return '\n'.join(lines) + '\n'


def run(argv, plan: Plan, out: str) -> bool:
  """Runs the three parts, writes the report to `out`; True when every platform test passed."""
  start = time.perf_counter()
  platform_rows = (dispatch_tests(plan.dispatch_shape) + grouped_matmul_tests(plan.dispatch_shape)
                   + attention_tests(plan.attention_shape))
  print(f'[platform tests: {time.perf_counter() - start:.0f} s]', flush=True)
  fp8 = fp8_rows(plan.quick)
  throughput = throughput_rows(plan)
  print(f'[all parts: {time.perf_counter() - start:.0f} s]', flush=True)
  text = report(argv, plan, platform_rows, fp8, throughput, time.perf_counter() - start)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.write(text)
  failed = [f'{r["test"]} {r["implementation"]}' for r in platform_rows if not r['ok']]
  print(f'wrote {out}' + (f'; FAILED: {", ".join(failed)}' if failed else ''), flush=True)
  return not failed


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  sys.exit(0 if run(sys.argv[1:], QUICK if f.quick else FULL, f.out) else 1)


if __name__ == '__main__':
  flags.DEFINE_string('out', 'docs/perf_accelerator.md', 'Markdown report to write.')
  flags.DEFINE_bool('quick', False, 'Tiny shapes and a few steps (runs on CPU in minutes).')
  app.run(main)
