"""`python -m moejax.tools.study`: a misspelt key fails before anything trains, and a two-variant
study on the smoke model writes its table, stamped with the command and the commit."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUDY = '''
from experiments import smoke
from experiments.studies import apply

ABOUT = 'Two learning rates on the smoke model.'


def lr(value):
  def edit(c):
    c.optim.lr = value
  return edit


def misspelt(c):
  c.optim.lr = 1e-2
  c.model.num_expert = 4


VARIANTS = {'lr 3e-3': lr(3e-3), 'lr 1e-2': lr(1e-2)}
if TYPO:
  VARIANTS['misspelt'] = misspelt


def get_config(variant=None):
  c = smoke.get_config()
  c.model.num_layers = 2   # 1 dense + 1 MoE: compiles faster
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 2, 4, 1
  c.mesh.data = 1
  return apply(c, VARIANTS, variant)
'''


def run_study(tmp_path, typo: bool, *flags):
  study = tmp_path / 'tiny.py'
  study.write_text(f'TYPO = {typo}\n' + STUDY)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device, as the make targets
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [sys.executable, '-m', 'moejax.tools.study', f'--study={study}', f'--out={tmp_path / "out" / "tiny.md"}',
         f'--runs={tmp_path / "runs"}', *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_misspelt_key_fails_before_any_run_with_one_line(tmp_path):
  r = run_study(tmp_path, True)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('error: ') and "variant 'misspelt'" in lines[0], lines[0]
  assert '"num_expert"' in lines[0] and 'Did you mean "num_experts"' in lines[0], lines[0]
  assert 'Traceback' not in r.stderr + r.stdout
  assert not (tmp_path / 'runs').exists() and not (tmp_path / 'out').exists()   # nothing trained


@pytest.mark.slow
def test_two_variant_study_writes_table_with_command_and_commit(tmp_path):
  r = run_study(tmp_path, False, '--steps=3', '--jobs=2')   # the two runs at once
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  text = (tmp_path / 'out' / 'tiny.md').read_text()
  assert text.startswith('# Study: tiny\n\nTwo learning rates on the smoke model.'), text[:300]
  assert f'Made by `python -m moejax.tools.study --study={tmp_path / "tiny.py"} ' in text, text[:800]
  assert re.search(r'at commit `[0-9a-f]{7,}', text), text[:800]
  assert '--config.train.steps=3`' in text   # what --steps added to each training command
  rows = {l.split(' | ')[0].lstrip('| '): l.strip('|').split(' | ') for l in text.splitlines()
          if l.startswith('| lr ')}
  assert list(rows) == ['lr 3e-3', 'lr 1e-2'], text
  assert rows['lr 3e-3'][1].strip() == '(base)' and rows['lr 1e-2'][1].strip() == '`optim.lr=0.01`'
  for cells in rows.values():
    assert 0 < float(cells[2]) < 10, cells   # held-out loss at the last step
  assert (tmp_path / 'out' / 'tiny.png').read_bytes()[:4] == b'\x89PNG'
  for slug in ('lr_3e_3', 'lr_1e_2'):
    assert (tmp_path / 'runs' / slug / 'metrics.jsonl').exists()

  again = run_study(tmp_path, False, '--steps=3')   # finished runs with the same config are read back
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('(finished earlier, read back)') == 2, again.stdout[-2000:]
  assert '== lr' not in again.stdout
