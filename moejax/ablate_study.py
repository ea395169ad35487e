"""Ablations: trains one config under several command-line variants and writes a table + loss curves.

  python -m moejax.ablate_study --study=optimizer --out=results/optimizer.md
  python -m moejax.ablate_study --study=precision --out=results/precision.md

Each variant is a fresh `python -m moejax.train` run (flags appended to the study's base flags) in
runs/ablate-<study>/<variant>; the table is read back from the runs' metrics.jsonl.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

MUON = ['--config.optim.groups.hidden.name=contrib.muon']
BASE = ['--config=experiments/smoke.py', '--config.train.steps=300', '--config.train.batch_size=16',
        '--config.train.seq_len=64', '--config.train.log_every=10', '--config.train.eval_every=50',
        '--config.train.eval_batches=8', '--config.optim.warmup_steps=30', '--config.optim.decay_steps=0',
        '--config.checkpoint.every=100000', '--config.mesh.data=1', '--config.mesh.expert=1']
STUDIES = {
    'optimizer': {
        'about': 'AdamW everywhere vs Muon on the hidden matrices (attention, dense MLP, experts per '
                 'expert) with AdamW (lr 3e-3) on embeddings, head, router and norms; two learning rates each.',
        'variants': {
            'adamw lr=3e-3': ['--config.optim.lr=3e-3'],
            'adamw lr=1e-2': ['--config.optim.lr=1e-2'],
            'muon lr=0.02 + adamw': MUON + ['--config.optim.groups.hidden.lr=0.02'],
            'muon lr=0.05 + adamw': MUON + ['--config.optim.groups.hidden.lr=0.05'],
        },
    },
    'precision': {
        'about': 'fp32; bf16 compute with fp32 parameters; fp8 (e4m3 forward, e5m2 gradients, '
                 'per-tensor current scaling) expert and dense MLP matmuls with bf16 compute elsewhere. '
                 'On CPU fp8 is emulated by quantize-dequantize, so its tokens/s measures the emulation '
                 'overhead, not fp8 speed.',
        'variants': {p: [f'--config.model.precision={p}'] for p in ('fp32', 'bf16', 'fp8')},
    },
}

_STUDY = flags.DEFINE_enum('study', None, list(STUDIES), 'Which ablation.')
_OUT = flags.DEFINE_string('out', None, 'Markdown file to write (a PNG is written next to it).')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per variant.')


def run_variant(workdir: str, flag_list: list[str]) -> list[dict]:
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'moejax.train', f'--workdir={workdir}', *flag_list]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def summarize(records: list[dict]) -> dict:
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval/loss' in r]
  speeds = sorted(r['tokens_per_sec'] for r in train[1:])   # the first window includes compiling
  return {'eval': evals[-1]['eval/loss'], 'train': train[-1]['loss'],
          'tok_s': speeds[len(speeds) // 2], 'finite': all(map(lambda r: r['loss'] == r['loss'], train)),
          'curve': [(r['step'], r['loss']) for r in train], 'eval_curve': [(r['step'], r['eval/loss']) for r in evals]}


def plot(results: dict, path: str, title: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, r in results.items():
    line, = ax.plot(*zip(*r['curve']), label=f'{name} (train)', alpha=0.6)
    ax.plot(*zip(*r['eval_curve']), 'o--', color=line.get_color(), label=f'{name} (held-out)')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.set_title(title)
  ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def commit() -> str:
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                           text=True).stdout.strip()
    return head + (' (with uncommitted changes)' if dirty else '')
  except OSError:
    return 'unknown'


def main(argv):
  del argv
  study = STUDIES[_STUDY.value]
  base = [f if not f.startswith('--config.train.steps=') else f'--config.train.steps={_STEPS.value}'
          for f in BASE]
  results, start = {}, time.time()
  for name, extra in study['variants'].items():
    workdir = os.path.join('runs', f'ablate-{_STUDY.value}', name.replace(' ', '_').replace('+', 'and'))
    results[name] = summarize(run_variant(workdir, base + extra))
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  png = os.path.splitext(_OUT.value)[0] + '.png'
  plot(results, png, f'{_STUDY.value} ablation (smoke model, {_STEPS.value} steps)')
  lines = [
      f'# {_STUDY.value.capitalize()} ablation',
      '',
      study['about'],
      '',
      f'Made by `make ablate-{_STUDY.value}` (`python -m moejax.ablate_study --study={_STUDY.value} '
      f'--steps={_STEPS.value}`) at commit {commit()}, in {(time.time() - start) / 60:.1f} min on '
      f'{os.cpu_count()} CPU cores, one device. Model and data: experiments/smoke.py (d_model 64, '
      f'3 layers (1 dense), 8 experts top-2, vocab 1024, the committed three-play sample), '
      f'{_STEPS.value} steps of 16 x 64 tokens, cosine schedule with 30 warmup steps. Base flags: '
      f'`{" ".join(base)}`.',
      '',
      '| variant | extra flags | held-out loss | final train loss | tokens/s (median) |',
      '|---|---|---:|---:|---:|',
  ]
  for name, r in results.items():
    extra = ' '.join(study['variants'][name])
    lines.append(f'| {name} | `{extra}` | {r["eval"]:.4f} | {r["train"]:.4f} | {r["tok_s"]:,.0f} |')
  lines += ['', 'Held-out loss: mean over the held-out batches (up to 8) at the last step. Loss curves: '
            f'![loss curves]({os.path.basename(png)})', '']
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  flags.mark_flags_as_required(['study', 'out'])
  app.run(main)
