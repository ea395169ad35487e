"""Scoring throughput of moejax.eval against the training step on the same config (one device).

    python -m moejax.tools.bench_eval --out=docs/eval_perf.md [--experiment=experiments/default.py]

A multiple-choice task like the acceptance one (a 40-word context from the held-out split, the true
next 8 words and 3 random 8-word spans) is scored by moejax.eval's Scorer at the model's init
weights (the cost does not depend on their values). Reported: tokens/s of the scored continuations,
of every real (unpadded) token of the rows, the padding share; against the training step's tokens/s
(forward + backward + update) and a forward pass alone over full training batches.
"""
import random
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from moejax import model
from moejax.data import pipeline, shards
from moejax.data.ensure import ensure_data
from moejax.eval import Scorer, bucket_length, evaluate
from moejax.state import init_state, setup
from moejax.tasks import Example, Task
from moejax.tools import bench, provenance

flags.DEFINE_string('out', 'docs/eval_perf.md', 'markdown file to write')
flags.DEFINE_string('experiment', 'experiments/default.py', 'experiment config file')
flags.DEFINE_integer('examples', 200, 'task examples (4 choices each)')
flags.DEFINE_integer('steps', 10, 'timed training steps')
flags.DEFINE_integer('repeats', 3, 'timed scoring passes (best reported)')
FLAGS = flags.FLAGS


def continuation_task(tokenizer, batches, n: int, seed: int = 3) -> Task:
  """n examples: 40 words of held-out text, the true next 8 words and 3 random 8-word spans."""
  words = ' '.join(tokenizer.decode(b['inputs'].reshape(-1).tolist()) for b in batches).split()
  rng = random.Random(seed)
  span = lambda i, k: ' '.join(words[i:i + k])
  examples = []
  for _ in range(n):
    i = rng.randrange(0, len(words) - 60)
    choices = [' ' + span(i + 40, 8)] + [' ' + span(rng.randrange(0, len(words) - 60), 8) for _ in range(3)]
    rng.shuffle(choices)
    examples.append(Example((span(i, 40),), tuple(choices), choices.index(' ' + span(i + 40, 8))))
  return Task('continuation', 'choice', tuple(examples))


def main(argv):
  del argv
  cmd, commit = provenance.command('moejax.tools.bench_eval'), provenance.commit()
  config = bench.prepare(bench.load_config(FLAGS.experiment), 'auto')
  ensure_data(config)
  t = config.train
  train = bench.run_steps(config, FLAGS.steps, warmup=2)
  s = setup(config, devices=jax.devices()[:1])
  state = init_state(s)
  tokenizer = shards.load_tokenizer(config.data.dir)
  batches = pipeline.eval_batches(config.data.dir, seq_len=t.seq_len, batch_size=t.batch_size, max_batches=8)

  fwd = jax.jit(lambda p, b, x: model.forward(p, b, x, s.model, s.mesh)[0])
  x = jnp.asarray(batches[0]['inputs'])
  fwd_s = bench.time_fn(fwd, state['params'], state['router_bias'], x, repeats=5)
  forward_tps = x.size / fwd_s

  task = continuation_task(tokenizer, batches, FLAGS.examples)
  scorer = Scorer(state['params'], state['router_bias'], s.model, s.mesh, tokenizer, int(t.seq_len),
                  rows=t.batch_size)
  evaluate(scorer, task)   # compiles every length bucket
  best = float('inf')
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    evaluate(scorer, task)
    best = min(best, time.perf_counter() - start)
  rows = [(c, e.context(i)) for e in task.examples for i, c in enumerate(e.continuations)]
  cont_tokens = sum(len(tokenizer.encode(c)) for c, _ in rows)
  real_tokens = sum(1 + len(tokenizer.encode(ctx)) + len(tokenizer.encode(c)) for c, ctx in rows)
  lengths = sorted(1 + len(tokenizer.encode(ctx)) + len(tokenizer.encode(c)) for c, ctx in rows)
  padded = 0
  for b in range(0, len(lengths), scorer.rows):
    group = lengths[b:b + scorer.rows]
    padded += scorer.rows * bucket_length(max(group))
  cont_tps, real_tps = cont_tokens / best, real_tokens / best
  train_tps = train['tokens_per_sec']
  lines = [
      '# Scoring throughput (moejax.eval)', '',
      f'Command: `{cmd}`  ', f'Commit: `{commit}`  ',
      f'Model: {bench.describe(config.model, t.batch_size, t.seq_len)}; {jax.devices()[0].platform}, one device.',
      '',
      f'Task: {len(task.examples)} examples x 4 choices = {len(rows)} rows (40-word held-out context, '
      f'8-word continuations), {scorer.rows} rows per batch, lengths padded to multiples of 16.', '',
      '| measure | tokens/s |', '|---|---|',
      f'| training step (forward + backward + update), batch {t.batch_size} x {t.seq_len} | {train_tps:,.0f} |',
      f'| forward only, batch {t.batch_size} x {t.seq_len} | {forward_tps:,.0f} |',
      f'| scoring: scored continuation tokens | {cont_tps:,.0f} |',
      f'| scoring: every real token of the rows (context + continuation) | {real_tps:,.0f} |',
      '',
      f'Padding: {1 - real_tokens / padded:.0%} of the scored batches\' positions. '
      f'Scoring the task took {best:.2f} s (best of {FLAGS.repeats}).', '',
      '## Target', '',
      f'- scored continuation tokens/s / training step tokens/s = {cont_tps / train_tps:.2f} '
      f'(target >= 0.5: {"met" if cont_tps / train_tps >= 0.5 else "NOT met"})',
      f'- scored continuation tokens/s / forward-only tokens/s = {cont_tps / forward_tps:.2f} '
      '(each continuation needs its whole context in its row: ~5 context tokens per scored token here)',
      f'- real row tokens/s / forward-only tokens/s = {real_tps / forward_tps:.2f} '
      '(the scorer\'s own efficiency: batching and padding)',
  ]
  with open(FLAGS.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return 0


if __name__ == '__main__':
  app.run(main)
