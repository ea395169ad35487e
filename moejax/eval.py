"""Downstream tasks scored by log-likelihood on a run's checkpoint:
`python -m moejax.eval --workdir=runs/X --tasks=FILE_OR_DIR[,...] [--num_fewshot=K] [--out=results.json] [--step=N]`.

A task is a local JSONL file (a directory: its *.jsonl), one record a line:
- multiple choice: {"context": str, "choices": [str, ...], "label": int}. Each choice is scored by the
  sum of its tokens' log-probabilities after the context: `acc` picks the largest sum, `acc_norm`
  the largest sum per UTF-8 byte of the choice (lm-eval's normalisation);
- language modelling: {"context": str, "target": str}: `acc` = the target is the greedy continuation
  (every target token is the argmax), LAMBADA-style.
Few-shot: K other records of the same file (seeded, the same for every record), each its context
followed by its answer, blank-line separated, before the record's context.

Scoring is batched: (context, continuation) rows padded on the right to a power-of-two length (causal
attention: padding never changes an earlier position), scored by one jitted forward per batch.
Prints `<task>: acc 0.xxx acc_norm 0.xxx (n examples)` per task and writes the results as JSON.
"""
import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import numpy as np

BATCH_ROWS = 16


class TaskError(ValueError):
  """A bad task file or record: one line naming the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  continuations: tuple[str, ...]   # the choices, or the one LM target
  label: int                       # index of the right continuation (0 for an LM task)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str                        # 'choice' | 'lm'
  examples: tuple[Example, ...]


def read_task(path: Path) -> Task:
  """Reads and checks one task file."""
  examples, kinds = [], set()
  for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    where = f'{path}:{n}'
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskError(f'{where}: not JSON ({e.msg})') from None
    if not isinstance(rec, dict) or not isinstance(rec.get('context'), str):
      raise TaskError(f"{where}: missing field 'context' (a string)")
    if 'choices' in rec:
      choices, label = rec['choices'], rec.get('label')
      if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
      if not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskError(f"{where}: 'label' {label!r} out of range for {len(choices)} choices")
      examples.append(Example(rec['context'], tuple(choices), label))
      kinds.add('choice')
    elif isinstance(rec.get('target'), str):
      examples.append(Example(rec['context'], (rec['target'],), 0))
      kinds.add('lm')
    else:
      raise TaskError(f"{where}: missing field 'choices' (multiple choice) or 'target' (LM task)")
  if not examples:
    raise TaskError(f'{path}: no records')
  if len(kinds) > 1:
    raise TaskError(f'{path}: mixes multiple-choice and LM records')
  return Task(path.stem, kinds.pop(), tuple(examples))


def task_files(specs: list[str]) -> list[Path]:
  out = []
  for spec in specs:
    p = Path(spec)
    if p.is_dir():
      out += sorted(p.glob('*.jsonl'))
    elif p.is_file():
      out.append(p)
    else:
      raise TaskError(f'--tasks {spec}: no such file or directory')
  return out


def with_fewshot(task: Task, k: int, seed: int = 1234) -> list[str]:
  """Each example's prompt: k other examples (context + answer) then its own context."""
  if k == 0:
    return [e.context for e in task.examples]
  rng = random.Random(seed)
  pool = list(range(len(task.examples)))
  prompts = []
  for i, e in enumerate(task.examples):
    shots = rng.sample([j for j in pool if j != i], min(k, len(pool) - 1))
    prefix = ''.join(task.examples[j].context + task.examples[j].continuations[task.examples[j].label]
                     + '\n\n' for j in shots)
    prompts.append(prefix + e.context)
  return prompts


class Scorer:
  """Log-likelihood of continuations under a checkpoint (one device)."""

  def __init__(self, workdir: str, step: int | None = None):
    import jax
    from moejax import sample
    from moejax.data import shards
    self.config, self.mesh, state = sample.load(workdir, step)
    self.params, self.router_bias = state['params'], state['router_bias']
    self.tokenizer = shards.load_tokenizer(self.config.data.dir)
    from moejax.model_config import ModelConfig
    self.model = ModelConfig.from_config(self.config.model)
    self.max_len = int(self.config.train.seq_len)
    self._score = jax.jit(self._score_fn)

  def _score_fn(self, params, router_bias, tokens_BT, mask_BT):
    import jax
    import jax.numpy as jnp
    from moejax import model
    logits_BTV, _ = model.forward(params, router_bias, tokens_BT[:, :-1], self.model, self.mesh)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    targets_BT = tokens_BT[:, 1:]
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    m = mask_BT[:, 1:]
    return (jnp.sum(logp_BT * m, axis=1), jnp.sum(greedy_BT * m, axis=1), jnp.sum(m, axis=1))

  def score(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum log-prob, greedy-matched tokens, tokens) of each continuation after its context."""
    rows = []
    for ctx, cont in pairs:
      c_ids, t_ids = self.tokenizer.encode(ctx), self.tokenizer.encode(cont)
      ids = ([self.tokenizer.eod_id] + c_ids + t_ids)[-(self.max_len + 1):]   # cut the context's start
      rows.append((ids, min(len(t_ids), len(ids) - 1)))
    out = [np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))]
    order = np.argsort([len(r[0]) for r in rows], kind='stable')   # similar lengths share a batch
    for b in range(0, len(rows), BATCH_ROWS):
      idx = order[b:b + BATCH_ROWS]
      length = max(16, 1 << math.ceil(math.log2(max(len(rows[i][0]) for i in idx))))
      tokens = np.full((BATCH_ROWS, length), self.tokenizer.eod_id, np.int32)
      mask = np.zeros((BATCH_ROWS, length), np.float32)
      for r, i in enumerate(idx):
        ids, n_cont = rows[i]
        tokens[r, :len(ids)] = ids
        mask[r, len(ids) - n_cont:len(ids)] = 1.0
      res = [np.asarray(x) for x in self._score(self.params, self.router_bias, tokens, mask)]
      for k in range(3):
        out[k][idx] = res[k][:len(idx)]
    return tuple(out)


def evaluate(scorer: Scorer, task: Task, num_fewshot: int = 0) -> dict:
  prompts = with_fewshot(task, num_fewshot)
  pairs = [(p, c) for p, e in zip(prompts, task.examples) for c in e.continuations]
  logp, greedy, count = scorer.score(pairs)
  if task.kind == 'lm':
    return {'acc': float(np.mean(greedy == count)), 'n': len(task.examples)}
  acc, acc_norm, k = [], [], 0
  for e in task.examples:
    n = len(e.continuations)
    lp = logp[k:k + n]
    nbytes = np.array([max(1, len(c.encode('utf-8'))) for c in e.continuations])
    acc.append(int(np.argmax(lp)) == e.label)
    acc_norm.append(int(np.argmax(lp / nbytes)) == e.label)
    k += n
  return {'acc': float(np.mean(acc)), 'acc_norm': float(np.mean(acc_norm)), 'n': len(task.examples)}


def main(argv: list[str] | None = None) -> int:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--tasks', required=True, help='task JSONL files or directories, comma-separated')
  p.add_argument('--num_fewshot', type=int, default=0)
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  p.add_argument('--out', default=None, help='write the results here as JSON')
  a = p.parse_args(argv)
  try:
    tasks = [read_task(f) for f in task_files([t for t in a.tasks.split(',') if t])]
    scorer = Scorer(a.workdir, a.step)
  except (TaskError, FileNotFoundError) as e:
    print(f'eval: error: {e}', file=sys.stderr)
    return 2
  results = {}
  for task in tasks:
    r = results[task.name] = evaluate(scorer, task, a.num_fewshot)
    metrics = ' '.join(f'{k} {v:.3f}' for k, v in r.items() if k != 'n')
    print(f'{task.name}: {metrics} ({r["n"]} examples, {a.num_fewshot}-shot)', flush=True)
  if a.out:
    Path(a.out).write_text(json.dumps({'workdir': a.workdir, 'num_fewshot': a.num_fewshot,
                                       'tasks': results}, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
