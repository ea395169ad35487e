"""A two-source mixture (docs/data.md shows how to prepare both): the Shakespeare works, modern and
First Folio editions as variants, for one epoch, beside the sonnets with their rephrasings for four
epochs, reading variant e mod n in epoch e. The sonnets are the small source: weight 1 against 3
until their budget is spent, then the works go on alone. Eval reads the works' held-out plays.

python -m moejax.train --config=experiments/mixture.py --workdir=runs/mixture
"""
from experiments import default


def get_config():
  c = default.get_config()
  c.data.sources = {
      'works': {'dir': 'data/shakespeare/prepared', 'weight': 3.0, 'epochs': 1},
      'sonnets': {'dir': 'data/sonnets/prepared', 'weight': 1.0, 'epochs': 4, 'variant_policy': 'cycle'},
  }
  return c
