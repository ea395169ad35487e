"""CPU speedrun recipes (moejax.speedrun, docs/speedrun.md): `--config=experiments/speedrun.py[:name]`.

Each recipe is the `make train` model and data (experiments/default.py) with the changes its CHANGES
line names; no name gives the leaderboard's current best. The rules (data, held-out set, target,
eval cadence) are moejax.speedrun's; a recipe changes only how the model gets there.
"""
from experiments import default

BEST = 'lr4_900'

CHANGES = {
    'baseline': 'experiments/default.py as it is, with a 1,200-step budget',
    'lr4_900': 'peak lr 3e-3 -> 4e-3 and a 900-step budget (the cosine decays by step 900)',
}


def baseline(c):
  c.train.steps = 1200


def lr4_900(c):
  c.train.steps = 900
  c.optim.lr = 4e-3


RECIPES = {'baseline': baseline, 'lr4_900': lr4_900}


def get_config(name: str = ''):
  name = name or BEST
  if name not in RECIPES:
    raise ValueError(f'experiments/speedrun.py: no recipe {name!r} (have {", ".join(RECIPES)})')
  c = default.get_config()
  c.train.eval_every = 20
  c.train.log_every = 20
  c.checkpoint.every = 400
  RECIPES[name](c)
  return c
