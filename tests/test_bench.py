"""`python -m moejax.tools.bench --quick`: the report builds, every section's table has numeric cells."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moejax.tools import bench

ROOT = Path(__file__).resolve().parents[1]
# The heading each section starts its table(s) under.
HEADINGS = {
    'throughput': ('## Speed bar', '## experiments/smoke.py (the `make train` model'),
    'scaling': ('## Step-time scaling',),
    'compile': ('## Compile time of the train step',),
    'moe_ratio': ('## MoE layer cost over a dense MLP',),
    'mfu_1b': ('## MFU of a 1B-class config',),
    'memory': ('## Memory per device',),
}
# Columns that hold words; every other cell must be a finite number (commas, %, 'x' between two).
TEXT_COLUMNS = {'dispatch', 'precision', 'config', 'params total / active', 'mesh', 'remat'}
NUMBER = re.compile(r'-?[\d,]*\.?\d+%?( x -?[\d,]*\.?\d+)?')


def run_quick(tmp_path, sections) -> str:
  out = tmp_path / 'perf.md'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device, as `make bench`
  env['JAX_PLATFORMS'] = 'cpu'
  r = subprocess.run([sys.executable, '-m', 'moejax.tools.bench', '--quick', f'--sections={",".join(sections)}',
                      f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
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
  text = run_quick(tmp_path, sections)
  check_report(text, sections)
  experts = [int(r['routed experts']) for r in table_after(text, HEADINGS['moe_ratio'][0])]
  assert experts == list(bench.QUICK.moe_experts) == [8, 64, 256]
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
