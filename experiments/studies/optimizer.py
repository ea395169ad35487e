"""`make ablate-optimizer`: AdamW everywhere vs Muon on the hidden matrices, two learning rates each."""
from experiments.studies import apply, smoke_on_one_device, smoke_run_text

TITLE = 'Optimizer ablation'


def about(runs):
  c = next(iter(runs.values())).config
  return ('AdamW everywhere vs Muon on the hidden matrices (attention, dense MLP, experts per expert) with '
          f'AdamW (lr {c.optim.lr:g}) on embeddings, head, router and norms; two learning rates each. '
          + smoke_run_text(c))


ABOUT = about


def adamw(lr):
  def edit(c):
    c.optim.lr = lr
  return edit


def muon(lr):
  def edit(c):
    c.optim.groups.hidden.name = 'contrib.muon'
    c.optim.groups.hidden.lr = lr
  return edit


VARIANTS = {
    'adamw lr=3e-3': adamw(3e-3),
    'adamw lr=1e-2': adamw(1e-2),
    'muon lr=0.02 + adamw': muon(0.02),
    'muon lr=0.05 + adamw': muon(0.05),
}


def get_config(variant=None):
  c = smoke_on_one_device(300)
  c.train.log_every, c.train.eval_every = 10, 50
  c.optim.warmup_steps = 30
  return apply(c, VARIANTS, variant)
