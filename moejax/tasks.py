"""Downstream task files: reading and checking them, and few-shot prompts.

A task is a local JSONL file (a directory: its *.jsonl), one record a line:
- multiple choice: {"context": str, "choices": [str, ...], "label": int}; "context" may instead be a
  list with one context per choice (partial scoring, as WinoGrande: the choices differ before the
  part that is scored);
- language modelling: {"context": str, "target": str} (LAMBADA-style: is the target the greedy
  continuation?).
A record may carry "split": "train" | "test" (default test): few-shot examples come from a file's
train records when it has any, else from its other records; and "description": text that goes
before the shots and the context (MMLU's "The following are ... about {subject}."); shots come from
records with the same description where there are any (MMLU: the same subject). The file's stem
names the task.
"""
import dataclasses
import json
import random
from pathlib import Path


class TaskError(ValueError):
  """A bad task file or record: one line naming the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Example:
  contexts: tuple[str, ...]        # one context, or one per continuation
  continuations: tuple[str, ...]   # the choices, or the one LM target
  label: int                       # index of the right continuation (0 for an LM task)
  where: str = ''                  # file:line, for error messages
  description: str = ''            # before the shots and the context

  def context(self, i: int) -> str:
    return self.contexts[i if len(self.contexts) > 1 else 0]

  def answer(self) -> str:
    """The example written out with its right answer (a few-shot shot)."""
    return self.context(self.label) + self.continuations[self.label]


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str                        # 'choice' | 'lm'
  examples: tuple[Example, ...]    # the scored (test) records
  shots: tuple[Example, ...] = ()  # the train records few-shot prompts draw from (empty: examples)

  @property
  def random_baseline(self) -> float:
    """Expected accuracy of guessing: mean of 1 / choices (0 for LM tasks)."""
    if self.kind == 'lm':
      return 0.0
    return sum(1 / len(e.continuations) for e in self.examples) / len(self.examples)


def _description(rec: dict, where: str) -> str:
  d = rec.get('description', '')
  if not isinstance(d, str):
    raise TaskError(f"{where}: 'description' must be a string")
  return d


def _example(rec, where: str) -> tuple[Example, str]:
  if not isinstance(rec, dict):
    raise TaskError(f'{where}: a record must be a JSON object')
  ctx = rec.get('context')
  if 'choices' in rec:
    choices, label = rec['choices'], rec.get('label')
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
      raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
      raise TaskError(f"{where}: 'label' {label!r} out of range for {len(choices)} choices")
    if isinstance(ctx, list):
      if len(ctx) != len(choices) or not all(isinstance(c, str) for c in ctx):
        raise TaskError(f"{where}: a list 'context' needs one string per choice ({len(choices)})")
      contexts = tuple(ctx)
    elif isinstance(ctx, str):
      contexts = (ctx,)
    else:
      raise TaskError(f"{where}: missing field 'context' (a string, or one per choice)")
    return Example(contexts, tuple(choices), label, where, _description(rec, where)), 'choice'
  if not isinstance(ctx, str):
    raise TaskError(f"{where}: missing field 'context' (a string)")
  if isinstance(rec.get('target'), str):
    if not rec['target']:
      raise TaskError(f"{where}: 'target' is empty")
    return Example((ctx,), (rec['target'],), 0, where, _description(rec, where)), 'lm'
  raise TaskError(f"{where}: missing field 'choices' (multiple choice) or 'target' (LM task)")


def read_task(path: Path) -> Task:
  """Reads and checks one task file."""
  path = Path(path)
  test, train, kinds = [], [], set()
  for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    where = f'{path}:{n}'
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskError(f'{where}: not JSON ({e.msg})') from None
    example, kind = _example(rec, where)
    kinds.add(kind)
    split = rec.get('split', 'test')
    if split not in ('train', 'test'):
      raise TaskError(f"{where}: 'split' {split!r} is neither 'train' nor 'test'")
    (train if split == 'train' else test).append(example)
  if not test:
    raise TaskError(f'{path}: no (test) records')
  if len(kinds) > 1:
    raise TaskError(f'{path}: mixes multiple-choice and LM records')
  return Task(path.stem, kinds.pop(), tuple(test), tuple(train))


def task_files(specs: list[str]) -> list[Path]:
  out = []
  for spec in specs:
    p = Path(spec)
    if p.is_dir():
      found = sorted(p.glob('*.jsonl'))
      if not found:
        raise TaskError(f'tasks {spec}: a directory without *.jsonl task files')
      out += found
    elif p.is_file():
      out.append(p)
    else:
      raise TaskError(f'tasks {spec}: no such file or directory')
  return out


def read_tasks(spec: str) -> list[Task]:
  """The tasks of a comma-separated list of files and directories."""
  return [read_task(f) for f in task_files([t for t in spec.split(',') if t])]


def with_fewshot(task: Task, k: int, seed: int = 1234) -> list[str]:
  """Each example's prompt prefix: its description, then k examples with their answers, blank-line
  separated, drawn (seeded, so every run and device count sees the same prompts) from the train
  records (those with the example's description when there are any), or from the other records
  when the file has no train records."""
  if k == 0:
    return [e.description for e in task.examples]
  rng = random.Random(seed)
  pool = task.shots or task.examples
  by_description = {}
  for s in pool:
    by_description.setdefault(s.description, []).append(s)
  prefixes = []
  for e in task.examples:
    group = by_description.get(e.description, pool)
    picks = [group[i] for i in rng.sample(range(len(group)), min(k + 1, len(group)))]
    shots = [s for s in picks if s is not e][:k]
    prefixes.append(e.description + ''.join(s.answer() + '\n\n' for s in shots))
  return prefixes


def check_tokenizer(task: Task, tokenizer):
  """Refuses a task whose text the tokenizer cannot spell back (its vocabulary was not made for this
  text: unknown characters would be scored as something else)."""
  for e in task.examples:
    for text in {*e.contexts, *e.continuations}:
      if tokenizer.decode(tokenizer.encode(text)) != text:
        raise TaskError(f'{e.where}: the checkpoint\'s tokenizer does not spell this record back '
                        f'(decode(encode(text)) differs): {text[:40]!r}')
