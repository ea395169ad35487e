"""`make sweep-width`: a learning-rate sweep at two widths, with and without the width-transfer rule
(moejax.transfer, docs/transfer.md).

The smoke model at d_model 64 and 128 (heads, dense FFN and expert widths doubled with it, head_dim
fixed) trains a short run per learning rate on one device: at 128 once in the standard
parameterisation (the same lr for every width) and once under the rule with base_width 64. At 64
both are the same model, so it runs once; two of its cells run again with another seed, to tell a
gap between learning rates from chance.
"""
import math
import os

from experiments.studies import apply, smoke_on_one_device

TITLE = 'Learning-rate transfer across width'
BASE_WIDTH = 64
LRS = (5e-3, 1e-2, 2e-2, 4e-2)
CURVES = {   # column -> (d_model, rule on)
    'd_model 64 (the base: same model either way)': (BASE_WIDTH, False),
    'd_model 128, same lr (no rule)': (128, False),
    'd_model 128, rule on (base_width 64)': (128, True),
}
PAIR = LRS[len(LRS) // 2 - 1:len(LRS) // 2 + 1]   # the base-width cells also run with seed 1


def widen(c, width: int):
  """The smoke model's hidden widths times width / 64 (head_dim 16 fixed, so more heads)."""
  k = width // BASE_WIDTH
  m = c.model
  m.d_model, m.attn.num_heads, m.attn.num_kv_heads = width, 4 * k, 2 * k
  m.dense_ffn_dim, m.expert_ffn_dim = 128 * k, 32 * k


def cell(width: int, rule: bool, lr: float, seed: int = 0):
  def edit(c):
    widen(c, width)
    if rule:
      c.model.base_width = BASE_WIDTH
    c.optim.lr = lr
    if seed:
      c.seed = seed
  return edit


VARIANTS, CELLS = {}, {}   # CELLS: variant -> (column or 'seed', lr)
for _col, (_width, _rule) in CURVES.items():
  for _lr in LRS:
    if _width == BASE_WIDTH and _col != next(iter(CURVES)):
      continue
    _name = f'w{_width}{"_rule" if _rule else ""}_lr{_lr:g}'
    VARIANTS[_name], CELLS[_name] = cell(_width, _rule, _lr), (_col, _lr)
for _lr in PAIR:
  _name = f'w{BASE_WIDTH}_lr{_lr:g}_seed1'
  VARIANTS[_name], CELLS[_name] = cell(BASE_WIDTH, False, _lr, seed=1), ('seed', _lr)


def set_steps(c, steps: int):
  c.train.steps, c.train.log_every, c.train.eval_every = steps, max(1, steps // 10), steps
  c.optim.warmup_steps = steps // 10


def get_config(variant=None):
  c = smoke_on_one_device(150)
  set_steps(c, 150)
  return apply(c, VARIANTS, variant)


def about(runs):
  c = next(iter(runs.values())).config
  return ('The rule (moejax.transfer, docs/transfer.md) is muP for Adam relative to `model.base_width`: block '
          'matrices (attention, MLP, experts, router) get init std x (64/width)^0.5 and learning rate x '
          '64/width, logits x 64/width, embeddings and norms unchanged. Model: experiments/smoke.py (3 layers, '
          '1 dense, 8 experts top-2, vocab 1024, the committed three-play sample); at d_model 128 the heads '
          '(head_dim 16), dense FFN and expert widths double too (`model.d_model=128 model.attn.num_heads=8 '
          'model.attn.num_kv_heads=4 model.dense_ffn_dim=256 model.expert_ffn_dim=64`). Each run: '
          f'{c.train.steps} steps of {c.train.batch_size} x {c.train.seq_len} tokens on one device, cosine '
          f'schedule with {c.optim.warmup_steps} warmup steps, one seed. Held-out loss: mean over '
          f'{c.train.eval_batches} held-out batches at the last step; best per column in bold.')


ABOUT = about


def _results(runs) -> dict:
  return {CELLS[name]: {'eval': r.final_eval} for name, r in runs.items()}


def _score(r: dict) -> float:
  return r['eval'] if math.isfinite(r['eval']) else math.inf


def verdict(results: dict, lrs, pair) -> list[str]:
  """Where each curve's optimum lies, what using the base width's best lr at 128 costs, and how
  much a gap between two learning rates changes with the seed (the noise those costs compare to)."""
  best = {col: min(lrs, key=lambda lr: _score(results[col, lr])) for col in CURVES}
  base, sp, mup = CURVES
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
  edges = [col for col in CURVES if best[col] in (lrs[0], lrs[-1])]
  if edges:
    lines.append(f'- The best lr is at the edge of the grid for: {", ".join(edges)}; the true optimum may lie '
                 'outside it.')
  rel = {col: [results[col, lr]['eval'] - results[col, best[col]]['eval'] for lr in lrs] for col in CURVES}
  for col, name in ((sp, 'without the rule'), (mup, 'with the rule')):
    mismatch = sum(abs(a - b) for a, b in zip(rel[col], rel[base])) / len(lrs)
    lines.append(f'- Whole curve, {name}: its loss above its own best differs from the base width\'s by '
                 f'{mismatch:.3f} nats on average over the grid (second table).')
  lines.append(
      f'- Noise: every cell above uses seed 0 (the same data order). A second seed (`seed=1`: '
      f'another init and data order) moves the d_model 64 cells (lr {lo:g}: '
      f'{results[base, lo]["eval"]:.3f} -> {results["seed", lo]["eval"]:.3f}; lr {hi:g}: '
      f'{results[base, hi]["eval"]:.3f} -> {results["seed", hi]["eval"]:.3f}); '
      f'the gap lr {hi:g} minus lr {lo:g} is {gap0:+.3f} with seed 0 and {gap1:+.3f} with seed 1. Gaps '
      f'between learning rates smaller than ~{noise:.3f} nats are therefore not resolved by one seed.')
  return lines


def table(runs) -> list[str]:
  """Held-out loss per lr and column, the same minus each column's best, and the verdict."""
  if set(runs) != set(VARIANTS):   # --variant picked a subset: there is no sweep to tabulate
    return ['| variant | held-out loss |', '|---|---:|',
            *(f'| {name} | {r.final_eval:.3f} |' for name, r in runs.items())]
  results = _results(runs)
  bad = [name for name, r in runs.items() if not math.isfinite(r.final_eval)]
  best = {col: min(LRS, key=lambda lr: _score(results[col, lr])) for col in CURVES}
  cell_text = lambda col, lr: (f'**{results[col, lr]["eval"]:.3f}**' if lr == best[col]
                               else f'{results[col, lr]["eval"]:.3f}')
  head = ['| optim.lr | ' + ' | '.join(CURVES) + ' |', '|---:|' + '---:|' * len(CURVES)]
  lines = [*head]
  lines += [f'| {lr:g} | ' + ' | '.join(cell_text(col, lr) for col in CURVES) + ' |' for lr in LRS]
  lines.append('| best lr | ' + ' | '.join(f'{best[col]:g}' for col in CURVES) + ' |')
  lines += ['', 'Held-out loss minus the best of its column (a learning rate transfers when these rows '
            'match across columns):', '', *head]
  for lr in LRS:
    lines.append(f'| {lr:g} | ' + ' | '.join(f'{results[col, lr]["eval"] - results[col, best[col]]["eval"]:+.3f}'
                                             for col in CURVES) + ' |')
  if bad:
    lines += ['', f'Non-finite held-out loss: {", ".join(bad)}.']
  return lines + ['', '## Did the optimum hold?', '', *verdict(results, LRS, PAIR)]


def plot(runs, path):
  if set(runs) != set(VARIANTS):
    return []
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  results = _results(runs)
  steps = next(iter(runs.values())).config.train.steps
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for col, style in zip(CURVES, ('o-', 's--', '^-')):
    losses = [results[col, lr]['eval'] for lr in LRS]
    line, = ax.plot(LRS, losses, style, label=col)
    best = min(range(len(LRS)), key=lambda i: _score(results[col, LRS[i]]))
    ax.plot([LRS[best]], [losses[best]], '*', ms=16, color=line.get_color())
  ax.set_xscale('log', base=2)
  ax.set_xticks(LRS, [f'{lr:g}' for lr in LRS])
  ax.set_xlabel('optim.lr (peak)')
  ax.set_ylabel(f'held-out loss after {steps} steps')
  ax.set_title('lr sweep at two widths (smoke MoE; star = best lr per curve)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [f'![held-out loss vs learning rate]({os.path.basename(path)})']
