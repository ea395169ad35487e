"""`make ablate-balancing`: the default MoE on Shakespeare under five balancing methods."""
import os
import shutil

from experiments import default
from experiments.studies import apply

TITLE = 'Ablation: balancing'
ABOUT = ('The `make train` model (experiments/default.py), trained shorter and logged more often, under five '
         'balancing methods. MaxVio and real experts per token: mean over the last quarter of the run (MaxVio '
         'per log window of 10 steps); dead experts: experts with no token in the last window; tokens/s: '
         'median over the log windows after the first.')


def no_balancing(c):
  c.model.bias_update_rate = 0.0
  c.train.stop_on_collapse = False   # measured here, not stopped


def balance_loss_only(c):
  c.model.bias_update_rate = 0.0
  c.model.loss.balance_weight = 0.01
  c.train.stop_on_collapse = False


def bias_only(c):
  del c   # the defaults: auxiliary-loss-free bias balancing


def bias_and_sequence_loss(c):
  c.model.loss.balance_weight = 1e-4


def bias_and_zero_experts(c):
  c.model.router.num_zero_experts = 4
  c.model.router.target_active_experts = 1.5


VARIANTS = {
    'no balancing': no_balancing,
    'balance loss only': balance_loss_only,
    'loss-free bias only': bias_only,
    'bias + seq-wise loss 1e-4': bias_and_sequence_loss,
    'bias + 4 zero experts (target 1.5)': bias_and_zero_experts,
}

COLUMNS = {
    'held-out loss': lambda r: f'{r.final_eval:.3f}',
    'global MaxVio': lambda r: f'{r.tail_mean("moe/maxvio_global"):.3f}',
    'dead experts': lambda r: f'{r.train[-1].get("moe/dead_experts", 0):g}',
    'real experts / token': lambda r: f'{r.tail_mean("moe/active_experts_per_token"):.2f}',
    'tokens/s': lambda r: f'{r.tokens_per_sec:,.0f}',
}


def get_config(variant=None):
  c = default.get_config()
  c.train.steps, c.train.log_every, c.train.eval_every = 250, 10, 50
  c.train.alert_maxvio = 0.0        # the unbalanced variants would alert every window
  c.optim.warmup_steps = 25
  c.checkpoint.every = 1000
  return apply(c, VARIANTS, variant)


def plot(runs, path):
  """Held-out loss and global MaxVio of every variant; each variant's expert-load heatmap beside it."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from moejax.tools import report, study
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
  for r in runs.values():
    a.plot([x['step'] for x in r.evals], [x['eval/loss'] for x in r.evals], 'o-', label=r.name)
    b.plot([x['step'] for x in r.train], [x.get('moe/maxvio_global', float('nan')) for x in r.train], label=r.name)
  a.set(xlabel='step', ylabel='held-out loss')
  b.set(xlabel='step', ylabel='global MaxVio (log window)', yscale='log')
  a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  stem = os.path.splitext(path)[0]
  lines = [f'![held-out loss and MaxVio]({os.path.basename(path)})', '']
  for r in runs.values():
    heatmap = os.path.join(report.report(r.workdir), 'expert_load.png')
    if os.path.exists(heatmap):   # drawn when the run logged expert loads
      load = f'{stem}_{study.slug(r.name)}_load.png'
      shutil.copy(heatmap, load)
      lines.append(f'![{r.name}: expert load]({os.path.basename(load)})')
  return lines
