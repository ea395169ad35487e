"""Learning-rate sweep at two widths, with and without the width-transfer rule (moejax.transfer).

  python -m moejax.tools.sweep_width --out=results/sweep_width.md      (make sweep-width)

The smoke model (experiments/smoke.py) at d_model 64 and 128 (heads, dense FFN and expert widths
doubled with it, head_dim fixed) trains a short run per learning rate on one CPU device: at 128 once
in the standard parameterisation (the same lr for every width) and once under the rule with
base_width 64. At 64 both are the same model, so it runs once. Each run is a fresh
`python -m moejax.train` in <runs>/<name>; the table and plot come from the runs' metrics.jsonl.
"""
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags


BASE_WIDTH = 64
_OUT = flags.DEFINE_string('out', 'results/sweep_width.md', 'Markdown file to write (a PNG goes beside it).')
_RUNS = flags.DEFINE_string('runs', 'runs/sweep_width', 'Where the runs train.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps per run.')
_LRS = flags.DEFINE_list('lrs', ['5e-3', '1e-2', '2e-2', '4e-2'], 'Peak learning rates (optim.lr).')
_JOBS = flags.DEFINE_integer('jobs', 2, 'Runs trained at once.')


def base_flags(steps: int) -> list[str]:
  return ['--config=experiments/smoke.py', f'--config.train.steps={steps}', '--config.train.batch_size=16',
          '--config.train.seq_len=64', f'--config.train.log_every={max(1, steps // 10)}',
          f'--config.train.eval_every={steps}', '--config.train.eval_batches=8',
          f'--config.optim.warmup_steps={steps // 10}', '--config.optim.decay_steps=0',
          '--config.checkpoint.every=100000', '--config.mesh.data=1', '--config.mesh.expert=1']


def width_flags(width: int) -> list[str]:
  """The smoke model's hidden widths times width / 64 (head_dim 16 fixed, so more heads)."""
  k = width // BASE_WIDTH
  return [f'--config.model.d_model={width}', f'--config.model.num_heads={4 * k}',
          f'--config.model.num_kv_heads={2 * k}', f'--config.model.dense_ffn_dim={128 * k}',
          f'--config.model.expert_ffn_dim={32 * k}']


COLUMNS = {   # name -> (width, extra flags)
    'd_model 64 (the base: same model either way)': (64, []),
    'd_model 128, same lr (no rule)': (128, []),
    'd_model 128, rule on (base_width 64)': (128, [f'--config.model.base_width={BASE_WIDTH}']),
}


def commit() -> str:
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                         text=True).stdout.strip()
  return (head or 'unknown') + (' (with uncommitted changes)' if dirty else '')


def summarize(records: list[dict]) -> dict:
  evals = [r['eval/loss'] for r in records if 'eval/loss' in r]
  train = [r['loss'] for r in records if 'loss' in r]
  return {'eval': evals[-1] if evals else float('nan'), 'train': train[-1] if train else float('nan')}


def run(workdir: str, flag_list: list[str]) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  cmd = [sys.executable, '-m', 'moejax.train', f'--workdir={workdir}', *flag_list]
  with open(os.path.join(workdir, 'train.log'), 'w') as log:
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return summarize([json.loads(l) for l in f if l.strip()])


def _score(r: dict) -> float:
  return r['eval'] if math.isfinite(r['eval']) else math.inf


def plot(results: dict, lrs: list[float], path: str, steps: int):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for col, style in zip(COLUMNS, ('o-', 's--', '^-')):
    losses = [results[col, lr]['eval'] for lr in lrs]
    line, = ax.plot(lrs, losses, style, label=col)
    best = min(range(len(lrs)), key=lambda i: _score(results[col, lrs[i]]))
    ax.plot([lrs[best]], [losses[best]], '*', ms=16, color=line.get_color())
  ax.set_xscale('log', base=2)
  ax.set_xticks(lrs, [f'{lr:g}' for lr in lrs])
  ax.set_xlabel('optim.lr (peak)')
  ax.set_ylabel(f'held-out loss after {steps} steps')
  ax.set_title('lr sweep at two widths (smoke MoE; star = best lr per curve)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def verdict(results: dict, lrs: list[float], pair: tuple[float, float]) -> list[str]:
  """Where each curve's optimum lies, what using the base width's best lr at 128 costs, and how
  much a gap between two learning rates changes with the seed (the noise those costs compare to)."""
  best = {col: min(lrs, key=lambda lr: _score(results[col, lr])) for col in COLUMNS}
  base, sp, mup = COLUMNS
  lo, hi = pair
  gap0 = results[base, hi]['eval'] - results[base, lo]['eval']
  gap1 = results['seed', hi]['eval'] - results['seed', lo]['eval']
  noise = abs(gap1 - gap0)
  lines = []
  for col, name in ((sp, 'Without the rule'), (mup, 'With the rule')):
    cost = results[col, best[base]]['eval'] - results[col, best[col]]['eval']
    moved = 'held' if best[col] == best[base] else f'moved from {best[base]:g} to {best[col]:g}'
    lines.append(f'- {name}: the best lr at d_model 128 is {best[col]:g}; the optimum {moved}. Training '
                 f'd_model 128 with the base width\'s best lr ({best[base]:g}) costs {cost:.3f} nats of '
                 f'held-out loss against its own best ({"within" if cost <= noise else "beyond"} the noise below).')
  edges = [col for col in COLUMNS if best[col] in (lrs[0], lrs[-1])]
  if edges:
    lines.append(f'- The best lr is at the edge of the grid for: {", ".join(edges)}; the true optimum may lie '
                 'outside it.')
  rel = {col: [results[col, lr]['eval'] - results[col, best[col]]['eval'] for lr in lrs] for col in COLUMNS}
  for col, name in ((sp, 'without the rule'), (mup, 'with the rule')):
    mismatch = sum(abs(a - b) for a, b in zip(rel[col], rel[base])) / len(lrs)
    lines.append(f'- Whole curve, {name}: its loss above its own best differs from the base width\'s by '
                 f'{mismatch:.3f} nats on average over the grid (second table).')
  lines.append(
      f'- Noise: every cell above uses seed 0 (the same data order). A second seed (`--config.seed=1`: '
      f'another init and data order) moves the d_model 64 cells (lr {lo:g}: '
      f'{results[base, lo]["eval"]:.3f} -> {results["seed", lo]["eval"]:.3f}; lr {hi:g}: '
      f'{results[base, hi]["eval"]:.3f} -> {results["seed", hi]["eval"]:.3f}); '
      f'the gap lr {hi:g} minus lr {lo:g} is {gap0:+.3f} with seed 0 and {gap1:+.3f} with seed 1. Gaps '
      f'between learning rates smaller than ~{noise:.3f} nats are therefore not resolved by one seed.')
  return lines


def main(argv):
  del argv
  from moejax.state import ensure_data
  from experiments.smoke import get_config
  ensure_data(get_config())   # once, before runs in parallel would each prepare it
  made_at = commit()           # the code the runs start from
  lrs = sorted(float(x) for x in _LRS.value)
  base = base_flags(_STEPS.value)
  jobs = {}
  for col, (width, extra) in COLUMNS.items():
    for lr in lrs:
      if col != next(iter(COLUMNS)) and width == BASE_WIDTH:
        continue
      name = f'w{width}{"_rule" if extra else ""}_lr{lr:g}'
      jobs[col, lr] = (os.path.join(_RUNS.value, name), base + width_flags(width) + extra + [f'--config.optim.lr={lr:g}'])
  # Two base-width cells again with another seed: how much a gap between learning rates is chance.
  pair = tuple(lrs[len(lrs) // 2 - 1:len(lrs) // 2 + 1])
  for lr in pair:
    jobs['seed', lr] = (os.path.join(_RUNS.value, f'w{BASE_WIDTH}_lr{lr:g}_seed1'),
                        jobs[next(iter(COLUMNS)), lr][1] + ['--config.seed=1'])
  start = time.time()
  results = {}
  with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
    futures = {pool.submit(run, *args): key for key, args in jobs.items()}
    for fut in concurrent.futures.as_completed(futures):
      key = futures[fut]
      results[key] = fut.result()
      print(f'{key[0]} lr={key[1]:g}: held-out loss {results[key]["eval"]:.4f} '
            f'({(time.time() - start) / 60:.1f} min)', flush=True)
  minutes = (time.time() - start) / 60
  bad = [k for k, r in results.items() if not math.isfinite(r['eval'])]
  if bad:
    print(f'warning: non-finite held-out loss in {bad}', flush=True)

  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  png = os.path.splitext(_OUT.value)[0] + '.png'
  plot(results, lrs, png, _STEPS.value)
  best = {col: min(lrs, key=lambda lr: _score(results[col, lr])) for col in COLUMNS}
  cell = lambda col, lr: (f'**{results[col, lr]["eval"]:.3f}**' if lr == best[col]
                          else f'{results[col, lr]["eval"]:.3f}')
  lines = [
      '# Learning-rate transfer across width',
      '',
      f'Made by `make sweep-width` (`python -m moejax.tools.sweep_width --out={_OUT.value} --steps={_STEPS.value} '
      f'--lrs={",".join(f"{lr:g}" for lr in lrs)}`) at commit {made_at}, in {minutes:.1f} min on '
      f'{os.cpu_count()} shared CPU cores, {_JOBS.value} runs at a time, one device per run.',
      '',
      'The rule (moejax.transfer, docs/transfer.md) is muP for Adam relative to `model.base_width`: block '
      'matrices (attention, MLP, experts, router) get init std x (64/width)^0.5 and learning rate x 64/width, '
      'logits x 64/width, embeddings and norms unchanged. Model: experiments/smoke.py (3 layers, 1 dense, '
      '8 experts top-2, vocab 1024, the committed three-play sample); at d_model 128 the heads (head_dim 16), '
      'dense FFN and expert widths double too. Each run: '
      f'{_STEPS.value} steps of 16 x 64 tokens, cosine schedule with {_STEPS.value // 10} warmup steps, one '
      'seed. Held-out loss: mean over 8 held-out batches at the last step; best per column in bold.',
      '',
      f'Base flags: `{" ".join(base)}`; widths: `{" ".join(width_flags(128))}` for 128.',
      '',
      '| optim.lr | ' + ' | '.join(COLUMNS) + ' |',
      '|---:|' + '---:|' * len(COLUMNS),
  ]
  for lr in lrs:
    lines.append(f'| {lr:g} | ' + ' | '.join(cell(col, lr) for col in COLUMNS) + ' |')
  lines.append('| best lr | ' + ' | '.join(f'{best[col]:g}' for col in COLUMNS) + ' |')
  lines += ['', 'Held-out loss minus the best of its column (a learning rate transfers when these rows '
            'match across columns):', '',
            '| optim.lr | ' + ' | '.join(COLUMNS) + ' |', '|---:|' + '---:|' * len(COLUMNS)]
  for lr in lrs:
    lines.append(f'| {lr:g} | ' + ' | '.join(f'{results[col, lr]["eval"] - results[col, best[col]]["eval"]:+.3f}'
                                             for col in COLUMNS) + ' |')
  lines += ['', '## Did the optimum hold?', '', *verdict(results, lrs, pair), '',
            f'![held-out loss vs learning rate]({os.path.basename(png)})', '']
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
