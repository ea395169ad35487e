"""Plots and a summary of a run: `python -m moejax.report --workdir=<dir>` (or moejax.tools.report).

Writes into <workdir>/report/: expert_load.png (expert load fractions over steps, one heatmap per
MoE layer), expert_health.png (routing churn, and per expert and layer over steps its update norm,
output norm and router bias), balance.png (MaxVio per batch and over each log window, dead experts), stability.png
(max attention logit and max residual activation, the early signs of logit and activation blow-up),
loss.png (train and held-out loss), and summary.md (with a table of every evaluation: loss and bits
per byte of each eval source, downstream task metrics and CORE).
"""
import json
import os

from absl import app, flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_expert_load(layers: list[dict], path: str):
  rows = [r for r in layers if 'load_fraction' in r]
  if not rows:
    return False
  load_SLE = np.asarray([r['load_fraction'] for r in rows])
  steps = [r['step'] for r in rows]
  L = load_SLE.shape[1]
  fig, axes = plt.subplots(L, 1, figsize=(8, 2.2 * L), squeeze=False)
  for l in range(L):
    ax = axes[l, 0]
    im = ax.imshow(load_SLE[:, l].T * load_SLE.shape[-1], aspect='auto', cmap='viridis', origin='lower',
                   extent=(steps[0], steps[-1], -0.5, load_SLE.shape[-1] - 0.5), vmin=0, vmax=3)
    ax.set_ylabel(f'MoE layer {l}\nexpert')
    fig.colorbar(im, ax=ax, label='load / mean')
  axes[-1, 0].set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_balance(train: list[dict], path: str):
  rows = [r for r in train if 'moe/maxvio' in r]
  if not rows:
    return False
  steps = [r['step'] for r in rows]
  fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
  a.plot(steps, [r['moe/maxvio'] for r in rows], label='MaxVio (batch)')
  a.plot(steps, [r['moe/maxvio_global'] for r in rows], label='MaxVio (log window)')
  a.set_ylabel('MaxVio')
  a.legend()
  b.plot(steps, [r['moe/dead_experts'] for r in rows], color='tab:red')
  b.set_ylabel('dead experts')
  b.set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_expert_health(layers: list[dict], path: str):
  """Per MoE layer over steps: routing churn, and heatmaps of each expert's update norm, output norm
  and router bias (each relative to the layer's mean at that step, the bias as it is)."""
  rows = [r for r in layers if 'expert_update_norm' in r]
  if not rows:
    return False
  steps = [r['step'] for r in rows]
  f = lambda k: np.asarray([[[np.nan if v is None else v for v in e] for e in r[k]] for r in rows], np.float64)
  maps = [('expert_update_norm', 'update norm / mean'), ('expert_out_norm', 'output norm / mean')]
  L = len(rows[0]['expert_update_norm'])
  fig, axes = plt.subplots(L + 1, 3, figsize=(14, 2.4 * (L + 1)), squeeze=False)
  churn_SL = np.asarray([r['routing_churn'] for r in rows], np.float64)
  for l in range(L):
    axes[0, 0].plot(steps, churn_SL[:, l], label=f'MoE layer {l}')
  axes[0, 0].set(ylabel='routing churn', xlabel='step')
  axes[0, 0].legend(fontsize=7)
  for ax in axes[0, 1:]:
    ax.axis('off')
  extent = (steps[0], steps[-1], -0.5, None)
  for j, (key, label) in enumerate(maps):
    v_SLE = f(key)
    rel_SLE = v_SLE / np.nanmean(v_SLE, axis=-1, keepdims=True)
    for l in range(L):
      im = axes[l + 1, j].imshow(rel_SLE[:, l].T, aspect='auto', origin='lower', cmap='magma', vmin=0, vmax=2,
                                 extent=(*extent[:3], v_SLE.shape[-1] - 0.5))
      axes[l + 1, j].set_ylabel(f'MoE layer {l}\nexpert')
      fig.colorbar(im, ax=axes[l + 1, j], label=label)
  bias_rows = [r for r in rows if 'router_bias' in r]
  if bias_rows:
    bias_SLE = np.asarray([r['router_bias'] for r in bias_rows], np.float64)
    for l in range(L):
      im = axes[l + 1, 2].imshow(bias_SLE[:, l].T, aspect='auto', origin='lower', cmap='coolwarm',
                                 extent=(*extent[:3], bias_SLE.shape[-1] - 0.5))
      fig.colorbar(im, ax=axes[l + 1, 2], label='router bias')
  for ax in axes[-1]:
    ax.set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_stability(train: list[dict], path: str):
  series = [(k, label) for k, label in (('attn/logit_max', 'max attention logit'),
                                        ('resid/max_abs', 'max |residual|')) if any(k in r for r in train)]
  if not series:
    return False
  fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.5 * len(series)), sharex=True, squeeze=False)
  for ax, (key, label) in zip(axes[:, 0], series):
    rows = [r for r in train if key in r]
    ax.plot([r['step'] for r in rows], [r[key] for r in rows])
    ax.set_ylabel(label)
  axes[-1, 0].set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_loss(train: list[dict], evals: list[dict], path: str):
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.plot([r['step'] for r in train], [r['lm_loss'] for r in train], label='train lm_loss')
  ax.plot([r['step'] for r in evals], [r['eval/loss'] for r in evals], 'o-', label='held-out loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary(workdir: str, train: list[dict], evals: list[dict], alerts: list[str]) -> str:
  last = train[-1] if train else {}
  lines = [f'# Run report: {workdir}', '', '| metric | value |', '|---|---|']
  if evals:
    lines.append(f'| held-out loss (step {evals[0]["step"]} -> {evals[-1]["step"]}) | '
                 f'{evals[0]["eval/loss"]:.3f} -> {evals[-1]["eval/loss"]:.3f} |')
  for key in ('loss', 'tokens_per_sec', 'mfu', 'moe/maxvio', 'moe/maxvio_global', 'moe/dead_experts',
              'moe/entropy', 'moe/active_experts_per_token', 'moe/grad_norm_ratio',
              'moe/expert_cos_max', 'moe/routing_churn', 'moe/expert_update_norm_max_ratio',
              'attn/logit_max', 'resid/max_abs'):
    if key in last:
      lines.append(f'| {key} (step {last["step"]}) | {last[key]:.4g} |')
  lines += eval_table(evals)
  lines += ['', f'Alerts: {len(alerts)}'] + [f'- {a}' for a in alerts[:20]]
  lines += ['', '![expert load](expert_load.png)', '![expert health](expert_health.png)', '![balance](balance.png)',
            '![stability](stability.png)', '![loss](loss.png)']
  return '\n'.join(lines) + '\n'


def eval_table(evals: list[dict]) -> list[str]:
  """One row per evaluation, one column per eval/... metric any evaluation wrote (blank where absent)."""
  keys = sorted({k for r in evals for k in r if k.startswith('eval/') and k != 'eval/loss'},
                key=lambda k: (k == 'eval/core', not k.startswith('eval/main/'), k))
  if not keys:
    return []
  lines = ['', '## Evaluations', '', '| step | ' + ' | '.join(k[len('eval/'):] for k in keys) + ' |',
           '|---|' + '---|' * len(keys)]
  for r in evals:
    cells = [f'{r[k]:.4f}' if isinstance(r.get(k), (int, float)) else '' for k in keys]
    lines.append(f'| {r["step"]} | ' + ' | '.join(cells) + ' |')
  return lines


def held_out_line(evals: list[dict]) -> str:
  """The last evaluation in one line: held-out loss and the bits per byte of each eval source."""
  if not evals:
    return 'held-out: no evaluation in metrics.jsonl'
  last = evals[-1]
  bpb = ', '.join(f'{k[len("eval/"):-len("/bpb")]} {last[k]:.4f}' for k in sorted(last)
                  if k.startswith('eval/') and k.endswith('/bpb'))
  return f'held-out at step {last["step"]}: loss {last["eval/loss"]:.4f}' + (f', bits per byte: {bpb}' if bpb else '')


def report(workdir: str) -> tuple[str, str]:
  """Writes <workdir>/report; returns its path and the held-out line."""
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  if not records:
    raise FileNotFoundError(f'workdir: no metrics.jsonl records in {workdir}')
  train = [r for r in records if 'lm_loss' in r]
  evals = [r for r in records if 'eval/loss' in r]
  alerts = [f'step {r["step"]}: {a}' for r in train for a in r.get('alerts', [])]
  out = os.path.join(workdir, 'report')
  os.makedirs(out, exist_ok=True)
  plot_expert_load(read_jsonl(os.path.join(workdir, 'loads.jsonl')), os.path.join(out, 'expert_load.png'))
  plot_expert_health(read_jsonl(os.path.join(workdir, 'loads.jsonl')), os.path.join(out, 'expert_health.png'))
  plot_balance(train, os.path.join(out, 'balance.png'))
  plot_stability(train, os.path.join(out, 'stability.png'))
  plot_loss(train, evals, os.path.join(out, 'loss.png'))
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(summary(workdir, train, evals, alerts))
  return out, held_out_line(evals)


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise SystemExit('error: --workdir is required')
  try:
    out, held_out = report(workdir)
    print(f'wrote {out}')
    print(held_out)
  except FileNotFoundError as e:
    raise SystemExit(f'error: {e}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Run directory with metrics.jsonl.')   # here: importable beside train
  app.run(main)
