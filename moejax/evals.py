"""What the training loop evaluates: held-out loss and bits per byte of every eval source, and
downstream tasks.

Eval sources: `main` (data.dir's val split; its loss is also `eval/loss`), each source of a mixture
(its own dir's val split) and each extra text set of `eval.text` ('name=path,...': .txt files are
one document each, .jsonl files one document per record's "text"), tokenized with the run's
tokenizer. Each writes `eval/<source>/loss` and `eval/<source>/bpb` every `train.eval_every` steps.
Downstream tasks (`eval.tasks`, moejax.tasks files) are scored every `eval.every` steps:
`eval/<task>/acc`, `acc_norm`, `centered`, and `eval/core` (their mean centred accuracy).
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from moejax import bpb
from moejax.data import pipeline
from moejax.errors import ConfigError
from moejax.eval import Scorer, evaluate
from moejax.tasks import TaskError, check_tokenizer, read_tasks


@dataclasses.dataclass
class EvalSource:
  name: str
  batches: list          # host batches (dicts of [B, T] arrays), in stream order
  num_targets: int
  num_bytes: int


def parse_text_sets(spec: str) -> list[tuple[str, str]]:
  out = []
  for item in [s for s in spec.split(',') if s.strip()]:
    name, sep, path = item.partition('=')
    if not sep or not name.strip() or not path.strip():
      raise ConfigError(f"eval.text: {item!r} is not 'name=path'")
    if not Path(path.strip()).is_file():
      raise ConfigError(f'eval.text: {path.strip()}: no such file')
    out.append((name.strip(), path.strip()))
  return out


def read_documents(path: str) -> list[str]:
  if path.endswith('.jsonl'):
    docs = []
    for n, line in enumerate(Path(path).read_text(encoding='utf-8').splitlines(), 1):
      if line.strip():
        try:
          docs.append(json.loads(line)['text'])
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ConfigError(f'eval.text: {path}:{n}: not a JSON record with a "text" string') from None
    return docs
  return [Path(path).read_text(encoding='utf-8')]


def text_batches(tokenizer, path: str, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
  """Documents + EOD as one token stream cut into consecutive [batch_size, seq_len] batches (at most
  max_batches; a text shorter than one batch wraps around)."""
  stream = []
  for doc in read_documents(path):
    stream += tokenizer.encode(doc) + [tokenizer.eod_id]
  if len(stream) < 2:
    raise ConfigError(f'eval.text: {path}: no text')
  per_batch = batch_size * seq_len
  num = max(1, min(max_batches, (len(stream) - 1) // per_batch))
  need = num * per_batch + 1
  stream = np.resize(np.asarray(stream, np.int32), max(need, len(stream)))
  batches = []
  for b in range(num):
    flat = stream[b * per_batch:(b + 1) * per_batch + 1]
    windows = np.stack([flat[r * seq_len:(r + 1) * seq_len + 1] for r in range(batch_size)])
    batches.append(pipeline.windows_to_batch(windows, tokenizer.eod_id))
  return batches


def eval_sources(config, tokenizer) -> list[EvalSource]:
  t = config.train
  shape = dict(seq_len=t.seq_len, batch_size=t.batch_size, max_batches=t.eval_batches)
  named = [('main', pipeline.eval_batches(config.data.dir, **shape))]
  if config.data.get('sources'):   # a mixture: each source's own held-out split too
    named += [(s.name, pipeline.eval_batches(s.dir, **shape)) for s in pipeline.sources_from_config(config.data)]
  for name, path in parse_text_sets(config.eval.text):
    named.append((name, text_batches(tokenizer, path, **shape)))
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise ConfigError(f'eval sources: duplicate names {sorted(n for n in set(names) if names.count(n) > 1)}')
  return [EvalSource(n, b, *bpb.target_bytes(tokenizer, b)) for n, b in named]


def source_metrics(source: EvalSource, loss: float) -> dict:
  return {f'eval/{source.name}/loss': loss,
          f'eval/{source.name}/bpb': bpb.bits_per_byte(loss, source.num_targets, source.num_bytes)}


class Downstream:
  """The run's downstream tasks, read and checked before training starts, scored on the live state."""

  def __init__(self, config, s, tokenizer):
    from moejax import sharding
    e = config.eval
    try:
      self.tasks = read_tasks(e.tasks) if e.tasks else []
      for task in self.tasks:
        check_tokenizer(task, tokenizer)
    except TaskError as err:
      raise ConfigError(f'eval.tasks: {err}') from None
    if e.max_examples:
      self.tasks = [dataclasses.replace(t, examples=t.examples[:e.max_examples]) for t in self.tasks]
    self.every = e.every or config.train.eval_every
    self.num_fewshot = e.num_fewshot
    self.scorer = Scorer(None, None, s.model, s.mesh, tokenizer, int(config.train.seq_len),
                         sharding.batch_axes(dict(config.sharding), s.mesh))

  def due(self, step: int, last: int) -> bool:
    return bool(self.tasks) and (step % self.every == 0 or step == last)

  def __call__(self, state) -> dict:
    self.scorer.params, self.scorer.router_bias = state['params'], state['router_bias']
    record, centered = {}, []
    for task in self.tasks:
      r = evaluate(self.scorer, task, self.num_fewshot)
      record.update({f'eval/{task.name}/{k}': v for k, v in r.items() if k != 'n'})
      centered.append(r['centered'])
    record['eval/core'] = float(np.mean(centered))
    return record
