"""`make ablate-epochs`: one token budget spent three ways on the Shakespeare source (modern + First
Folio editions of each play as two variants), same model, same held-out documents:

  one_pass     one epoch over the originals of a set of plays (doc_fraction 0.2)
  epochs_orig  several epochs of the originals of a quarter of those plays (doc_fraction 0.05)
  epochs_cycle the same plays and epochs, epoch e reading variant e mod 2 (modern, folio, ...)

A small model and short runs so that it fits in minutes on 2 CPU cores. Also an example of
`data.sources` (README, docs/data.md).
"""
import os

from experiments.studies import apply
from moejax.configs import base_config

TITLE = 'Epochs of originals vs epochs of rephrasings (variants), one token budget'


def source(doc_fraction, epochs, policy):
  def edit(c):
    s = c.data.sources.shakespeare
    s.doc_fraction, s.epochs, s.variant_policy = doc_fraction, epochs, policy
  return edit


VARIANTS = {
    'one_pass': source(0.2, 1, 'original'),
    'epochs_orig': source(0.05, 8, 'original'),
    'epochs_cycle': source(0.05, 8, 'cycle'),
}


def about(runs):
  c = next(iter(runs.values())).config
  m, t = c.model, c.train
  return (f'Model: d_model {m.d_model}, {m.num_layers} layers, {m.num_experts} experts top-{m.top_k}, vocab '
          f'{m.vocab_size}; {t.steps} steps x {t.batch_size} x {t.seq_len} tokens = '
          f'{t.steps * t.batch_size * t.seq_len:,} training tokens per run, one device. Held-out loss: the '
          f'originals of the same held-out plays (`val` split of {c.data.dir}), {t.eval_batches} batches. Small '
          'and short on purpose (minutes on 2 CPU cores): a direction, not a result.')


ABOUT = about


def _last(r, key, fmt):
  return format(r.train[-1].get(f'data/shakespeare/{key}', 0), fmt)


COLUMNS = {
    'plays (doc_fraction)': lambda r: f'{r.config.data.sources.shakespeare.doc_fraction:g}',
    'variant policy': lambda r: r.config.data.sources.shakespeare.variant_policy,
    'epochs reached': lambda r: _last(r, 'epoch', '.2f'),
    'tokens seen': lambda r: _last(r, 'source_tokens', ',.0f'),
    'docs read per variant (modern, folio)': lambda r: f'{_last(r, "variant0_docs", "g")}, '
                                                       f'{_last(r, "variant1_docs", "g")}',
    'held-out loss (final)': lambda r: f'{r.final_eval:.3f}',
    'best held-out loss': lambda r: f'{min(x["eval/loss"] for x in r.evals):.3f}',
    'wall s': lambda r: f'{r.wall_s:.0f}',
}


def get_config(variant=None):
  c = base_config()
  c.data.sources = {'shakespeare': {'dir': c.data.dir, 'weight': 1.0, 'epochs': 1,
                                    'variant_policy': 'original', 'doc_fraction': 0.2}}
  m = c.model
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 64, 3, 1, 128
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 4, 2, 16
  m.num_experts, m.top_k, m.expert_ffn_dim = 8, 2, 32
  c.train.steps, c.train.batch_size, c.train.seq_len = 320, 16, 64
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 40, 8
  c.optim.lr, c.optim.warmup_steps = 3e-3, 20
  c.checkpoint.every = 10_000
  c.mesh.data = 1
  return apply(c, VARIANTS, variant)


def plot(runs, path):
  """Held-out loss over steps, one line per run (results/epochs_loss.png beside results/epochs.md)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in runs.values():
    ax.plot([x['step'] for x in r.evals], [x['eval/loss'] for x in r.evals], marker='o', label=r.name)
  ax.set_xlabel('step'), ax.set_ylabel('held-out loss'), ax.legend(), ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.splitext(path)[0] + '_loss.png'
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return [f'![held-out loss]({os.path.basename(out)})']
