"""`make ablate-epochs`: one token budget spent three ways on the Shakespeare source (modern +
First Folio editions of each play as two variants), same model, same held-out documents:

  one_pass     one epoch over the originals of a set of plays (doc_fraction 0.2)
  epochs_orig  several epochs of the originals of a quarter of those plays (doc_fraction 0.05)
  epochs_cycle the same plays and epochs, epoch e reading variant e mod 2 (modern, folio, ...)

Writes results/epochs.md (held-out loss, tokens and epochs per source, from each run's
metrics.jsonl) and results/epochs_loss.png. A small model and short runs so it fits in minutes
on 2 CPU cores: `python -m experiments.ablate_epochs --out=results/epochs.md`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from moejax.configs import base_config

RUNS = {  # name -> (doc_fraction, epochs, variant_policy)
    'one_pass': (0.2, 1, 'original'),
    'epochs_orig': (0.05, 8, 'original'),
    'epochs_cycle': (0.05, 8, 'cycle'),
}


def get_config(run: str = 'one_pass'):
  c = base_config()
  doc_fraction, epochs, policy = RUNS[run]
  c.data.sources = {'shakespeare': {'dir': c.data.dir, 'weight': 1.0, 'epochs': epochs,
                                    'variant_policy': policy, 'doc_fraction': doc_fraction}}
  m = c.model
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 64, 3, 1, 128
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
  m.num_experts, m.top_k, m.expert_ffn_dim = 8, 2, 32
  c.train.steps, c.train.batch_size, c.train.seq_len = 320, 16, 64
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 40, 8
  c.optim.lr, c.optim.warmup_steps = 3e-3, 20
  c.checkpoint.every = 10_000
  c.mesh.data = 1
  return c


def read(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default='results/epochs.md')
  p.add_argument('--workdir', default='runs/ablate_epochs')
  a = p.parse_args()
  records, times = {}, {}
  for run in RUNS:
    wd = os.path.join(a.workdir, run)
    subprocess.run(['rm', '-rf', wd], check=True)
    start = time.time()
    subprocess.run([sys.executable, '-m', 'moejax.train',
                    f'--config=experiments/ablate_epochs.py:{run}', f'--workdir={wd}'], check=True)
    times[run], records[run] = time.time() - start, read(wd)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
  c = get_config()
  budget = c.train.steps * c.train.batch_size * c.train.seq_len
  lines = [
      '# Epochs of originals vs epochs of rephrasings (variants), one token budget',
      '',
      f'Written by `make ablate-epochs` (`python -m experiments.ablate_epochs`) at commit {commit}.',
      f'Model: d_model {c.model.d_model}, {c.model.num_layers} layers, {c.model.num_experts} experts top-{c.model.top_k}, '
      f'vocab {c.model.vocab_size}; {c.train.steps} steps x {c.train.batch_size} x {c.train.seq_len} tokens = '
      f'{budget:,} training tokens per run, CPU, one device. Held-out loss: the originals of the same '
      f'held-out plays (`val` split of {c.data.dir}), {c.train.eval_batches} batches. Small and short on purpose '
      '(minutes on 2 CPU cores): a direction, not a result.',
      '',
      '| run | plays (doc_fraction) | variant policy | epochs reached | tokens seen | docs read per variant (modern, folio) | held-out loss (final) | best held-out loss | wall s |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for run, recs in records.items():
    frac, _, policy = RUNS[run]
    train = [r for r in recs if 'loss' in r][-1]
    evals = [r['eval/loss'] for r in recs if 'eval/loss' in r]
    variants = ', '.join(str(train.get(f'data/shakespeare/variant{v}_docs', 0)) for v in range(2))
    lines.append(f'| {run} | {frac} | {policy} | {train["data/shakespeare/epoch"]:.2f} | '
                 f'{train["data/shakespeare/source_tokens"]:,} | {variants} | {evals[-1]:.3f} | {min(evals):.3f} | {times[run]:.0f} |')
  lines += ['', '![held-out loss](epochs_loss.png)', '']
  os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
  with open(a.out, 'w') as f:
    f.write('\n'.join(lines))
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for run, recs in records.items():
    ev = [(r['step'], r['eval/loss']) for r in recs if 'eval/loss' in r]
    ax.plot(*zip(*ev), marker='o', label=run)
  ax.set_xlabel('step'), ax.set_ylabel('held-out loss'), ax.legend(), ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(os.path.dirname(a.out) or '.', 'epochs_loss.png'), dpi=100)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
