"""The balancing study's verdicts follow the measurements (experiments/studies/balancing.py)."""
import json
import math
import os

from experiments.studies import balancing
from moejax.tools.study import Run


def _run(tmp_path, name, loss, maxvio, bias_steps, active=2.0):
  """A finished run: per-step batch MaxVio `maxvio` (list), held-out `loss`, biases per log step."""
  workdir = os.path.join(tmp_path, balancing.__name__ + name.replace(' ', '_'))
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'loads.jsonl'), 'w') as f:
    for i, b in enumerate(bias_steps):
      f.write(json.dumps({'step': 5 * (i + 1), 'router_bias': [b]}) + '\n')
  train = [{'step': 5 * (i + 1), 'loss': loss, 'moe/maxvio': v, 'moe/maxvio_global': v,
            'moe/active_experts_per_token': active, 'tokens_per_sec': 1.0} for i, v in enumerate(maxvio)]
  return Run(name, workdir, None, {}, records=train + [{'step': 5 * len(maxvio), 'eval/loss': loss}])


def _runs(tmp_path, quantile_maxvio, smebu_bias, threshold_loss):
  slow, wobbly = [2.0] * 8 + [0.4] * 4, [[0.0, 1.0], [1.0, 0.0]] * 6
  r = {}
  for n, (loss, mv, bias, active) in {
      'balance loss only (16 experts)': (5.0, [3.0] * 12, [[0.0, 0.0]] * 12, 2.0),
      'sign rule (16 experts)': (5.0, slow, wobbly, 2.0),
      'sign rule (16 experts, seed 1)': (5.005, slow, wobbly, 2.0),
      'quantile (16 experts)': (5.0, quantile_maxvio, wobbly, 2.0),
      'threshold routing (16 experts)': (threshold_loss, slow, wobbly, 2.05),
      'threshold routing (16 experts, seed 1)': (threshold_loss, slow, wobbly, 2.05),
      'sign rule (64 experts)': (5.0, slow, wobbly, 2.0),
      'sign rule (64 experts, seed 1)': (5.0, slow, wobbly, 2.0),
      'quantile (64 experts)': (5.0, quantile_maxvio, wobbly, 2.0),
      'smebu (64 experts)': (5.0, slow, smebu_bias, 2.0),
      'smebu (64 experts, seed 1)': (5.0, slow, smebu_bias, 2.0)}.items():
    r[n] = _run(tmp_path, n, loss, mv, bias, active)
  return r


def test_verdicts_say_reproduced_when_the_measurements_support_each_claim(tmp_path):
  v = balancing.verdicts(_runs(str(tmp_path), [0.3] * 12, [[0.5, 0.5]] * 12, 4.9))
  assert len(v) == 4 and all('**reproduced**' in line for line in v), v
  assert balancing.steps_until(_run(str(tmp_path), 'x', 1.0, [0.9, 0.4], [[0.0]])) == 10


def test_verdicts_say_not_reproduced_when_they_do_not(tmp_path):
  never = [0.9] * 12
  v = balancing.verdicts(_runs(str(tmp_path), never, [[0.0, 2.0], [2.0, 0.0]] * 6, 5.0))
  assert ['not reproduced' in line for line in v] == [False, True, True, True], v
  assert balancing.fmt_steps(math.inf) == f'> {balancing.STEPS}'
