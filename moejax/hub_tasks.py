"""Downstream tasks from their Hugging Face hub files, written as moejax task JSONL (moejax.tasks).

`python -m moejax.hub_tasks convert --task=NAME --input=FILE_OR_DIR --out=FILE.jsonl`
`python -m moejax.hub_tasks download --out=DIR [--tasks=a,b,...]` (the only step that needs the hub)

Each converter writes a hub row as lm-eval-harness 0.4.13's task config renders it (process_docs,
doc_to_text, doc_to_choice, description), and a choice as the harness scores it: target_delimiter
(" ") + the choice text, since moejax's scorer adds no delimiter. The split lm-eval evaluates on
becomes the test records; the split it draws few-shot examples from becomes "split": "train".
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable


class HubTaskError(ValueError):
  """Bad input: one line naming the file and row (or the flag) and the problem."""


class NoSplitFiles(HubTaskError):
  """The input holds no file of the split a task is evaluated on."""


class RowError(ValueError):
  """A row a converter cannot write; the caller adds FILE:ROW."""


def _field(row: dict, name: str):
  if name not in row or row[name] is None:
    raise RowError(f'missing field {name!r}')
  return row[name]


def _str(row: dict, name: str) -> str:
  value = _field(row, name)
  if not isinstance(value, str):
    raise RowError(f'{name!r} must be a string, got {value!r}')
  return value


def _strs(value, name: str) -> list[str]:
  if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
    raise RowError(f'{name!r} must be a non-empty list of strings, got {value!r}')
  return value


def _label(value, n: int, name: str) -> int:
  """A 0-based answer index; hub files store it as an int or a digit string (HellaSwag)."""
  if isinstance(value, str):
    try:
      value = int(value)   # as lm-eval's int(doc["label"])
    except ValueError:
      pass
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
    raise RowError(f'{name!r} {value!r} out of range for {n} choices')
  return value


def _keyed_choices(row: dict, key: str) -> tuple[list[str], int]:
  """ARC / OpenBookQA: choices {text: [...], label: ["A", ...]} and the answer's label."""
  choices = _field(row, 'choices')
  if not isinstance(choices, dict) or 'text' not in choices or 'label' not in choices:
    raise RowError(f"'choices' must have 'text' and 'label' lists, got {choices!r}")
  texts, keys = _strs(choices['text'], 'choices.text'), _strs(choices['label'], 'choices.label')
  if len(keys) != len(texts):
    raise RowError(f"'choices' has {len(texts)} texts but {len(keys)} labels")
  if key not in keys:
    raise RowError(f'answerKey {key!r} out of range: not one of the choice labels {keys}')
  return texts, keys.index(key)


def _hellaswag_clean(text: str) -> str:
  # lm_eval/tasks/hellaswag/utils.py:preprocess; the brackets are WikiHow artifacts.
  text = text.strip().replace(' [title]', '. ')
  return re.sub('\\[.*?\\]', '', text).replace('  ', ' ')


def hellaswag(row: dict) -> dict:
  # str.capitalize also lowercases the rest of ctx_b, as lm-eval's process_docs does.
  ctx = _str(row, 'ctx_a') + ' ' + _str(row, 'ctx_b').capitalize()
  endings = _strs(_field(row, 'endings'), 'endings')
  return {'context': _hellaswag_clean(_str(row, 'activity_label') + ': ' + ctx),
          'choices': [' ' + _hellaswag_clean(e) for e in endings],
          'label': _label(_field(row, 'label'), len(endings), 'label')}


def arc(row: dict) -> dict:
  texts, label = _keyed_choices(row, _str(row, 'answerKey'))
  return {'context': f"Question: {_str(row, 'question')}\nAnswer:",
          'choices': [' ' + t for t in texts], 'label': label}


def piqa(row: dict) -> dict:
  return {'context': f"Question: {_str(row, 'goal')}\nAnswer:",
          'choices': [' ' + _str(row, 'sol1'), ' ' + _str(row, 'sol2')],
          'label': _label(_field(row, 'label'), 2, 'label')}


def winogrande(row: dict) -> dict:
  """Partial scoring: each option fills the blank in its own context; both score the same rest."""
  sentence = _str(row, 'sentence')
  blank = sentence.find('_')
  if blank < 0:
    raise RowError("'sentence' has no '_' blank")
  answer = _field(row, 'answer')
  if isinstance(answer, bool) or str(answer) not in ('1', '2'):
    raise RowError(f"'answer' {answer!r} out of range: must be '1' or '2'")
  before, rest = sentence[:blank], ' ' + sentence[blank + 1:].strip()
  return {'context': [before + _str(row, 'option1'), before + _str(row, 'option2')],
          'choices': [rest, rest], 'label': int(answer) - 1}


def boolq(row: dict) -> dict:
  if 'label' in row:   # super_glue/boolq: 0 / 1 for no / yes
    label = _field(row, 'label')
  else:   # google/boolq: answer false / true
    label = _field(row, 'answer')
    if not isinstance(label, bool):
      raise RowError(f"'answer' must be true or false, got {label!r}")
    label = int(label)
  return {'context': f"{_str(row, 'passage')}\nQuestion: {_str(row, 'question')}?\nAnswer:",
          'choices': [' no', ' yes'], 'label': _label(label, 2, 'label')}


def openbookqa(row: dict) -> dict:
  texts, label = _keyed_choices(row, _str(row, 'answerKey').lstrip())
  return {'context': _str(row, 'question_stem'), 'choices': [' ' + t for t in texts],
          'label': label}


def copa(row: dict) -> dict:
  connector = {'cause': 'because', 'effect': 'therefore'}.get(_str(row, 'question'))
  if connector is None:
    raise RowError(f"'question' {row['question']!r} is neither 'cause' nor 'effect'")
  choices = [_str(row, 'choice1'), _str(row, 'choice2')]
  if not all(choices):
    raise RowError('an empty choice')
  # Two spaces, as lm-eval 0.4.13 scores them: its doc_to_choice prepends " " to the choice and
  # the default target_delimiter adds another.
  return {'context': _str(row, 'premise').strip()[:-1] + ' ' + connector,
          'choices': ['  ' + c[0].lower() + c[1:] for c in choices],
          'label': _label(_field(row, 'label'), 2, 'label')}


def lambada(row: dict) -> dict:
  # lm-eval splits on ' ' (not any whitespace): the target is the last space-separated word.
  words = _str(row, 'text').split(' ')
  if len(words) < 2:
    raise RowError("'text' has no context before its last word")
  return {'context': ' '.join(words[:-1]), 'target': ' ' + words[-1]}


def mmlu(row: dict) -> dict:
  choices = _strs(_field(row, 'choices'), 'choices')
  if len(choices) != 4:
    raise RowError(f"'choices' must hold 4 answers (A-D), got {len(choices)}")
  lines = ''.join(f'\n{letter}. {text}' for letter, text in zip('ABCD', choices))
  return {'context': f"{_str(row, 'question').strip()}{lines}\nAnswer:",
          'choices': [' A', ' B', ' C', ' D'], 'label': _label(_field(row, 'answer'), 4, 'answer')}


def mmlu_description(row: dict) -> str:
  subject = _str(row, 'subject').replace('_', ' ')
  return f'The following are multiple choice questions (with answers) about {subject}.\n\n'


@dataclasses.dataclass(frozen=True)
class HubTask:
  name: str
  repo: str                      # the dataset repo lm-eval 0.4.13 loads
  config: str | None             # the config's folder in a snapshot (None: the repo has one)
  splits: dict                   # hub split -> record split ('train' few-shot pool, or 'test')
  convert: Callable[[dict], dict]
  # A record's "description": lm-eval writes it once, before the shots, and
  # renders a shot as doc_to_text + answer alone.
  description: Callable[[dict], str] | None = None
  extra_patterns: tuple[str, ...] = ()   # older layouts of the same files

  @property
  def eval_split(self) -> str:
    return next(s for s, role in self.splits.items() if role == 'test')


_TRAIN_VAL = {'train': 'train', 'validation': 'test'}
_TRAIN_TEST = {'train': 'train', 'test': 'test'}
TASKS = {t.name: t for t in (
    HubTask('hellaswag', 'Rowan/hellaswag', None, _TRAIN_VAL, hellaswag),
    HubTask('arc_easy', 'allenai/ai2_arc', 'ARC-Easy', _TRAIN_TEST, arc),
    HubTask('arc_challenge', 'allenai/ai2_arc', 'ARC-Challenge', _TRAIN_TEST, arc),
    HubTask('piqa', 'baber/piqa', None, _TRAIN_VAL, piqa),
    HubTask('winogrande', 'allenai/winogrande', 'winogrande_xl', _TRAIN_VAL, winogrande),
    HubTask('boolq', 'aps/super_glue', 'boolq', _TRAIN_VAL, boolq),
    HubTask('openbookqa', 'allenai/openbookqa', 'main', _TRAIN_TEST, openbookqa),
    HubTask('copa', 'aps/super_glue', 'copa', _TRAIN_VAL, copa),
    HubTask('lambada', 'EleutherAI/lambada_openai', 'default', {'test': 'test'}, lambada,
            extra_patterns=('data/lambada_test.jsonl',)),
    HubTask('mmlu', 'cais/mmlu', 'all', {'dev': 'train', 'test': 'test'}, mmlu, mmlu_description),
)}

SPLIT_NAMES = ('train', 'validation', 'test', 'dev', 'auxiliary_train')
DATA_SUFFIXES = ('.parquet', '.jsonl', '.json')


def split_of(path: Path) -> str | None:
  """The split a hub file holds, read off its name: `test-00000-of-00001.parquet`,
  `super_glue-test.parquet`, `lambada_test.jsonl`, or the parquet export's `test/0000.parquet`."""
  stem = re.sub(r'-\d+-of-\d+$', '', path.name.split('.')[0])
  last = re.split(r'[-_]', stem)[-1]
  for name in (stem, last, path.parent.name):   # the whole name first: auxiliary_train
    if name in SPLIT_NAMES:
      return name
  return None


def hub_files(root: Path, task: HubTask) -> dict[str, list[Path]]:
  """The files of each of the task's hub splits in a file or a snapshot directory."""
  if root.is_file():   # a file whose name names no split: the split lm-eval evaluates on
    return {split_of(root) or task.eval_split: [root]}
  if not root.is_dir():
    raise HubTaskError(f'{root}: no such file or directory')
  files = sorted(p for p in root.rglob('*') if p.suffix in DATA_SUFFIXES and p.is_file()
                 and not any(part.startswith('.') for part in p.relative_to(root).parts))
  in_config = [p for p in files if task.config in p.relative_to(root).parts[:-1]]
  if in_config:   # a snapshot of several configs (ARC-Easy and ARC-Challenge, mmlu's subjects)
    files = in_config
  by_split = {}
  for p in files:
    if (split := split_of(p)) in task.splits:
      by_split.setdefault(split, []).append(p)
  for split, paths in by_split.items():   # a split exported twice: parquet wins over JSON lines
    if any(p.suffix == '.parquet' for p in paths):
      by_split[split] = [p for p in paths if p.suffix == '.parquet']
  return by_split


def read_rows(path: Path):
  """(row number from 1, row dict) of a parquet or JSON-lines (or JSON array) file."""
  if path.suffix == '.parquet':
    import pyarrow.parquet as pq
    try:
      rows = pq.read_table(path).to_pylist()
    except Exception as e:   # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
      raise HubTaskError(f'{path}: not a readable parquet file ({e})') from None
    yield from enumerate(rows, 1)
    return
  text = path.read_text(encoding='utf-8')
  if text.lstrip().startswith('['):   # a .json file may hold one array instead of lines
    rows = enumerate(_json(text, path, 1), 1)
  else:
    rows = ((n, _json(line, path, n)) for n, line in enumerate(text.splitlines(), 1)
            if line.strip())
  for n, row in rows:
    if not isinstance(row, dict):
      raise HubTaskError(f'{path}:{n}: a row must be a JSON object')
    yield n, row


def _json(text: str, path: Path, line: int):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise HubTaskError(f'{path}:{line + e.lineno - 1}: not JSON ({e.msg})') from None


def hub_task(name: str, flag: str = '--task') -> HubTask:
  if name not in TASKS:
    raise HubTaskError(f'{flag}: unknown task {name!r}; choose one of {sorted(TASKS)}')
  return TASKS[name]


def records(name: str, root: Path):
  """The task's moejax records of the hub files under root: the few-shot pool, then the test set."""
  task = hub_task(name)
  files = hub_files(Path(root), task)
  if task.eval_split not in files:
    raise NoSplitFiles(f'{root}: no {task.eval_split!r} split file for {name} '
                       f'(a file named like {task.eval_split}-00000-of-00001.parquet)')
  for role in ('train', 'test'):
    for split in (s for s, r in task.splits.items() if r == role):
      for path in files.get(split, []):
        for n, row in read_rows(path):
          try:
            rec = task.convert(row)
            if task.description:   # before the shots; shots come from the same description
              rec['description'] = task.description(row)
          except RowError as e:
            raise HubTaskError(f'{path}:{n}: {e}') from None
          yield {**rec, 'split': role}


def convert(name: str, root, out) -> dict[str, int]:
  """Writes the task's JSONL to out (whole or not at all); returns the records per split."""
  hub_task(name)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  counts = {'train': 0, 'test': 0}
  tmp = out.with_name(out.name + '.tmp')
  try:
    with tmp.open('w', encoding='utf-8') as f:
      for rec in records(name, Path(root)):
        counts[rec['split']] += 1
        f.write(json.dumps(rec, ensure_ascii=False) + '\n')
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)
  return counts


def allow_patterns(task: HubTask) -> list[str]:
  """Only the task's splits, `{split}-0000x-of-0000n.parquet` or the parquet export's
  `{split}/0000.parquet` (mmlu's auxiliary_train and super_glue's other tasks are large)."""
  root = f'{task.config}/' if task.config else '*'
  return [f'{root}{s}{tail}' for s in task.splits for tail in ('-*', '/*', '.*')] + list(
      task.extra_patterns)


class DownloadError(RuntimeError):
  """The hub could not be reached or refused the files."""


def download(out_dir, names: list[str]) -> dict[str, dict[str, int]]:
  """Fetches each task's hub files (snapshot_download) into out_dir/hub/ and converts them into
  out_dir/NAME.jsonl. A repo whose main branch holds only a loading script is read from the hub's
  parquet export (revision refs/convert/parquet), as datasets.load_dataset does."""
  import huggingface_hub
  out_dir = Path(out_dir)
  tasks = [hub_task(name, '--tasks') for name in names]
  done = {}
  for task in tasks:
    name = task.name
    local = out_dir / 'hub' / task.repo.replace('/', '__')
    for revision in (None, 'refs/convert/parquet'):
      where = local.with_name(local.name + '@parquet') if revision else local
      where.mkdir(parents=True, exist_ok=True)   # nothing matched allow_patterns: still a dir
      try:
        huggingface_hub.snapshot_download(task.repo, repo_type='dataset', revision=revision,
                                          allow_patterns=allow_patterns(task), local_dir=where)
      except Exception as e:   # network, auth, missing revision: the hub's own error, on one line
        raise DownloadError(f'{task.repo}: download failed ({type(e).__name__}: {e})'.replace(
            '\n', ' ')) from None
      try:
        done[name] = convert(name, where, out_dir / f'{name}.jsonl')
        break
      except NoSplitFiles:
        if revision:
          raise
    print(summary(name, done[name], out_dir / f'{name}.jsonl'), flush=True)
  return done


def summary(name: str, counts: dict[str, int], out) -> str:
  return f"{name}: {counts['train']} train, {counts['test']} test -> {out}"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='hub_tasks', description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest='command', required=True)
  c = sub.add_parser('convert', help='hub files (parquet / JSONL; a file or a snapshot) -> JSONL')
  c.add_argument('--task', required=True, help=', '.join(TASKS))
  c.add_argument('--input', required=True, help='a hub file or a snapshot_download directory')
  c.add_argument('--out', required=True, help='the task JSONL to write')
  d = sub.add_parser('download', help='snapshot_download each task, then convert it into DIR')
  d.add_argument('--out', required=True, help='DIR: gets NAME.jsonl per task and hub/ (raw files)')
  d.add_argument('--tasks', default=','.join(TASKS), help='comma-separated (default: all)')
  a = p.parse_args(argv)
  try:
    if a.command == 'convert':
      print(summary(a.task, convert(a.task, a.input, a.out), a.out))
    else:
      download(a.out, [t for t in a.tasks.split(',') if t])
  except HubTaskError as e:
    print(f'hub_tasks: error: {e}', file=sys.stderr)
    return 2
  except DownloadError as e:
    print(f'hub_tasks: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
