"""Downstream tasks scored by log-likelihood on a run's checkpoint:
`python -m moejax.eval --workdir=runs/X --tasks=FILE_OR_DIR[,...] [--num_fewshot=K] [--out=results.json]
[--step=N] [--all_devices]`. Task files: moejax.tasks.

Multiple choice: each choice is scored by the sum of its tokens' log-probabilities after its context;
`acc` picks the largest sum, `acc_norm` the largest sum per UTF-8 byte of the choice (lm-eval's
normalisation), `centered` is CORE's (acc - random baseline) / (1 - random baseline). LM tasks:
`acc` = the target is the greedy continuation (every target token is the argmax). The CORE line
is the mean centred accuracy over the tasks.

Scoring is batched on the mesh: (context, continuation) rows padded on the right to a multiple of
16 tokens (causal attention: padding never changes an earlier position), rows split over the batch
axes, one jitted forward per batch; the same numbers on 1 and 8 devices.
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from moejax.tasks import Task, TaskError, check_tokenizer, read_tasks, with_fewshot

BATCH_ROWS = 16


class Scorer:
  """Log-likelihood of continuations under a model's weights, batched over the mesh's batch axes.
  `params` / `router_bias` may be replaced between calls (the training loop scores its live state)."""

  def __init__(self, params, router_bias, model_cfg, mesh, tokenizer, max_len: int,
               batch_axes: tuple = (), rows: int = BATCH_ROWS):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    self.params, self.router_bias = params, router_bias
    self.model, self.mesh, self.tokenizer, self.max_len = model_cfg, mesh, tokenizer, max_len
    split = math.prod(mesh.shape[a] for a in batch_axes)
    self.rows = -(-rows // split) * split           # a multiple of the devices the rows split over
    self.row_sharding = NamedSharding(mesh, P(batch_axes or None))
    self.batch_axes = batch_axes
    self._score = jax.jit(self._score_fn, out_shardings=NamedSharding(mesh, P()))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, all_devices: bool = False):
    from moejax import sample, sharding
    from moejax.model_config import ModelConfig
    config, mesh, state = sample.load(workdir, step, all_devices=all_devices)
    tokenizer = sample.run_tokenizer(workdir, config)
    axes = sharding.batch_axes(dict(config.sharding), mesh)
    scorer = cls(state['params'], state['router_bias'], ModelConfig.from_config(config.model), mesh,
                 tokenizer, int(config.train.seq_len), axes)
    scorer.config = config   # the run's config (generation reads it)
    return scorer

  def _score_fn(self, params, router_bias, tokens_BT, mask_BT):
    import jax
    import jax.numpy as jnp
    from moejax import model
    logits_BTV, _ = model.forward(params, router_bias, tokens_BT[:, :-1], self.model, self.mesh,
                                  self.batch_axes)
    logits_BTV = logits_BTV.astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)   # no second [B, T, V] array
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    m = mask_BT[:, 1:]
    return (jnp.sum(logp_BT * m, axis=1), jnp.sum(greedy_BT * m, axis=1), jnp.sum(m, axis=1))

  def _put(self, x):
    import jax
    return jax.make_array_from_callback(x.shape, self.row_sharding, lambda idx: x[idx])

  def score_ids(self, rows: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum log-prob, greedy-matched tokens, tokens) of the last n tokens of each (ids, n) row; a row
    is cut to its last max_len + 1 tokens."""
    rows = [(ids[-(self.max_len + 1):], min(n, len(ids[-(self.max_len + 1):]) - 1)) for ids, n in rows]
    out = [np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))]
    eod = self.tokenizer.eod_id
    order = np.argsort([len(r[0]) for r in rows], kind='stable')   # similar lengths share a batch
    for b in range(0, len(rows), self.rows):
      idx = order[b:b + self.rows]
      length = bucket_length(max(len(rows[i][0]) for i in idx))
      tokens = np.full((self.rows, length), eod, np.int32)
      mask = np.zeros((self.rows, length), np.float32)
      for r, i in enumerate(idx):
        ids, n_cont = rows[i]
        tokens[r, :len(ids)] = ids
        mask[r, len(ids) - n_cont:len(ids)] = 1.0
      res = self._score(self.params, self.router_bias, self._put(tokens), self._put(mask))
      for k in range(3):
        out[k][idx] = np.asarray(res[k])[:len(idx)]
    return tuple(out)

  def score(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """score_ids of each continuation after an end-of-document token and its context (the context's
    start is cut when the row is longer than the model's context). Each distinct string is encoded
    once (a task's choices share their context)."""
    texts = sorted({t for pair in pairs for t in pair})
    ids = dict(zip(texts, self.tokenizer.encode_batch(texts)))
    eod = [self.tokenizer.eod_id]
    return self.score_ids([(eod + ids[ctx] + ids[cont], len(ids[cont])) for ctx, cont in pairs])


def bucket_length(n: int) -> int:
  """Rows of a batch are padded to a multiple of 16 tokens (few compiled shapes, little padding)."""
  return max(16, -(-n // 16) * 16)


def evaluate(scorer: Scorer, task: Task, num_fewshot: int = 0) -> dict:
  prefixes = with_fewshot(task, num_fewshot)
  pairs = [(p + e.context(i), c) for p, e in zip(prefixes, task.examples)
           for i, c in enumerate(e.continuations)]
  logp, greedy, count = scorer.score(pairs)
  n = len(task.examples)
  if task.kind == 'lm':
    acc = float(np.mean(greedy == count))
    return {'acc': acc, 'centered': acc, 'n': n}
  acc, acc_norm, k = [], [], 0
  for e in task.examples:
    lp = logp[k:k + len(e.continuations)]
    nbytes = np.array([max(1, len(c.encode('utf-8'))) for c in e.continuations])
    acc.append(int(np.argmax(lp)) == e.label)
    acc_norm.append(int(np.argmax(lp / nbytes)) == e.label)
    k += len(e.continuations)
  acc, base = float(np.mean(acc)), task.random_baseline
  return {'acc': acc, 'acc_norm': float(np.mean(acc_norm)), 'centered': (acc - base) / (1 - base), 'n': n}


def format_line(name: str, r: dict, num_fewshot: int) -> str:
  metrics = ' '.join(f'{k} {v:.3f}' for k, v in r.items() if k != 'n')
  return f'{name}: {metrics} ({r["n"]} examples, {num_fewshot}-shot)'


def main(argv: list[str] | None = None) -> int:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--tasks', required=True, help='task JSONL files or directories, comma-separated')
  p.add_argument('--num_fewshot', type=int, default=0)
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  p.add_argument('--out', default=None, help='write the results here as JSON')
  p.add_argument('--all_devices', action='store_true', help='split the rows over every device')
  a = p.parse_args(argv)
  if a.num_fewshot < 0:
    p.error('--num_fewshot must be >= 0')
  try:
    tasks = read_tasks(a.tasks)
    scorer = Scorer.from_workdir(a.workdir, a.step, a.all_devices)
    for t in tasks:
      check_tokenizer(t, scorer.tokenizer)
  except (TaskError, FileNotFoundError, ValueError) as e:
    print(f'eval: error: {e}', file=sys.stderr)
    return 2
  results, core = {}, []
  for task in tasks:
    r = results[task.name] = evaluate(scorer, task, a.num_fewshot)
    core.append(r['centered'])
    print(format_line(task.name, r, a.num_fewshot), flush=True)
  print(f'CORE (mean centred accuracy over {len(tasks)} tasks): {np.mean(core):.3f}', flush=True)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    Path(a.out).write_text(json.dumps({'workdir': a.workdir, 'num_fewshot': a.num_fewshot,
                                       'core': float(np.mean(core)), 'tasks': results}, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
