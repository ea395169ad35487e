"""`make ablate-quality`: one token budget spent on a web-like source graded by a (loopback) judge:

  all                 every document, originals
  filtered            documents the classifier grades >= 3 (data.sources.web.min_score)
  filtered_rephrased  the same documents with their rephrasings as variants, read by `cycle`
                      (epoch 0 the originals, epoch 1 the rephrasings, ...)
  weighted            every grade, read score_weights times an epoch (0, 0, 0.5, 1, 2, 3)

The data is made first by `python -m moejax.tools.quality_data --out=data/quality` (the make target
runs it): see that module for the corpus and the judge's rule. Same small model as the epochs
study, minutes on 2 CPU cores: a direction, not a result.
"""
import json
import os

from experiments.studies import apply
from moejax.configs import base_config

TITLE = 'Judge-graded data: all vs filtered vs filtered + rephrased vs weighted, one token budget'
DATA = 'data/quality'


def edit(**fields):
  def f(c):
    for k, v in fields.items():
      setattr(c.data.sources.web, k, v)
  return f


VARIANTS = {
    'all': edit(),
    'filtered': edit(min_score=3),
    'filtered_rephrased': edit(dir=f'{DATA}/web_rephrased', min_score=3, variant_policy='cycle'),
    'weighted': edit(score_weights={'0': 0.0, '1': 0.0, '2': 0.5, '3': 1.0, '4': 2.0, '5': 3.0}),
}


def _json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def about(runs):
  c = next(iter(runs.values())).config
  m, t = c.model, c.train
  clf = _json(f'{DATA}/clf/classifier.json')
  held = clf.get('held_out', {})
  scores = _json(f'{DATA}/web/scores.json').get('splits', {}).get('train', {})
  labels = sum(1 for _ in open(f'{DATA}/labels.jsonl')) if os.path.exists(f'{DATA}/labels.jsonl') else 0
  return '\n\n'.join([
      'Data (`python -m moejax.tools.quality_data --out=data/quality`, run by `make ablate-quality` before '
      'the training): one source `web` of 2,000-character chunks: the modern editions of Hamlet and Macbeth '
      '(clean), as many chunks of generated syllable salad with ~10% real words (junk), and half as many '
      'clean chunks with 30-80% of their words replaced by such noise (mixed); held-out loss is measured '
      f'on The Tempest (`{c.data.dir}`, never trained on).',
      'Judge: moejax.tools.fake_llm on 127.0.0.1, rule `vocab`: grade = round half up(5 x the share of the '
      "document's words that are among the 2,000 most frequent words of the two training plays), sent the "
      f'FineWeb-Edu prompt by `judge label` for a seeded sample of {labels} documents. Classifier: `judge '
      f'train --features=frequency` (ridge on hashed word frequencies, alpha {clf.get("alpha", "?")}; the rule '
      f'is a share of words, which word frequencies express linearly): held-out accuracy '
      f'{held.get("accuracy", float("nan")):.3f}, macro-F1 {held.get("macro_f1", float("nan")):.3f}, F1 of grade '
      f'>= 3 {held.get("binary_f1", float("nan")):.3f} on {held.get("held_out", "?")} held-out labels. `judge score` '
      f'graded the train documents 0-5 as {scores.get("docs_per_bucket", "?")} (documents), '
      f'{scores.get("original_tokens_per_bucket", "?")} (tokens). Rephrasing: `rephrase --out_dir` (the stage) of '
      'the documents graded >= 3, style `simple`, by the loopback rephraser (archaic words -> modern ones).',
      f'Model: d_model {m.d_model}, {m.num_layers} layers, {m.num_experts} experts top-{m.top_k}, vocab '
      f'{m.vocab_size}; {t.steps} steps x {t.batch_size} x {t.seq_len} tokens = '
      f'{t.steps * t.batch_size * t.seq_len:,} training tokens per run, one device; held-out loss over '
      f'{t.eval_batches} batches of the held-out play. `filtered` and `filtered_rephrased` read the same '
      'documents in the same order in their first epoch (their curves coincide until it ends); from the second '
      'epoch on the latter reads the rephrasings. `all` is scored too but not filtered: its grade column shows '
      'what an unfiltered run reads.'])


ABOUT = about


def _last(r, key):
  return r.train[-1].get(f'data/web/{key}', 0) if r.train else 0


def _grades(r):
  toks = [_last(r, f'grade{g}_tokens') for g in range(6)]
  total = sum(toks) or 1
  return ' / '.join(f'{100 * x / total:.0f}' for x in toks)


COLUMNS = {
    'source': lambda r: f'`{r.config.data.sources.web.dir}`',
    'epochs reached': lambda r: f'{_last(r, "epoch"):.2f}',
    'tokens read by grade 0/1/2/3/4/5 (%)': _grades,
    'rephrasings read (docs)': lambda r: f'{_last(r, "variant1_docs"):g}',
    'held-out loss (final)': lambda r: f'{r.final_eval:.3f}',
    'best held-out loss': lambda r: f'{min(x["eval/loss"] for x in r.evals):.3f}' if r.evals else 'n/a',
    'wall s': lambda r: f'{r.wall_s:.0f}',
}


def get_config(variant=None):
  c = base_config()
  c.data.dir = f'{DATA}/heldout'
  c.data.raw = ''   # made by moejax.tools.quality_data, not by training
  c.data.sources = {'web': {'dir': f'{DATA}/web', 'weight': 1.0, 'epochs': 0, 'variant_policy': 'original',
                            'doc_fraction': 1.0, 'min_score': None, 'score_weights': None}}
  m = c.model
  m.vocab_size = 1024
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 64, 3, 1, 128
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 4, 2, 16
  m.num_experts, m.top_k, m.expert_ffn_dim = 8, 2, 32
  c.train.steps, c.train.batch_size, c.train.seq_len = 240, 16, 64
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 40, 8
  c.optim.lr, c.optim.warmup_steps = 3e-3, 20
  c.checkpoint.every = 10_000
  c.mesh.data = 1
  return apply(c, VARIANTS, variant)


def plot(runs, path):
  """Held-out loss over steps, one line per run (results/quality_loss.png beside results/quality.md)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for r in runs.values():
    line, = a.plot([x['step'] for x in r.evals], [x['eval/loss'] for x in r.evals], marker='o', label=r.name)
    b.plot([x['step'] for x in r.train], [x['loss'] for x in r.train], color=line.get_color(), label=r.name)
  a.set_title('held-out loss (The Tempest)'), b.set_title('training loss (on what each run reads)')
  for ax in (a, b):
    ax.set_xlabel('step'), ax.legend(), ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.splitext(path)[0] + '_loss.png'
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return [f'![loss curves]({os.path.basename(out)})']
