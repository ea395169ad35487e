"""`python -m moejax.tools.report --workdir=<dir>`: the run report of moejax.report, beside the other tools."""
from absl import app, flags

from moejax.report import main

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Run directory with metrics.jsonl.')
  app.run(main)
