"""The one study runner: trains every variant of a study file, then writes a markdown table and plots.

  python -m moejax.tools.study --study=experiments/studies/<name>.py --out=results/<name>.md
      [--runs=runs/study-<name>] [--steps=N] [--jobs=1] [--variant=NAME ...] [--fresh]

A study file (experiments/studies/) has `VARIANTS = {name: fn(config) -> None}` and
`get_config(variant=None)`: the base config, locked, with VARIANTS[variant] applied
(experiments.studies.apply). First every variant's config is built here and checked by the core's
validation, so a misspelt key or a bad value fails in seconds, before any training. Then each
variant trains in its own process, `python -m moejax.train --config=<study>:<variant>
--workdir=<runs>/<slug>`. A workdir whose config.json is the variant's config is resumed (a finished
run is read back as it is); any other is cleared first, and `--fresh` clears them all. The table
comes from each run's metrics.jsonl; the file is stamped with the command and the git commit.

Optional hooks in the study file:
  TITLE, ABOUT          the heading, and the prose under it (ABOUT may be fn(runs) -> str)
  COLUMNS               {header: fn(run) -> str}: the table's columns after 'variant' and 'changes'
  table(runs)           -> markdown lines that replace the default table
  plot(runs, path)      writes figures (path: the .png beside --out) -> markdown lines showing them
  set_steps(config, n)  what --steps=n changes (default: train.steps)
`runs` is {variant name: Run}, in VARIANTS order.
"""
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from absl import app, flags

from moejax.tools import provenance


class StudyError(Exception):
  """A study that cannot run; the message is one line."""


@dataclasses.dataclass
class Run:
  """One variant: its config, what it changes from the study's base, and its metrics records."""
  name: str
  workdir: str
  config: object
  changes: dict
  flags: list = dataclasses.field(default_factory=list)   # what --steps adds to its training command
  records: list = dataclasses.field(default_factory=list)
  wall_s: float = 0.0      # training time, summed over the runner sessions that finished it
  commit: str = ''         # the commit it was trained at

  @property
  def train(self) -> list[dict]:
    return [r for r in self.records if 'loss' in r]

  @property
  def evals(self) -> list[dict]:
    return [r for r in self.records if 'eval/loss' in r]

  @property
  def final_eval(self) -> float:
    return self.evals[-1]['eval/loss'] if self.evals else math.nan

  @property
  def final_train(self) -> float:
    return self.train[-1]['loss'] if self.train else math.nan

  @property
  def tokens_per_sec(self) -> float:
    """Median over the log windows after the first (which includes compiling)."""
    speeds = [r['tokens_per_sec'] for r in self.train[1:]] or [r['tokens_per_sec'] for r in self.train]
    return statistics.median(speeds) if speeds else math.nan

  def tail_mean(self, key: str, frac: float = 0.25) -> float:
    """Mean of `key` over the last `frac` of the train records."""
    tail = [r[key] for r in self.train[int(len(self.train) * (1 - frac)):] if key in r]
    return statistics.fmean(tail) if tail else math.nan


COLUMNS = {
    'held-out loss': lambda r: f'{r.final_eval:.4f}',
    'final train loss': lambda r: f'{r.final_train:.4f}',
    'tokens/s (median)': lambda r: f'{r.tokens_per_sec:,.0f}',
}


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def flat(config) -> dict:
  """{'a.b.c': value} of every leaf."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict) and v:
        walk(f'{prefix}{k}.', v)
      else:
        out[prefix + k] = v

  walk('', config.to_dict())
  return out


def diff(before: dict, after: dict) -> dict:
  return {k: v for k, v in after.items() if k not in before or before[k] != v}


def one_line(e: Exception) -> str:
  """An exception as one line: ml_collections' locked-key error without its dump of every field."""
  text = str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':   # KeyError quotes its message
    text = text[1:-1]
  text = text.replace('\\n', '\n').replace("\\'", "'")   # ml_collections nests one error's repr in another
  text = re.sub(r'\s*Other fields present: .*?(?=\nDid you mean|$)', '', text, flags=re.S)
  text = ' '.join(l.strip() for l in text.splitlines() if l.strip())
  missing = re.match(r"'([^']*)'\s*(.*)$", text)   # reading a field that does not exist
  if missing and isinstance(e, (AttributeError, KeyError)):
    text = f'no field {missing[1]!r}. {missing[2]}'.strip()
  return text if type(e).__name__ == 'ConfigError' else f'{type(e).__name__}: {text}'


def load_study(path: str):
  if not os.path.isfile(path):
    raise StudyError(f'--study: no file {path}')
  spec = importlib.util.spec_from_file_location(f'study_{slug(os.path.basename(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise StudyError(f'{path}: {one_line(e)}') from e
  variants = getattr(module, 'VARIANTS', None)
  if not isinstance(variants, dict) or not variants or not all(map(callable, variants.values())):
    raise StudyError(f'{path}: needs VARIANTS = {{name: fn(config) -> None, ...}}')
  if not callable(getattr(module, 'get_config', None)):
    raise StudyError(f'{path}: needs get_config(variant=None)')
  slugs = [slug(n) for n in variants]
  if len(set(slugs)) != len(slugs) or not all(slugs):
    raise StudyError(f'{path}: variant names must differ in their letters and digits: {list(variants)}')
  return module


def build(module, path: str, names: list[str], runs_dir: str, steps: int, num_devices: int):
  """{name: Run} of every variant, its config validated (before anything trains)."""
  from moejax.validate import validate
  set_steps = getattr(module, 'set_steps', None) or (lambda c, n: setattr(c.train, 'steps', n))
  try:
    base = flat(module.get_config())
  except Exception as e:
    raise StudyError(f'{path}: get_config(): {one_line(e)}') from e
  out = {}
  for name in names:
    try:
      config = module.get_config(name)
      if not getattr(config, 'is_locked', False):
        raise StudyError('get_config(variant) must lock the config before the variant edits it '
                         '(experiments.studies.apply)')
      changes = diff(base, flat(config))
      step_flags = []
      if steps:
        before = flat(config)
        set_steps(config, steps)
        step_flags = [f'--config.{k}={v}' for k, v in diff(before, flat(config)).items()]
      validate(config, num_devices, check_data=False)
    except Exception as e:
      raise StudyError(f'{path}: variant {name!r}: {one_line(e)}') from e
    out[name] = Run(name, os.path.join(runs_dir, slug(name)), config, changes, step_flags)
  return out


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def state_of(run: Run) -> str:
  """'done' (finished with this config), 'resume' (this config, a checkpoint to resume from) or 'new'."""
  try:
    with open(os.path.join(run.workdir, 'config.json')) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return 'new'
  if saved != json.loads(run.config.to_json_best_effort()):
    return 'new'
  records = read_jsonl(os.path.join(run.workdir, 'metrics.jsonl'))
  steps = run.config.train.steps
  done = any(r['step'] == steps and 'loss' in r for r in records) and any(
      r['step'] == steps and 'eval/loss' in r for r in records)
  if done:
    return 'done'
  ckpt = os.path.join(run.workdir, 'checkpoints')
  return 'resume' if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)) else 'new'


def train(run: Run, cmd: list[str], env: dict, commit: str, echo: bool):
  """Trains (or resumes) one variant; its output goes to <workdir>/train.log (and here if echo)."""
  meta_path = os.path.join(run.workdir, 'study.json')
  state = state_of(run)
  if state == 'new':
    shutil.rmtree(run.workdir, ignore_errors=True)
  os.makedirs(run.workdir, exist_ok=True)
  meta = {}
  if state != 'new' and os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  if state != 'done':
    meta['commit'] = ' + '.join(dict.fromkeys(c for c in (meta.get('commit'), commit) if c))
    with open(meta_path, 'w') as f:   # before training: a run resumed later knows where it began
      json.dump(meta, f)
    print(f'== {run.name} ({"resuming" if state == "resume" else "new run"}): {" ".join(cmd[1:])}', flush=True)
    start = time.perf_counter()
    with open(os.path.join(run.workdir, 'train.log'), 'a') as log:
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for line in proc.stdout:
        log.write(line)
        if echo:
          print(line, end='', flush=True)
      code = proc.wait()
    if code:
      with open(os.path.join(run.workdir, 'train.log')) as f:
        tail = ''.join(f.readlines()[-15:])
      raise StudyError(f'variant {run.name!r}: training exited with {code}; the end of '
                       f'{run.workdir}/train.log:\n{tail}')
    meta['wall_s'] = meta.get('wall_s', 0.0) + time.perf_counter() - start
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    if state_of(run) != 'done':   # e.g. SIGTERM: the trainer saved a checkpoint and exited 0
      raise StudyError(f'variant {run.name!r}: training stopped before step {run.config.train.steps} '
                       f'(see {run.workdir}/train.log); run the study again to resume it')
  run.records = read_jsonl(os.path.join(run.workdir, 'metrics.jsonl'))
  run.wall_s, run.commit = meta.get('wall_s', math.nan), meta.get('commit', 'unknown')
  print(f'-- {run.name}: held-out loss {run.final_eval:.4f}'
        + (' (finished earlier, read back)' if state == 'done' else f' ({run.wall_s:.0f} s)'), flush=True)


def default_plot(runs: dict, path: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in runs.values():
    line, = ax.plot([x['step'] for x in r.train], [x['loss'] for x in r.train], label=f'{r.name} (train)',
                    alpha=0.6)
    ax.plot([x['step'] for x in r.evals], [x['eval/loss'] for x in r.evals], 'o--', color=line.get_color(),
            label=f'{r.name} (held-out)')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [f'![loss curves]({os.path.basename(path)})']


def changes_cell(changes: dict) -> str:
  return '`' + ' '.join(f'{k}={v}' for k, v in changes.items()) + '`' if changes else '(base)'


def default_table(runs: dict, columns: dict) -> list[str]:
  lines = ['| variant | changes | ' + ' | '.join(columns) + ' |', '|---|---|' + '---:|' * len(columns)]
  for r in runs.values():
    lines.append(f'| {r.name} | {changes_cell(r.changes)} | ' + ' | '.join(fn(r) for fn in columns.values()) + ' |')
  return lines


def write_report(module, study: str, out: str, runs: dict, context: dict) -> str:
  stem = os.path.splitext(os.path.basename(out))[0]
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  about = getattr(module, 'ABOUT', '')
  about = about(runs) if callable(about) else about
  step_flags = {' '.join(r.flags) for r in runs.values()}
  step_flags = step_flags.pop() if len(step_flags) == 1 else '<its --steps flags>'
  lines = [f'# {getattr(module, "TITLE", f"Study: {stem}")}', '']
  if about:
    lines += [about, '']
  lines += [
      f'Made by `{context["command"]}` at commit `{context["commit"]}` on {datetime.date.today()}, in '
      f'{context["minutes"]:.1f} min on {os.cpu_count()} CPU cores, {context["jobs"]} run(s) at a time. '
      f'Each variant trains `python -m moejax.train --config={study}:<variant> '
      f'--workdir={context["runs_dir"]}/<variant>{" " + step_flags if step_flags else ""}` '
      f'on {context["devices"]}; "changes" are the config fields the variant sets differently from the '
      f'study\'s base config.', '']
  earlier = [f'{r.name} ({r.commit})' for r in runs.values() if r.commit != context['commit']]
  if earlier:
    lines += [f'Runs trained at another commit and read back (`--fresh` retrains them): {", ".join(earlier)}.', '']
  table = getattr(module, 'table', None)
  lines += table(runs) if table else default_table(runs, getattr(module, 'COLUMNS', COLUMNS))
  lines += ['', *(getattr(module, 'plot', None) or default_plot)(runs, os.path.splitext(out)[0] + '.png'), '']
  text = '\n'.join(lines)
  with open(out, 'w') as f:
    f.write(text)
  return text


def run_study(study: str, out: str, runs_dir: str = '', steps: int = 0, jobs: int = 1, only=(),
              fresh: bool = False) -> str:
  """Builds and validates every variant, trains them, writes `out`; returns its text."""
  command, commit = provenance.command('moejax.tools.study'), provenance.commit()   # before writing
  env = dict(os.environ)   # the runs get the caller's environment ...
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # ... this process leaves them the memory
  import jax
  module = load_study(study)
  names = list(only) or list(module.VARIANTS)
  unknown = [n for n in names if n not in module.VARIANTS]
  if unknown:
    raise StudyError(f'--variant: unknown {unknown}; {study} has {list(module.VARIANTS)}')
  runs_dir = runs_dir or os.path.join('runs', f'study-{os.path.splitext(os.path.basename(study))[0]}')
  devices = jax.devices()
  built = build(module, study, names, runs_dir, steps, len(devices))
  print(f'{study}: {len(built)} variant(s) valid on {len(devices)} {devices[0].platform} device(s)', flush=True)
  if fresh:
    for run in built.values():
      shutil.rmtree(run.workdir, ignore_errors=True)
  if jobs > 1:   # prepare each data.dir once, before parallel runs would each prepare it
    from moejax.data.ensure import ensure_data
    for run in {r.config.data.dir: r for r in built.values()}.values():
      ensure_data(run.config)
  start = time.time()

  def one(name):
    run = built[name]
    cmd = [sys.executable, '-m', 'moejax.train', f'--config={study}:{name}', f'--workdir={run.workdir}',
           *run.flags]
    train(run, cmd, env, commit, echo=jobs == 1)
    return run

  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    futures = [pool.submit(one, name) for name in names]
    try:
      runs = {r.name: r for r in (f.result() for f in futures)}
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise
  context = {'command': command, 'commit': commit, 'minutes': (time.time() - start) / 60, 'jobs': jobs,
             'runs_dir': runs_dir,
             'devices': f'{len(devices)} {devices[0].platform} device(s)'}
  return write_report(module, study, out, runs, context)


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    text = run_study(f.study, f.out, f.runs, f.steps, f.jobs, f.variant or (), f.fresh)
  except StudyError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(text)
  print(f'wrote {f.out}')


if __name__ == '__main__':
  flags.DEFINE_string('study', None, 'Study file: experiments/studies/<name>.py.', required=True)
  flags.DEFINE_string('out', None, 'Markdown file to write (plots go beside it).', required=True)
  flags.DEFINE_string('runs', '', 'Where the variants train (default runs/study-<name>).')
  flags.DEFINE_integer('steps', 0, 'Training steps per variant (0 = the study\'s own; see set_steps).')
  flags.DEFINE_integer('jobs', 1, 'Variants trained at once.')
  flags.DEFINE_multi_string('variant', [], 'Train only these variants (repeatable); default all.')
  flags.DEFINE_bool('fresh', False, 'Clear every variant\'s workdir first (no run is resumed or read back).')
  app.run(main)
