"""`python -m moejax.report --workdir=<dir>`: the run report of moejax.tools.report (plots and
summary.md with the evaluation table), under the short name the evaluation docs use."""
from absl import app, flags

from moejax.tools.report import main

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Run directory with metrics.jsonl.')
  app.run(main)
