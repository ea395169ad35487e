"""`make ablate-attention`: the smoke MoE with each attention type (and a hybrid pattern)."""
from experiments import smoke
from experiments.studies import apply

TITLE = 'Attention types on the smoke MoE: held-out loss and throughput (CPU)'
TYPES = ('gqa', 'mla', 'swa', 'nsa', 'kda', 'kda,kda,mla')


def about(runs):
  c = next(iter(runs.values())).config
  m = c.model
  return (f'Each row trains experiments/smoke.py with {m.num_layers} layers (1 dense + {m.num_layers - 1} MoE, so '
          "that the hybrid 'kda,kda,mla' really mixes: dense kda, MoE [kda, mla, kda]) for "
          f'{c.train.steps} steps (batch {c.train.batch_size} x {c.train.seq_len} tokens, d_model {m.d_model}, '
          f'{m.attn.num_heads} heads) with `model.attention=<type>`, default window/NSA/KDA shapes from '
          'moejax/configs.py. Held-out loss is the mean over the eval batches at step 0 and at the last step; '
          'tok/s is the median of the logged windows after the first (which includes compilation). A short, '
          'tiny run on a shared CPU: differences in loss of a few hundredths are within run-to-run noise, and '
          'at 64 tokens the local types see most of the context, so this checks that each type trains, not '
          'which is best.')


ABOUT = about


def attention(name):
  def edit(c):
    c.model.attention = name
  return edit


VARIANTS = {name: attention(name) for name in TYPES}

COLUMNS = {
    'held-out loss (step 0)': lambda r: f'{r.evals[0]["eval/loss"]:.3f}',
    'held-out loss (last)': lambda r: f'{r.final_eval:.3f}',
    'train loss (last)': lambda r: f'{r.final_train:.3f}',
    'tok/s': lambda r: f'{r.tokens_per_sec:,.0f}',
    'wall s': lambda r: f'{r.wall_s:.0f}',
}


def set_steps(c, steps):
  c.train.steps = c.train.eval_every = steps


def get_config(variant=None):
  c = smoke.get_config()
  c.model.num_layers = 4
  c.train.log_every = 10
  set_steps(c, 60)
  return apply(c, VARIANTS, variant)
