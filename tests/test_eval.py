"""moejax.eval: batched, padded log-likelihood scoring equals scoring each continuation alone and is
the same on 1 and 8 devices; multiple-choice, partial-scoring and LM metrics; few-shot prompts; bad
task files and a tokenizer the run did not train with are one line naming the problem; the
lm-eval-harness backend agrees with it."""
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import eval as moe_eval, model, sample, tasks
import runs


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp('eval_run')
  runs.train(d, '--config.train.steps=4', '--config.train.log_every=2', '--config.checkpoint.every=2',
             '--config.mesh.data=8', '--config.mesh.expert=1')
  return d


@pytest.fixture(scope='module')
def scorer(workdir):
  return moe_eval.Scorer.from_workdir(str(workdir))


PAIRS = [('To be, or not to be, that is', ' the question'), ('ROMEO:', ' O, she doth teach the torches'),
         ('x', ' y'), ('A much longer context ' * 12, ' and its end.'), ('', ' the start')]


def _alone(scorer, ctx, cont) -> float:
  """The continuation's log-probability from one unpadded forward of exactly its sequence."""
  tok = scorer.tokenizer
  c, t = tok.encode(ctx), tok.encode(cont)
  ids = jnp.array([[tok.eod_id] + c + t], jnp.int32)
  logits, _ = model.forward(scorer.params, scorer.router_bias, ids[:, :-1], scorer.model, scorer.mesh)
  logp = jax.nn.log_softmax(logits, -1)[0, -len(t):]
  return float(jnp.sum(jnp.take_along_axis(logp, ids[0, -len(t):, None], -1)))


def test_batched_padded_scores_equal_each_continuation_scored_alone(scorer):
  logp, greedy, count = scorer.score(PAIRS * 4)   # more rows than one batch, mixed lengths
  want = [_alone(scorer, c, t) for c, t in PAIRS]
  np.testing.assert_allclose(logp, want * 4, rtol=2e-5, atol=2e-4)
  assert list(count) == [len(scorer.tokenizer.encode(t)) for _, t in PAIRS] * 4
  np.testing.assert_array_equal(scorer.score(PAIRS)[0], scorer.score(PAIRS)[0])   # deterministic


def test_choice_and_lm_metrics_follow_the_scores(scorer, tmp_path):
  logp = scorer.score(PAIRS[:2])[0]
  path = tmp_path / 'mc.jsonl'
  recs = [{'context': PAIRS[0][0], 'choices': [PAIRS[0][1], PAIRS[1][1]], 'label': 0},
          {'context': PAIRS[0][0], 'choices': [PAIRS[0][1], PAIRS[1][1]], 'label': 1}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  r = moe_eval.evaluate(scorer, tasks.read_task(path))
  first = np.array([scorer.score([(PAIRS[0][0], c)])[0][0] for c in recs[0]['choices']])
  best = int(np.argmax(first))
  nbytes = np.array([len(c.encode()) for c in recs[0]['choices']])
  assert r['acc'] == 0.5 and r['n'] == 2   # the same choice wins both; one label is right
  assert r['acc_norm'] == 0.5 and best in (0, 1) and len(logp) == 2 and (first / nbytes).size == 2
  lm = tmp_path / 'lm.jsonl'
  lm.write_text(json.dumps({'context': 'To be, or not', 'target': ' to be'}) + '\n')
  _, greedy, count = scorer.score([('To be, or not', ' to be')])
  assert moe_eval.evaluate(scorer, tasks.read_task(lm))['acc'] == float(greedy[0] == count[0])


def test_fewshot_prefixes_are_other_records_answers_or_the_train_split():
  ex = lambda i, split='test': tasks.Example((f'q{i}?',), (f' a{i}', ' no'), 0, f'f:{i}')
  task = tasks.Task('t', 'choice', tuple(ex(i) for i in range(4)))
  prefixes = moe_eval.with_fewshot(task, 2)
  for i, p in enumerate(prefixes):
    shots = p.split('\n\n')
    assert len(shots) == 3 and shots[-1] == ''
    assert all(s.startswith('q') and s.endswith(f' a{s[1]}') and s != f'q{i}? a{i}' for s in shots[:-1])
  assert prefixes == moe_eval.with_fewshot(task, 2)   # seeded
  with_train = tasks.Task('t', 'choice', task.examples, (ex(7), ex(8)))
  assert all(set(p.split('\n\n')[:-1]) == {'q7? a7', 'q8? a8'} for p in moe_eval.with_fewshot(with_train, 2))


def test_per_choice_contexts_score_each_choice_after_its_own_context(scorer, tmp_path):
  path = tmp_path / 'wino.jsonl'
  rec = {'context': ['The cat sat on the', 'The dog ran to the'], 'choices': [' mat', ' door'], 'label': 1}
  path.write_text(json.dumps(rec) + '\n' + json.dumps({**rec, 'split': 'train'}) + '\n')
  task = tasks.read_task(path)
  assert len(task.examples) == 1 and len(task.shots) == 1 and task.random_baseline == 0.5
  lp = scorer.score([('The cat sat on the', ' mat'), ('The dog ran to the', ' door')])[0]
  r = moe_eval.evaluate(scorer, task)
  assert r['acc'] == float(np.argmax(lp) == 1) and r['centered'] == (r['acc'] - 0.5) / 0.5


@pytest.mark.parametrize('record,problem', [
    ({'context': 'c', 'choices': ['a', 'b'], 'label': 2}, "'label' 2 out of range for 2 choices"),
    ({'context': 'c', 'choices': [], 'label': 0}, "'choices' must be a non-empty list"),
    ({'choices': ['a'], 'label': 0}, "missing field 'context'"),
    ({'context': 'c'}, "missing field 'choices' (multiple choice) or 'target'"),
    ({'context': ['a'], 'choices': ['x', 'y'], 'label': 0}, "a list 'context' needs one string per choice"),
    ({'context': 'c', 'target': ''}, "'target' is empty"),
    ({'context': 'c', 'choices': ['x'], 'label': True}, "'label' True out of range"),
])
def test_bad_task_records_are_one_line_naming_file_line_and_problem(tmp_path, record, problem):
  path = tmp_path / 'bad.jsonl'
  path.write_text(json.dumps({'context': 'ok', 'choices': ['a'], 'label': 0}) + '\n' + json.dumps(record) + '\n')
  with pytest.raises(tasks.TaskError) as e:
    tasks.read_task(path)
  assert str(e.value).startswith(f'{path}:2: {problem}') and '\n' not in str(e.value)


def test_cli_prints_a_line_per_task_and_writes_json(workdir, tmp_path):
  path = tmp_path / 'cont.jsonl'
  path.write_text(json.dumps({'context': 'ROMEO:', 'choices': [' a', ' b', ' c'], 'label': 1}) + '\n')
  out = tmp_path / 'r.json'
  proc = subprocess.run(runs.cmd('moejax.eval', workdir, f'--tasks={path}', f'--out={out}', '--step=2'),
                        cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('cont: acc ') and 'acc_norm' in proc.stdout and 'centered' in proc.stdout
  assert 'CORE (mean centred accuracy over 1 tasks)' in proc.stdout
  res = json.loads(out.read_text())
  assert res['tasks']['cont']['n'] == 1 and res['core'] == res['tasks']['cont']['centered']
  bad = subprocess.run(runs.cmd('moejax.eval', workdir, f'--tasks={tmp_path / "nope.jsonl"}'),
                       cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and 'nope.jsonl' in bad.stderr


@pytest.mark.slow   # lm-eval's harness end to end (~20 s); the eval acceptance check runs it too
def test_lm_eval_harness_backend_agrees_with_moejax_eval_on_a_local_yaml_task(workdir, tmp_path):
  rng = np.random.default_rng(0)
  words = 'thou art the king of all my love and night doth fall upon the sea'.split()
  recs = []
  for _ in range(12):
    choices = [' ' + ' '.join(rng.choice(words, 3)) for _ in range(3)]
    recs.append({'context': ' '.join(rng.choice(words, 6)), 'choices': choices, 'label': int(rng.integers(3))})
  data = tmp_path / 'loc.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 'loc.yaml').write_text(
      f'task: loc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n'
      'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
      'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
  env = {**runs.env(), 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
  proc = subprocess.run([*runs.cmd('moejax.lm_eval', workdir)[:3], '--model', 'moejax', '--model_args',
                         f'workdir={workdir}', '--tasks', 'loc', '--include_path', str(tmp_path / 'tasks'),
                         '--output_path', str(tmp_path / 'out')],
                        cwd=runs.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  [result] = list((tmp_path / 'out').rglob('results_*.json'))
  harness = json.loads(result.read_text())['results']['loc']
  ours = moe_eval.evaluate(moe_eval.Scorer.from_workdir(str(workdir)), tasks.read_task(data))
  assert harness['acc,none'] == pytest.approx(ours['acc'])


@pytest.mark.slow   # lm-eval's request types (~40 s); the eval acceptance check drives the harness too
def test_lm_eval_model_requests_are_scored_by_the_scorer(workdir, scorer):
  from lm_eval.api.instance import Instance
  from moejax.lm_eval import MoejaxLM
  lm = MoejaxLM(str(workdir))
  reqs = [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(PAIRS)]
  got = lm.loglikelihood(reqs)
  logp, greedy, count = scorer.score(PAIRS)
  assert [g[0] for g in got] == pytest.approx(list(logp), rel=1e-6)
  assert [g[1] for g in got] == [bool(a == b) for a, b in zip(greedy, count)]
  long_text = ' '.join(['Now is the winter of our discontent made glorious summer'] * 40)
  rolling = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (t,), i)
                                      for i, t in enumerate([PAIRS[1][1], long_text])])
  assert rolling[0] == pytest.approx(float(scorer.score([('', PAIRS[1][1])])[0][0]), rel=1e-6)
  assert rolling[1] == pytest.approx(_rolling_naive(scorer, long_text), rel=1e-5)
  gen = [Instance('generate_until', {}, (ctx, {'until': ['\n\n'], 'max_gen_toks': 5}), i)
         for i, ctx in enumerate(['ROMEO:', 'JULIET:', 'To be, or not to be'])]
  texts = lm.generate_until(gen)
  tok = scorer.tokenizer
  for (ctx, _), text in zip([g.args for g in gen], texts):   # batched rows = each prompt alone
    ids = [tok.eod_id] + tok.encode(ctx)
    alone = sample.generate(scorer.config, scorer.mesh, scorer.params, scorer.router_bias, ids, 5,
                            temperature=0.0, top_k=1, seed=0)[len(ids):]
    assert text == tok.decode([t for t in alone if t != tok.eod_id]).split('\n\n')[0]


def _rolling_naive(scorer, text) -> float:
  """Every token of the text scored once, each after as many preceding tokens as fit (EOD first)."""
  tok, L = scorer.tokenizer, scorer.max_len
  ids = [tok.eod_id] + tok.encode(text)
  total = 0.0
  for i in range(1, len(ids)):   # token i after ids[max(0, i - L):i], one row per token
    window = ids[max(0, i - L):i + 1]
    total += float(scorer.score_ids([(window, 1)])[0][0])
  return total


def test_scores_are_the_same_on_one_and_eight_devices(workdir, scorer, tmp_path):
  assert len(jax.devices()) == 8
  eight = moe_eval.Scorer.from_workdir(str(workdir), all_devices=True)
  assert eight.rows % 8 == 0 and len(eight.params['embed'].sharding.device_set) == 8
  one_lp, one_g, one_n = scorer.score(PAIRS * 5)
  lp, g, n = eight.score(PAIRS * 5)
  np.testing.assert_allclose(lp, one_lp, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(g, one_g)
  np.testing.assert_array_equal(n, one_n)


def test_a_tokenizer_the_run_did_not_train_with_is_refused_in_one_line(workdir, tmp_path):
  import shutil
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  info = json.loads((run / sample.RUN_TOKENIZER).read_text())
  (run / sample.RUN_TOKENIZER).write_text(json.dumps({**info, 'sha256': '0' * 64}))
  with pytest.raises(ValueError, match='is not the one .* trained with') as e:
    moe_eval.Scorer.from_workdir(str(run))
  assert '\n' not in str(e.value)

  class Lossy:   # a vocabulary without the task's characters: decode(encode(x)) != x
    eod_id = 0
    encode = staticmethod(lambda text: [1] * len(text))
    decode = staticmethod(lambda ids: '?' * len(ids))
  path = tmp_path / 't.jsonl'
  path.write_text(json.dumps({'context': 'c', 'choices': [' a'], 'label': 0}) + '\n')
  with pytest.raises(tasks.TaskError, match=f'{path}:1: the checkpoint.s tokenizer does not spell'):
    tasks.check_tokenizer(tasks.read_task(path), Lossy())
