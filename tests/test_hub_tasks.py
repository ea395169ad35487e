"""moejax.hub_tasks: hub layouts -> task JSONL, checked against lm-eval-harness 0.4.13's task code.

Each test writes a few rows per split in the layout the hub stores them in. The independent check
loads lm-eval's own task YAML (its process_docs / doc_to_* functions included) as a
ConfigurableTask over the same local files, and compares what the harness would score (its
fewshot_context and construct_requests) with the records moejax reads back (moejax.tasks).
"""
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')   # before datasets / huggingface_hub are imported
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from moejax import hub_tasks  # noqa: E402
from moejax import tasks as moe_tasks  # noqa: E402
from moejax.tasks import read_task  # noqa: E402

SHARD = '-00000-of-00001.parquet'


def arc_row(question, texts, keys, answer):
  return {'id': question[:8], 'question': question, 'choices': {'text': texts, 'label': keys},
          'answerKey': answer}


def obqa_row(stem, texts, answer):
  return {'id': stem[:8], 'question_stem': stem, 'answerKey': answer,
          'choices': {'text': texts, 'label': list('ABCD'[:len(texts)])}}


def mmlu_row(question, subject, choices, answer):
  return {'question': question, 'subject': subject, 'choices': choices, 'answer': answer}


def hellaswag_row(activity, ctx_a, ctx_b, endings, label):
  return {'activity_label': activity, 'ctx_a': ctx_a, 'ctx_b': ctx_b, 'endings': endings,
          'label': label}


def piqa_row(goal, sol1, sol2, label):
  return {'goal': goal, 'sol1': sol1, 'sol2': sol2, 'label': label}


def wino_row(sentence, option1, option2, answer):
  return {'sentence': sentence, 'option1': option1, 'option2': option2, 'answer': answer}


def boolq_row(question, passage, label):
  return {'question': question, 'passage': passage, 'idx': 0, 'label': label}


def copa_row(premise, choice1, choice2, question, label):
  return {'premise': premise, 'choice1': choice1, 'choice2': choice2, 'question': question,
          'idx': 0, 'label': label}


HELLASWAG = {
    'train': [hellaswag_row('Removing ice from car', 'A man scrapes the window.', 'then',
                            [', he waxes it.', ', he skis.', ', he sings.', ', he stays.'], '3')],
    'validation': [
        hellaswag_row('Home and Garden', '[header] How to clean a grill [title] Heat it.',
                      'Turn THE burners on high',
                      ['[step] Let it  burn.', ' [title] Scrub the grates. [step] Use a brush.',
                       'Walk away.', 'Pour water on it.'], '1'),
        hellaswag_row('Baking cookies', 'A woman mixes dough in a bowl.', '',
                      ['She bakes it.', 'She eats it raw.', 'She paints it.', 'She runs.'], '0')],
    'test': [hellaswag_row('x', 'y', 'z', ['a', 'b'], '')],   # unlabelled, as on the hub
}
MMLU = {
    'test': [
        mmlu_row(' Find the degree of Q(sqrt 2) over Q. ', 'abstract_algebra', list('0246'), 1),
        mmlu_row('Which organelle makes ATP?', 'high_school_biology',
                 ['Ribosome', 'Mitochondrion', 'Nucleus', 'Golgi body'], 1),
        mmlu_row('Is Z a group under +?', 'abstract_algebra', ['Yes', 'No', 'Mod 2', 'Never'], 0)],
    'dev': [
        mmlu_row('What is the order of S_3?', 'abstract_algebra', ['3', '6', '9', '12'], 1),
        mmlu_row('Is every group abelian?', 'abstract_algebra', ['Yes', 'No', 'Some', 'None'], 1),
        mmlu_row('What carries oxygen in blood?', 'high_school_biology',
                 ['Hemoglobin', 'Insulin', 'Keratin', 'Pepsin'], 0)],
}
ARC_EASY = {
    'train': [arc_row('Which is a metal?', ['wood', 'iron', 'glass'], ['A', 'B', 'C'], 'B')],
    'validation': [arc_row('Val question?', ['a', 'b'], ['A', 'B'], 'A')],
    'test': [arc_row('What melts ice?', ['cold', 'heat', 'dark', 'salt'], list('ABCD'), 'B'),
             arc_row('Which planet is red?', ['Venus', 'Mars', 'Moon'], list('123'), '2')],
}
ARC_CHALLENGE = {
    'train': [arc_row('Hard train?', ['x', 'y'], ['A', 'B'], 'A')],
    'validation': [arc_row('Hard val?', ['x', 'y'], ['A', 'B'], 'B')],
    'test': [arc_row('Which is a "noble" gas & inert?', ['O', 'N', 'H', 'C', 'Ne'], list('ABCDE'),
                     'E')],
}
PIQA = {
    'train': [piqa_row('Open a jar', 'Twist the lid.', 'Bite it.', 0)],
    'validation': [piqa_row('How do I dry wet shoes?', 'Put them in an oven at 500F.',
                            'Stuff them with newspaper.', 1),
                   piqa_row('Cool soup fast', 'Stir it in a cold bowl.', 'Boil it.', 0)],
    'test': [piqa_row('g', 'a', 'b', -1)],
}
WINOGRANDE = {
    'train': [wino_row('Ian won over Dennis because _ was faster.', 'Ian', 'Dennis', '1')],
    'validation': [
        wino_row('Sarah was a better surgeon than Maria so _ always got the harder cases.',
                 'Sarah', 'Maria', '1'),
        wino_row('The trophy does not fit in the suitcase because the _ is too small.',
                 'trophy', 'suitcase', '2'),
        wino_row('Jen gave her bike to Amy, so now the bike belongs to _.', 'Jen', 'Amy', '2')],
    'test': [wino_row('A _ b.', 'x', 'y', '')],
}
BOOLQ = {
    'train': [boolq_row('is the sky blue', 'Sky: it is blue.', 1)],
    'validation': [boolq_row('do iran and afghanistan speak the same language',
                             'Persian language -- Persian is spoken in Iran and Afghanistan.', 1),
                   boolq_row('is a tomato a vegetable', 'Tomato -- botanically a fruit.', 0)],
    'test': [boolq_row('q', 'p', -1)],
}
COPA = {
    'train': [copa_row('The man turned on the faucet.', 'The toilet filled with water.',
                       'Water flowed from the spout.', 'effect', 1)],
    'validation': [copa_row('My body cast a shadow over the grass.', 'The sun was rising.',
                            'The grass was cut.', 'cause', 0),
                   copa_row('The woman tolerated her friend.', 'Her friend was difficult.',
                            'She liked pie.', 'effect', 0)],
    'test': [copa_row('p.', 'a', 'b', 'cause', -1)],
}
OPENBOOKQA = {
    'train': [obqa_row('The sun is responsible for', ['puppies learning', 'plants growing'], 'B')],
    'validation': [obqa_row('Val stem', ['a', 'b'], 'A')],
    'test': [obqa_row('A person wants to start saving money so',
                      ['buy a car', 'cook at home', 'eat out', 'shop'], ' B')],   # lm-eval lstrips
}
LAMBADA = [{'text': 'In my palm is a clear stone , and inside it is a small ivory statuette'},
           {'text': 'He said  hello'}]


def layout(folder: str, splits: dict) -> dict:
  return {f'{folder}/{split}{SHARD}': rows for split, rows in splits.items()}


# repo -> {path in the repo: rows}; .parquet files are written with pyarrow, others as JSON lines.
# Each holds what a task must leave out: other configs, other languages, unused splits.
HUB = {
    'Rowan/hellaswag': layout('data', HELLASWAG),
    'allenai/ai2_arc': {**layout('ARC-Easy', ARC_EASY), **layout('ARC-Challenge', ARC_CHALLENGE)},
    'baber/piqa': layout('data', PIQA),
    'allenai/winogrande': {**layout('winogrande_xl', WINOGRANDE),
                           **layout('winogrande_xs', {'train': [wino_row('A _.', 'a', 'b', '2')]})},
    'aps/super_glue': {**layout('boolq', BOOLQ), **layout('copa', COPA)},
    'allenai/openbookqa': {**layout('main', OPENBOOKQA),
                           **layout('additional', {'test': [obqa_row('Other', ['a'], 'A')]})},
    'EleutherAI/lambada_openai': {**layout('default', {'test': LAMBADA}),
                                  **layout('de', {'test': [{'text': 'Auf Deutsch nicht'}]})},
    'cais/mmlu': {
        **layout('all', {**MMLU, 'auxiliary_train': [mmlu_row('aux?', '', list('abcd'), 0)]}),
        **{path: rows for subject in ('abstract_algebra', 'high_school_biology')
           for path, rows in layout(subject, {s: [r for r in rows if r['subject'] == subject]
                                              for s, rows in MMLU.items()}).items()},
    },
}
REPO_OF = {name: t.repo for name, t in hub_tasks.TASKS.items()}
# task -> lm-eval's YAML under lm_eval/tasks, and the snapshot folder of the files it loads.
LM_EVAL_YAML = {
    'hellaswag': ('hellaswag/hellaswag.yaml', 'data'),
    'arc_easy': ('arc/arc_easy.yaml', 'ARC-Easy'),
    'arc_challenge': ('arc/arc_challenge.yaml', 'ARC-Challenge'),
    'piqa': ('piqa/piqa.yaml', 'data'),
    'winogrande': ('winogrande/default.yaml', 'winogrande_xl'),
    'boolq': ('super_glue/boolq/default.yaml', 'boolq'),
    'openbookqa': ('openbookqa/openbookqa.yaml', 'main'),
    'copa': ('super_glue/copa/default.yaml', 'copa'),
    'lambada': ('lambada/lambada_openai.yaml', 'default'),
}


def write_files(root: Path, files: dict) -> Path:
  """Rows as parquet (pyarrow) or JSON lines, by suffix; a str is written as the file's text."""
  for rel, rows in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, str):
      path.write_text(rows)
    elif path.suffix == '.parquet':
      pq.write_table(pa.Table.from_pylist(rows), path)
    else:
      path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return root


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
  """repo -> its snapshot directory, as snapshot_download(local_dir=...) leaves it."""
  root = tmp_path_factory.mktemp('hub')
  return {repo: write_files(root / repo.replace('/', '__'), files) for repo, files in HUB.items()}


def converted(name, src, tmp_path):
  out = tmp_path / f'{name}.jsonl'
  counts = hub_tasks.convert(name, src, out)
  return counts, read_task(out)


def harness_task(yaml: str, files: dict, cache: Path):
  """lm-eval's own task config, loading the given local files instead of the hub repo."""
  import lm_eval
  from lm_eval.api.task import ConfigurableTask
  from lm_eval.tasks._yaml_loader import load_yaml
  cfg = load_yaml(Path(lm_eval.__file__).parent / 'tasks' / yaml)   # include, !function resolved
  data_files = {split: str(path) for split, path in files.items()}
  cfg.update(dataset_path='parquet', dataset_name=None,
             dataset_kwargs={'data_files': data_files, 'cache_dir': str(cache)})
  return ConfigurableTask(config=cfg)


def harness_view(task, doc) -> dict:
  """What the harness scores for a doc, from its own prompt and request code."""
  requests = task.construct_requests(doc, task.fewshot_context(doc, 0))
  pairs = [r.arguments for r in (requests if isinstance(requests, list) else [requests])]
  if task.OUTPUT_TYPE == 'loglikelihood':
    return {'context': pairs[0][0], 'target': pairs[0][1]}
  gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
  if isinstance(gold, str):   # as ConfigurableTask.process_results reads it
    gold = task.doc_to_choice(doc).index(gold)
  return {'contexts': [p[0] for p in pairs], 'choices': [p[1] for p in pairs], 'label': gold}


def our_view(e, kind: str) -> dict:
  if kind == 'lm':
    return {'context': e.description + e.contexts[0], 'target': e.continuations[0]}
  return {'contexts': [e.description + e.context(i) for i in range(len(e.continuations))],
          'choices': list(e.continuations), 'label': e.label}


def harness_kshot(task, doc, k: int):
  """lm-eval's k-shot prompt(s), shots taken in order (first_n) so they line up with ours."""
  from lm_eval.api.samplers import FirstNSampler
  task.sampler = FirstNSampler(list(task.fewshot_docs()), rnd=None)
  ctx = task.fewshot_context(doc, k)
  return ctx if isinstance(ctx, list) else [ctx]


@pytest.mark.parametrize('name', sorted(LM_EVAL_YAML))
def test_matches_lm_eval(name, hub, tmp_path):
  yaml, folder = LM_EVAL_YAML[name]
  snapshot = hub[REPO_OF[name]]
  counts, task = converted(name, snapshot, tmp_path)
  files = {p.name.split('-')[0]: p for p in (snapshot / folder).glob(f'*{SHARD}')}
  lm = harness_task(yaml, files, tmp_path / 'hf')
  lm_docs = list(lm.eval_docs)
  assert counts == {'train': len(task.shots), 'test': len(task.examples)}
  assert len(task.examples) == len(lm_docs) > 0
  assert [our_view(e, task.kind) for e in task.examples] == [harness_view(lm, d) for d in lm_docs]
  if task.kind == 'lm':   # lm-eval draws LAMBADA shots from the test set too; so does moejax
    assert task.shots == ()
    return
  assert len(task.shots) == len(lm.fewshot_docs()) > 0
  prefix = ''.join(s.answer() + '\n\n' for s in task.shots)   # moejax.tasks.with_fewshot's layout
  first = task.examples[0]
  ours = [prefix + first.context(i) for i in range(len(first.continuations))]
  theirs = harness_kshot(lm, lm_docs[0], len(task.shots))
  assert ours == (theirs if lm.multiple_input else theirs * len(ours))   # or one for all choices


def test_mmlu_matches_lm_eval_per_subject(hub, tmp_path):
  """cais/mmlu `all` against each subject's lm-eval task (its own description, dev shots)."""
  counts, task = converted('mmlu', hub['cais/mmlu'], tmp_path)
  assert counts == {'train': 3, 'test': 3}   # auxiliary_train and the subject folders left out
  for subject in ('abstract_algebra', 'high_school_biology'):
    folder = hub['cais/mmlu'] / subject
    lm = harness_task(f'mmlu/default/mmlu_{subject}.yaml',
                      {s: folder / f'{s}{SHARD}' for s in ('test', 'dev')}, tmp_path / 'hf')
    rows = [i for i, r in enumerate(MMLU['test']) if r['subject'] == subject]
    ours = [our_view(task.examples[i], 'choice') for i in rows]
    assert ours == [harness_view(lm, d) for d in lm.eval_docs]
    # lm-eval writes the subject's description once, then the subject's dev shots, then the question.
    shots = [task.shots[i] for i, r in enumerate(MMLU['dev']) if r['subject'] == subject]
    e = task.examples[rows[0]]
    assert e.description == lm.config.description and all(s.description == e.description for s in shots)
    [prefix] = moe_tasks.with_fewshot(dataclasses.replace(task, examples=(e,)), len(shots))
    assert set(prefix[len(e.description):].split('\n\n')[:-1]) == {s.answer() for s in shots}
    assert harness_kshot(lm, lm.eval_docs[0], len(shots)) == [
        e.description + ''.join(s.answer() + '\n\n' for s in shots) + e.contexts[0]]


def test_hand_written_expectations(hub, tmp_path):
  """The formatting written out, for a reader who does not run lm-eval."""
  _, h = converted('hellaswag', hub['Rowan/hellaswag'], tmp_path)
  assert h.examples[0].contexts == (
      'Home and Garden: How to clean a grill. Heat it. Turn the burners on high',)
  # preprocess strips before it drops the [step] / [title] tags, so their endings keep a space.
  assert h.examples[0].continuations == ('  Let it burn.', '  Scrub the grates. Use a brush.',
                                         ' Walk away.', ' Pour water on it.')
  assert h.examples[1].contexts == ('Baking cookies: A woman mixes dough in a bowl.',)
  _, c = converted('copa', hub['aps/super_glue'], tmp_path)
  assert c.examples[0].contexts == ('My body cast a shadow over the grass because',)
  assert c.examples[0].continuations == ('  the sun was rising.', '  the grass was cut.')
  _, w = converted('winogrande', hub['allenai/winogrande'], tmp_path)
  assert w.examples[1].contexts == ('The trophy does not fit in the suitcase because the trophy',
                                    'The trophy does not fit in the suitcase because the suitcase')
  assert w.examples[1].continuations == (' is too small.',) * 2 and w.examples[1].label == 1
  _, m = converted('mmlu', hub['cais/mmlu'], tmp_path)
  assert m.examples[0].description == (
      'The following are multiple choice questions (with answers) about abstract algebra.\n\n')
  assert m.examples[0].contexts == ('Find the degree of Q(sqrt 2) over Q.\nA. 0\nB. 2\nC. 4\nD. 6\nAnswer:',)
  assert m.examples[0].continuations == (' A', ' B', ' C', ' D') and m.examples[0].label == 1
  assert m.shots[0].contexts == ('What is the order of S_3?\nA. 3\nB. 6\nC. 9\nD. 12\nAnswer:',)
  _, lam = converted('lambada', hub['EleutherAI/lambada_openai'], tmp_path)
  assert [(e.contexts[0], e.continuations[0]) for e in lam.examples] == [
      ('In my palm is a clear stone , and inside it is a small ivory', ' statuette'),
      ('He said ', ' hello')]   # split on ' ' as lm-eval does: a doubled space stays in the context
  _, arc = converted('arc_easy', hub['allenai/ai2_arc'], tmp_path)
  assert arc.examples[1].contexts == ('Question: Which planet is red?\nAnswer:',)
  assert arc.examples[1].label == 1   # answerKey '2' of labels '1', '2', '3'


def test_other_layouts_give_the_same_records(hub, tmp_path):
  """google/boolq (answer: bool), the parquet export (split/0000.parquet), an older export
  (ai2_arc-test.parquet), LAMBADA's JSON lines, a JSON array, a single file."""
  def recs(name, src):
    hub_tasks.convert(name, src, tmp_path / 'o.jsonl')
    return [json.loads(line) for line in (tmp_path / 'o.jsonl').read_text().splitlines()]

  google = write_files(tmp_path / 'google_boolq', layout('data', {
      split: [{'question': r['question'], 'answer': bool(r['label']), 'passage': r['passage']}
              for r in BOOLQ[split]] for split in ('train', 'validation')}))
  assert recs('boolq', google) == recs('boolq', hub['aps/super_glue'])
  arc = {split: ARC_EASY[split] for split in ('train', 'test')}
  export = write_files(tmp_path / 'export', {f'ARC-Easy/{s}/0000.parquet': r
                                            for s, r in arc.items()})
  old = write_files(tmp_path / 'old', {f'ARC-Easy/ai2_arc-{s}.parquet': r for s, r in arc.items()})
  snapshot = recs('arc_easy', hub['allenai/ai2_arc'])
  assert recs('arc_easy', export) == recs('arc_easy', old) == snapshot
  jsonl = write_files(tmp_path / 'lambada', {'data/lambada_test.jsonl': LAMBADA,
                                             'data/lambada_test_de.jsonl': [{'text': 'Auf D'}]})
  assert recs('lambada', jsonl) == recs('lambada', hub['EleutherAI/lambada_openai'])
  array = write_files(tmp_path / 'array', {'data/validation.json': json.dumps(PIQA['validation']),
                                           'data/train.jsonl': PIQA['train']})
  assert recs('piqa', array) == recs('piqa', hub['baber/piqa'])
  single = hub['allenai/ai2_arc'] / f'ARC-Easy/test{SHARD}'
  assert [r['split'] for r in recs('arc_easy', single)] == ['test', 'test']


def test_split_names():
  def split(name):
    return hub_tasks.split_of(Path(name))
  assert split('all/test-00000-of-00001.parquet') == 'test'
  assert split('all/auxiliary_train-00000-of-00001.parquet') == 'auxiliary_train'
  assert split('default/validation/0003.parquet') == 'validation'
  assert split('copa/super_glue-train.parquet') == 'train'
  assert split('data/lambada_test.jsonl') == 'test'
  assert split('data/lambada_test_de.jsonl') is None
  assert split('dataset_infos.json') is None


def test_cli_convert_and_errors(hub, tmp_path):
  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'moejax.hub_tasks', *args], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])

  out = tmp_path / 'piqa.jsonl'
  r = cli('convert', '--task=piqa', f"--input={hub['baber/piqa']}", f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert r.stdout == f'piqa: 1 train, 2 test -> {out}\n'
  bad = write_files(tmp_path / 'bad', layout('ARC-Easy', {'test': [
      arc_row('Fine?', ['a', 'b'], ['A', 'B'], 'A'),
      {'id': 'x', 'choices': {'text': ['a'], 'label': ['A']}, 'answerKey': 'A'}]}))
  r = cli('convert', '--task=arc_easy', f'--input={bad}', f'--out={tmp_path / "bad.jsonl"}')
  assert (r.returncode, r.stdout) == (2, '')
  where = bad / 'ARC-Easy' / f'test{SHARD}'
  assert r.stderr == f"hub_tasks: error: {where}:2: missing field 'question'\n"
  assert not (tmp_path / 'bad.jsonl').exists()


@pytest.mark.parametrize('task, files, problem', [
    ('mmlu', layout('all', {'test': [mmlu_row('q', 'anatomy', list('abcd'), 4)]}),
     f"all/test{SHARD}:1: 'answer' 4 out of range for 4 choices"),
    ('arc_easy', layout('ARC-Easy', {'test': [arc_row('q', ['a', 'b'], ['A', 'B'], 'C')]}),
     f"ARC-Easy/test{SHARD}:1: answerKey 'C' out of range: not one of the choice labels "
     "['A', 'B']"),
    ('winogrande', {'winogrande_xl/validation.jsonl': [wino_row('A _ b', 'x', 'y', '3')]},
     "winogrande_xl/validation.jsonl:1: 'answer' '3' out of range: must be '1' or '2'"),
    ('hellaswag', {'data/validation.jsonl': HELLASWAG['validation'] + ['not a row']},
     'data/validation.jsonl:3: a row must be a JSON object'),
    ('piqa', {'data/validation.jsonl': json.dumps(PIQA['validation'][0]) + '\n{"goal": \n'},
     'data/validation.jsonl:2: not JSON'),
    ('hellaswag', layout('data', {'train': HELLASWAG['train']}),
     "no 'validation' split file for hellaswag"),
])
def test_bad_input_is_one_line(task, files, problem, tmp_path, capsys):
  src, out = write_files(tmp_path / 'src', files), tmp_path / 'o.jsonl'
  assert hub_tasks.main(['convert', f'--task={task}', f'--input={src}', f'--out={out}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('hub_tasks: error: ') and err.count('\n') == 1 and problem in err, err
  assert not out.exists()


def test_unknown_task(tmp_path, capsys):
  out = tmp_path / 'o.jsonl'
  assert hub_tasks.main(['convert', '--task=nope', f'--input={tmp_path}', f'--out={out}']) == 2
  assert capsys.readouterr().err.startswith(
      "hub_tasks: error: --task: unknown task 'nope'; choose one of ['arc_challenge', ")
  assert hub_tasks.main(['download', f'--out={tmp_path}', '--tasks=piqa,nope']) == 2
  assert "--tasks: unknown task 'nope'" in capsys.readouterr().err


class FakeHub:
  """huggingface_hub.snapshot_download over local repos: binds each call to the real function's
  signature and copies the files its allow_patterns select (with the hub's own filter)."""

  def __init__(self, repos: dict, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    self.repos, self.calls, self.filter = repos, [], filter_repo_objects
    self.signature = inspect.signature(huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', self)

  def __call__(self, *args, **kwargs):
    a = self.signature.bind(*args, **kwargs).arguments
    self.calls.append((a['repo_id'], a.get('revision')))
    assert a['repo_type'] == 'dataset'
    src, dst = self.repos[(a['repo_id'], a.get('revision'))], Path(a['local_dir'])
    names = [p.relative_to(src).as_posix() for p in src.rglob('*') if p.is_file()]
    for name in self.filter(names, allow_patterns=a['allow_patterns']):
      (dst / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(src / name, dst / name)
    return str(dst)


def test_download_all_tasks(hub, tmp_path, monkeypatch, capsys):
  fake = FakeHub({(repo, None): path for repo, path in hub.items()}, monkeypatch)
  assert hub_tasks.main(['download', f'--out={tmp_path}']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(':')[0] for line in lines] == list(hub_tasks.TASKS)
  assert lines[-1] == f"mmlu: 3 train, 3 test -> {tmp_path / 'mmlu.jsonl'}"
  direct = tmp_path / 'direct'
  direct.mkdir()
  for name in hub_tasks.TASKS:   # the same records as converting the snapshot by hand
    converted(name, hub[REPO_OF[name]], direct)
    assert (tmp_path / f'{name}.jsonl').read_text() == (direct / f'{name}.jsonl').read_text()
  hub_dir = tmp_path / 'hub'
  fetched = {p.relative_to(hub_dir).as_posix() for p in hub_dir.rglob('*.parquet')}
  assert f'cais__mmlu/all/test{SHARD}' in fetched
  left_out = ('auxiliary', 'cais__mmlu/abstract', '/de/', '/additional/', 'hellaswag/data/test')
  assert not [f for f in fetched if any(x in f for x in left_out)], fetched
  assert {revision for _, revision in fake.calls} == {None}


def test_download_falls_back_to_the_parquet_export(hub, tmp_path, monkeypatch, capsys):
  script_only = write_files(tmp_path / 'script', {'hellaswag.py': '# a loading script\n'})
  export = write_files(tmp_path / 'export',
                       {f'default/{s}/0000.parquet': rows for s, rows in HELLASWAG.items()})
  fake = FakeHub({('Rowan/hellaswag', None): script_only,
                  ('Rowan/hellaswag', 'refs/convert/parquet'): export}, monkeypatch)
  out = tmp_path / 'out'
  assert hub_tasks.main(['download', f'--out={out}', '--tasks=hellaswag']) == 0
  assert capsys.readouterr().out == f"hellaswag: 1 train, 2 test -> {out / 'hellaswag.jsonl'}\n"
  assert [revision for _, revision in fake.calls] == [None, 'refs/convert/parquet']
  converted('hellaswag', hub['Rowan/hellaswag'], tmp_path)
  assert (out / 'hellaswag.jsonl').read_text() == (tmp_path / 'hellaswag.jsonl').read_text()


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
  import huggingface_hub

  def unreachable(*args, **kwargs):
    raise OSError('could not reach\nhuggingface.co')
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', unreachable)
  assert hub_tasks.main(['download', f'--out={tmp_path}', '--tasks=copa']) == 1
  assert capsys.readouterr().err == ('hub_tasks: error: aps/super_glue: download failed '
                                     '(OSError: could not reach huggingface.co)\n')
