"""`python -m moejax.tools.bench --quick`: the report builds, every section's table has numeric cells."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from moejax import model
from moejax.configs import base_config
from moejax.params import init_params
from moejax.tools import bench, moe_ratio

ROOT = Path(__file__).resolve().parents[1]
# The heading each section starts its table(s) under.
HEADINGS = {
    'throughput': ('## Speed bar', '## experiments/smoke.py (the `make train` model'),
    'controllers': ('## Router controllers on the speed bar',),
    'scaling': ('## Step-time scaling',),
    'compile': ('## Compile time of the train step',),
    'moe_ratio': ('## MoE layer cost over a dense MLP',),
    'mfu_1b': ('## MFU of a 1B-class config',),
    'memory': ('## Memory per device',),
}
# Columns that hold words; every other cell must be a finite number (commas, %, 'x' between two).
TEXT_COLUMNS = {'dispatch', 'router', 'controller', 'precision', 'config', 'params total / active', 'mesh', 'remat'}
NUMBER = re.compile(r'-?[\d,]*\.?\d+%?( x -?[\d,]*\.?\d+)?')


def run_quick(tmp_path, sections, *flags) -> str:
  out = tmp_path / 'perf.md'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device, as `make bench`
  env['JAX_PLATFORMS'] = 'cpu'
  r = subprocess.run([sys.executable, '-m', 'moejax.tools.bench', '--quick', f'--sections={",".join(sections)}',
                      f'--out={out}', *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return out.read_text()


def table_after(text: str, heading: str) -> list[dict]:
  """The rows (header -> cell) of the first table after the line starting with `heading`."""
  lines = text.split('\n')
  start = next(i for i, l in enumerate(lines) if l.startswith(heading))
  i = next(i for i in range(start + 1, len(lines)) if lines[i].startswith('|'))
  cells = lambda l: [c.strip() for c in l.strip().strip('|').split('|')]
  names, rows = cells(lines[i]), []
  assert set(lines[i + 1]) <= set('|-'), lines[i + 1]
  for l in lines[i + 2:]:
    if not l.startswith('|'):
      break
    rows.append(dict(zip(names, cells(l), strict=True)))
  return rows


def check_report(text: str, sections):
  assert re.search(r'at commit `[0-9a-f]{7,}', text) and 'device (`' in text, text[:600]
  for name, headings in HEADINGS.items():
    for h in headings:
      if name not in sections:
        assert h not in text
        continue
      rows = table_after(text, h)
      assert rows, f'{h}: empty table'
      for row in rows:
        for col, cell in row.items():
          if col in TEXT_COLUMNS:
            assert cell, (h, col)
            continue
          assert NUMBER.fullmatch(cell), (h, col, cell)
          assert all(math.isfinite(float(v.replace(',', '').rstrip('%'))) for v in cell.split(' x '))


@pytest.mark.slow   # ~72 s; test_bench_data / test_eval cover the report plumbing in the fast suite
def test_quick_report_fast_sections(tmp_path):
  """The sections with the fewest compiles (the 1B section runs the trainer's step, as the
  throughput and scaling sections do)."""
  sections = ('compile', 'moe_ratio', 'mfu_1b', 'memory')
  text = run_quick(tmp_path, sections, '--force_balance')
  check_report(text, sections)
  table = table_after(text, HEADINGS['moe_ratio'][0])
  assert [(int(r['routed experts']), r['router']) for r in table] == [
      (E, router) for E in (8, 64, 256) for router in ('real', 'forced balance')]
  assert list(bench.QUICK.moe_experts) == [8, 64, 256]
  rows = json.loads((tmp_path / 'perf.json').read_text())
  assert [(r['section'], r['experts'], r['force_balance']) for r in rows] == [
      ('moe_ratio', E, fb) for E in (8, 64, 256) for fb in (False, True)]
  assert all(r['ratio'] > 0 and r['floor_ratio'] > 0 and math.isfinite(r['ratio'] / r['floor_ratio']) for r in rows)
  assert all(float(r['MaxVio of the batch']) == 0 for r in table if r['router'] == 'forced balance')
  assert table_after(text, HEADINGS['mfu_1b'][0])[0]['precision'] == 'fp32'


@pytest.mark.slow
def test_quick_report_all_sections(tmp_path):
  text = run_quick(tmp_path, bench.SECTIONS)
  check_report(text, bench.SECTIONS)
  scaling = table_after(text, HEADINGS['scaling'][0])
  tokens = {int(r['seq_len']) * int(r['batch']) for r in scaling}
  assert len(tokens) == 1, 'the seq_len sweep keeps the tokens per batch'
  assert {int(r['seq_len']) for r in scaling} == set(bench.QUICK.seq_lens)
  assert {int(r['layers']) for r in scaling} == set(bench.QUICK.layers)


def test_resolve_precision():
  assert bench.resolve_precision('auto', 'bf16', 'cpu') == 'fp32'
  assert bench.resolve_precision('auto', 'fp32', 'gpu') == 'bf16'
  assert bench.resolve_precision('auto', 'fp8', 'tpu') == 'fp8'
  assert bench.resolve_precision('config', 'bf16', 'cpu') == 'bf16'
  assert bench.resolve_precision('fp8', 'fp32', 'cpu') == 'fp8'


def test_balanced_rows_give_every_expert_the_same_rows_and_every_token_top_k_times():
  x_TD = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)
  x_ECD = moe_ratio.balanced_rows(x_TD, top_k=2, num_experts=4)
  assert x_ECD.shape == (4, 6, 3)
  tokens, counts = np.unique(np.asarray(x_ECD[..., 0]) // 3, return_counts=True)
  assert list(tokens) == list(range(12)) and set(counts) == {2}


def test_floor_loss_equals_a_per_expert_loop_of_the_expert_swiglus_plus_the_shared_expert():
  m = tiny_model_config(num_experts=4, top_k=2, num_shared_experts=1)
  p = {k: v for k, v in init_params(model.moe_specs(m), jax.random.key(1)).items() if k != 'router'}
  x_BTD = jax.random.normal(jax.random.key(2), (2, 8, m.d_model))
  x_ECD = moe_ratio.balanced_rows(x_BTD.reshape(16, -1), m.top_k, m.num_experts)

  def ref(p, x_ECD, x_BTD):
    swiglu = lambda x, g, u, d: (jax.nn.silu(x @ g) * (x @ u)) @ d
    total = sum(jnp.sum(swiglu(x_ECD[e], p['w_gate'][e], p['w_up'][e], p['w_down'][e]) ** 2)
                for e in range(m.num_experts))
    s = p['shared']
    return total + jnp.sum(swiglu(x_BTD, s['w_gate'], s['w_up'], s['w_down']) ** 2)

  np.testing.assert_allclose(moe_ratio.floor_loss(p, x_ECD, x_BTD, m), ref(p, x_ECD, x_BTD), rtol=1e-5)
  got = jax.grad(moe_ratio.floor_loss, (0, 1))(p, x_ECD, x_BTD, m)
  want = jax.grad(ref, (0, 1))(p, x_ECD, x_BTD)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_synthetic_batch_is_fixed_uniform_tokens_in_one_document():
  c = base_config()
  c.train.batch_size, c.train.seq_len, c.model.vocab_size = 4, 16, 50
  a, b = bench.synthetic_batch(c), bench.synthetic_batch(c)
  assert a['inputs'].shape == (4, 16) and np.array_equal(a['inputs'], b['inputs'])
  assert np.array_equal(a['inputs'][:, 1:], a['targets'][:, :-1])
  assert a['inputs'].min() >= 1 and a['targets'].max() < 50 and len(np.unique(a['inputs'])) > 20
  assert (a['segment_ids'] == 1).all() and (a['positions'][0] == np.arange(16)).all()
  assert len(bench.bench_batches(c, 3, synthetic=True)) == 3


def test_report_writes_the_rows_as_json_beside_the_markdown(tmp_path):
  rows = [{'section': 'moe_ratio', 'experts': 8, 'force_balance': True, 'ratio': 1.5, 'floor_ratio': 1.2}]
  bench.write_report(str(tmp_path / 'x.md'), ['# T', '| a |'], rows)
  assert (tmp_path / 'x.md').read_text() == '# T\n| a |'
  assert json.loads((tmp_path / 'x.json').read_text()) == rows
