"""The speedrun (moejax.speedrun): rules checked before training, the stop at the target, the
leaderboard entry and its refusals. Run on the smoke corpus with the rules scaled down."""
import json

import pytest

from moejax import speedrun
from test_config import prepared_smoke_data, smoke_config  # noqa: F401 (a fixture)
import runs


@pytest.fixture
def smoke_rules(monkeypatch, prepared_smoke_data):
  monkeypatch.setattr(speedrun, 'DATA_DIR', 'data/smoke/prepared')
  monkeypatch.setattr(speedrun, 'SEQ_LEN', 64)
  monkeypatch.setattr(speedrun, 'HELDOUT_SEQUENCES', 16)
  monkeypatch.setattr(speedrun, 'TARGET_LOSS', 7.0)
  monkeypatch.chdir(runs.REPO)
  monkeypatch.setenv('XLA_FLAGS', '')   # the training subprocess on one CPU device: it compiles faster


@pytest.mark.slow   # a full speedrun (~60 s); speedrun-1's acceptance check runs one too
def test_a_run_that_reaches_the_target_stops_there_and_adds_an_entry_fastest_first(smoke_rules, tmp_path):
  results = tmp_path / 'results'
  board = {'rules': speedrun.rules_record(speedrun.heldout_fingerprint('data/smoke/prepared')),
           'runs': [{'recipe': 'slow', 'change': 'x', 'wall_time_s': 1e6, 'steps': 1, 'tokens': 1,
                     'final_loss': 6.9, 'bpb': 1.0, 'target_loss': 7.0, 'config_sha256': '-', 'commit': 'abc',
                     'device': 'cpu', 'date': '2026-01-01'}]}
  speedrun.write_board(results, board)
  e = speedrun.run(smoke_config(), 'experiments/smoke.py', '', tmp_path / 'w', results,
                   ['--config.train.steps=40', '--config.train.log_every=5'])
  recs = runs.read_jsonl(tmp_path / 'w' / 'metrics.jsonl')
  evals = [r for r in recs if 'eval/loss' in r]
  assert evals[-1]['eval/loss'] <= 7.0 < evals[-2]['eval/loss']   # stopped at the first eval under it
  assert e['steps'] == evals[-1]['step'] < 40 and e['final_loss'] == round(evals[-1]['eval/loss'], 4)
  assert e['tokens'] == e['steps'] * 8 * 64 and e['commit'] and e['wall_time_s'] > 0
  assert max(r['step'] for r in recs) == e['steps']
  got = json.loads((results / 'speedrun.json').read_text())
  assert [r['recipe'] for r in got['runs']] == ['slow', 'default']
  rows = [l for l in (results / 'speedrun.md').read_text().splitlines() if l.startswith('| 1 ') or l.startswith('| 2 ')]
  assert '`default`' in rows[0] and '`slow`' in rows[1]


@pytest.mark.slow   # a full speedrun (~50 s); speedrun-1's acceptance check runs one too
def test_a_run_that_misses_the_target_adds_no_entry(smoke_rules, tmp_path, monkeypatch):
  monkeypatch.setattr(speedrun, 'TARGET_LOSS', 1.0)
  with pytest.raises(speedrun.SpeedrunError, match=r'above the target 1.0: no entry'):
    speedrun.run(smoke_config(), 'experiments/smoke.py', '', tmp_path / 'w', tmp_path / 'results',
                 ['--config.train.steps=4'])
  assert not (tmp_path / 'results' / 'speedrun.json').exists()


def test_other_held_out_data_or_tokenizer_is_refused_before_training(smoke_rules, tmp_path):
  rules = speedrun.rules_record(speedrun.heldout_fingerprint('data/smoke/prepared'))
  speedrun.write_board(tmp_path, {'rules': {**rules, 'tokenizer_sha256': 'f' * 64}, 'runs': []})
  with pytest.raises(speedrun.SpeedrunError, match=r"tokenizer_sha256 'f{64}' -> .*: no entry"):
    speedrun.run(smoke_config(), 'experiments/smoke.py', '', tmp_path / 'w', tmp_path, [])
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('field,value,problem', [
    ('seq_len', 128, 'windows of 64 tokens'), ('batch_size', 3, 'does not divide'),
    ('eval_every', 100, 'at most 25'), ('target_loss', 3.0, 'the target is 7.0')])
def test_configs_that_change_what_is_measured_are_not_speedruns(smoke_rules, field, value, problem):
  c = smoke_config()
  c.train[field] = value
  with pytest.raises(speedrun.SpeedrunError, match=problem):
    speedrun.check_rules(c)


def test_every_recipe_of_the_speedrun_file_keeps_the_rules(monkeypatch):
  from experiments import speedrun as recipes
  for name in recipes.RECIPES:
    speedrun.check_rules(recipes.get_config(name))
    assert name in recipes.CHANGES
  assert recipes.BEST in recipes.RECIPES
