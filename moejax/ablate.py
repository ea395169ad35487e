"""Runs the variants of an ablation experiment and writes a results table with plots.

    python -m moejax.ablate --experiment=experiments/ablate_balancing.py --out=results/balancing.md

The experiment file has `get_config()` and `VARIANTS` (name -> command-line overrides); each variant
trains with `python -m moejax.train` in `<runs>/<slug>` (resuming if already there), then the table
is filled from each run's metrics.jsonl.
"""
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from absl import app, flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.tools import report  # noqa: E402

_EXPERIMENT = flags.DEFINE_string('experiment', None, 'Experiment file with VARIANTS.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Markdown table to write (plots go beside it).', required=True)
_RUNS = flags.DEFINE_string('runs', 'runs/ablate', 'Where the variants train.')


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def summarize(workdir: str) -> dict:
  records = report.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in records if 'lm_loss' in r]
  evals = [r for r in records if 'eval/loss' in r]
  tail = train[len(train) * 3 // 4:]   # the last quarter of the run
  mean = lambda k: float(np.mean([r[k] for r in tail if k in r])) if any(k in r for r in tail) else float('nan')
  return {'eval_loss': evals[-1]['eval/loss'], 'maxvio_global': mean('moe/maxvio_global'),
          'dead_experts': train[-1].get('moe/dead_experts', 0),
          'active_experts_per_token': mean('moe/active_experts_per_token'),
          'tokens_per_sec': float(np.median([r['tokens_per_sec'] for r in train[1:]])),
          'train': train, 'evals': evals}


def main(argv):
  del argv
  spec = importlib.util.spec_from_file_location('experiment', _EXPERIMENT.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out_dir = os.path.dirname(_OUT.value) or '.'
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(_OUT.value))[0]
  results = {}
  for name, overrides in module.VARIANTS.items():
    workdir = os.path.join(_RUNS.value, slug(name))
    cmd = [sys.executable, '-m', 'moejax.train', f'--config={_EXPERIMENT.value}', f'--workdir={workdir}', *overrides]
    print(f'== {name}: {" ".join(cmd[2:])}', flush=True)
    subprocess.run(cmd, check=True)
    report.report(workdir)
    shutil.copy(os.path.join(workdir, 'report', 'expert_load.png'),
                os.path.join(out_dir, f'{stem}_{slug(name)}_load.png'))
    results[name] = summarize(workdir)

  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
  for name, r in results.items():
    a.plot([x['step'] for x in r['evals']], [x['eval/loss'] for x in r['evals']], 'o-', label=name)
    b.plot([x['step'] for x in r['train']], [x.get('moe/maxvio_global', np.nan) for x in r['train']], label=name)
  a.set(xlabel='step', ylabel='held-out loss')
  b.set(xlabel='step', ylabel='global MaxVio (log window)', yscale='log')
  a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f'{stem}.png'), dpi=100)
  plt.close(fig)

  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
  lines = [f'# Ablation: {stem}', '',
           f'Made by `python -m moejax.ablate --experiment={_EXPERIMENT.value} --out={_OUT.value}` at commit '
           f'`{commit}` on {datetime.date.today()} (CPU). Each variant trains `{_EXPERIMENT.value}` with the '
           'overrides shown. MaxVio and real experts per token: mean over the last quarter of the run '
           '(MaxVio per log window of 10 steps); dead experts: experts with no token in the last window; '
           'tokens/s: median over log windows.', '',
           '| variant | overrides | held-out loss | global MaxVio | dead experts | real experts / token | tokens/s |',
           '|---|---|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f'| {name} | `{" ".join(module.VARIANTS[name]) or "(defaults)"}` | {r["eval_loss"]:.3f} | '
                 f'{r["maxvio_global"]:.3f} | {r["dead_experts"]} | {r["active_experts_per_token"]:.2f} | '
                 f'{r["tokens_per_sec"]:,.0f} |')
  lines += ['', f'![held-out loss and MaxVio]({stem}.png)', '']
  lines += [f'![{name}: expert load]({stem}_{slug(name)}_load.png)' for name in results]
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines[:len(results) + 8]))
  json.dump({k: {kk: vv for kk, vv in v.items() if kk not in ('train', 'evals')} for k, v in results.items()},
            open(os.path.join(_RUNS.value, f'{stem}.json'), 'w'), indent=1)


if __name__ == '__main__':
  app.run(main)
