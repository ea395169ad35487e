"""The CPU speedrun: wall time to a fixed held-out loss on fixed data, and its leaderboard.

    make speedrun                     # the leaderboard's recipe (experiments/speedrun.py)
    make speedrun RECIPE=baseline     # another recipe of experiments/speedrun.py
    python -m moejax.speedrun --config=experiments/speedrun.py:baseline

The rules (docs/speedrun.md): the embedded Shakespeare corpus as `make data` prepares it; the held-out
set is the first HELDOUT_SEQUENCES windows of SEQ_LEN tokens of its val split (its token files and
tokenizer are fingerprinted in results/speedrun.json: a run on other data is refused); the target is
TARGET_LOSS held-out loss, evaluated at least every MAX_EVAL_EVERY steps; the clock is the wall time
of the training command, compile included. Everything else (optimizer, learning rates, batch, init,
balancing, architecture, step budget) is the recipe's. A run that reaches the target appends an
entry to results/speedrun.json and rewrites results/speedrun.md, fastest first.
"""
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

DATA_DIR = 'data/shakespeare/prepared'
SEQ_LEN = 128
HELDOUT_SEQUENCES = 128          # 16,384 held-out tokens
TARGET_LOSS = 4.55              # experiments/default.py reaches it in ~5 min here (docs/speedrun.md)
MAX_EVAL_EVERY = 25



class SpeedrunError(Exception):
  """A run that cannot be an entry (other rules, other data, target not reached)."""


def heldout_fingerprint(data_dir: str) -> dict:
  """The sha256 of the val split's token files and of the tokenizer, from the data dir."""
  d = Path(data_dir)
  manifest_path = d / 'manifest.json'
  if not manifest_path.is_file():
    raise SpeedrunError(f'{data_dir}: not prepared (run `make data`)')
  manifest = json.loads(manifest_path.read_text())
  h = hashlib.sha256()
  for name in sorted(n for n in manifest['files'] if n.startswith('val/')):
    h.update(name.encode())
    h.update((d / name).read_bytes())
  return {'heldout_sha256': h.hexdigest(), 'tokenizer_sha256': manifest['tokenizer_sha256']}


def check_rules(config) -> None:
  """The recipe may not change what is measured (data, held-out set, target, eval cadence)."""
  t = config.train
  problems = []
  if Path(config.data.dir).resolve() != Path(DATA_DIR).resolve():
    problems.append(f'data.dir is {config.data.dir!r}, the speedrun reads {DATA_DIR}')
  if config.data.get('sources'):
    problems.append('data.sources is set: the speedrun trains on data.dir alone')
  if t.seq_len != SEQ_LEN:
    problems.append(f'train.seq_len is {t.seq_len}: the held-out set is windows of {SEQ_LEN} tokens')
  if HELDOUT_SEQUENCES % t.batch_size:
    problems.append(f'train.batch_size {t.batch_size} does not divide the {HELDOUT_SEQUENCES} held-out sequences')
  if t.target_loss not in (0.0, TARGET_LOSS):
    problems.append(f'train.target_loss is {t.target_loss}: the target is {TARGET_LOSS}')
  if t.eval_every > MAX_EVAL_EVERY:
    problems.append(f'train.eval_every is {t.eval_every}: at most {MAX_EVAL_EVERY}, to stop near the target')
  if problems:
    raise SpeedrunError('not a speedrun config: ' + '; '.join(problems))


def load_board(results: Path) -> dict:
  path = results / 'speedrun.json'
  return json.loads(path.read_text()) if path.is_file() else {'rules': None, 'runs': []}


def rules_record(fingerprint: dict) -> dict:
  return {'data_dir': DATA_DIR, 'seq_len': SEQ_LEN, 'heldout_sequences': HELDOUT_SEQUENCES,
          'target_loss': TARGET_LOSS, 'max_eval_every': MAX_EVAL_EVERY, **fingerprint}


def check_board_rules(board: dict, rules: dict) -> None:
  """A leaderboard compares runs under one set of rules: the same held-out set, tokenizer, target."""
  if board['rules'] is None:
    return
  changed = [f'{k} {board["rules"].get(k)!r} -> {v!r}' for k, v in rules.items() if board['rules'].get(k) != v]
  if changed:
    raise SpeedrunError('the held-out set, tokenizer or target differ from the leaderboard\'s ('
                        + '; '.join(changed) + '): no entry')


def commit() -> str:
  def git(*a):
    return subprocess.run(['git', *a], capture_output=True, text=True).stdout.strip()
  sha = git('rev-parse', '--short', 'HEAD') or 'unknown'
  dirty = git('status', '--porcelain', '--untracked-files=no')
  return sha + ('-dirty' if dirty else '')


def device() -> str:
  import jax
  d = jax.devices()
  return f'{d[0].platform} x{len(d)} ({d[0].device_kind}), {os.cpu_count()} host cores, {platform.machine()}'


def read_result(workdir: Path) -> dict:
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines() if l.strip()]
  evals = [r for r in records if 'eval/loss' in r]
  reached = [r for r in records if r.get('event') == 'target_reached']
  last = evals[-1] if evals else {}
  return {'reached_step': reached[-1]['step'] if reached else None, 'eval': last,
          'train': [r for r in records if 'loss' in r]}


def entry_for(config, recipe: str, change: str, wall_time_s: float, result: dict, rules: dict,
              config_sha256: str) -> dict:
  t = config.train
  step = result['reached_step']
  e = result['eval']
  return {'recipe': recipe, 'change': change, 'wall_time_s': round(wall_time_s, 1), 'steps': step,
          'tokens': step * t.batch_size * t.seq_len, 'final_loss': round(e['eval/loss'], 4),
          'bpb': round(e['eval/main/bpb'], 4), 'target_loss': rules['target_loss'],
          'config_sha256': config_sha256, 'commit': commit(), 'device': device(),
          'date': datetime.date.today().isoformat()}


def leaderboard_md(board: dict) -> str:
  runs = sorted(board['runs'], key=lambda r: r['wall_time_s'])
  r = board['rules']
  lines = [
      '# CPU speedrun leaderboard', '',
      f'Written by `make speedrun` (moejax.speedrun) at commit {runs[-1]["commit"] if runs else "-"} '
      '(each row names the commit and command that made it; `make speedrun RECIPE=<name>` reruns one).', '',
      f'Wall time of the training command (compile included) until the held-out loss of the first '
      f'{r["heldout_sequences"]} windows of {r["seq_len"]} tokens of `{r["data_dir"]}`\'s val split is '
      f'<= {r["target_loss"]} (evaluated every <= {r["max_eval_every"]} steps). Held-out set sha256 '
      f'`{r["heldout_sha256"][:16]}`, tokenizer `{r["tokenizer_sha256"][:16]}`. Rules: docs/speedrun.md.', '',
      '| rank | wall time (s) | steps | tokens | held-out loss | bpb | recipe | change | commit | device | date |',
      '|---:|---:|---:|---:|---:|---:|---|---|---|---|---|']
  for i, x in enumerate(runs, 1):
    lines.append(f'| {i} | {x["wall_time_s"]:.1f} | {x["steps"]} | {x["tokens"]:,} | {x["final_loss"]:.4f} | '
                 f'{x["bpb"]:.4f} | `{x["recipe"]}` | {x["change"]} | {x["commit"]} | {x["device"]} | {x["date"]} |')
  return '\n'.join(lines) + '\n'


def write_board(results: Path, board: dict) -> None:
  results.mkdir(parents=True, exist_ok=True)
  for name, text in (('speedrun.json', json.dumps(board, indent=2) + '\n'), ('speedrun.md', leaderboard_md(board))):
    tmp = results / f'.{name}.tmp'
    tmp.write_text(text)
    os.replace(tmp, results / name)   # atomic: an interrupted write never leaves half a board


def config_arg() -> tuple[str, str]:
  """(the --config value, the recipe name) as given on the command line."""
  given = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), 'experiments/speedrun.py')
  _, _, recipe = given.partition(':')
  return given, recipe


def run(config, config_path: str, recipe: str, workdir: Path, results: Path, overrides: list[str],
        change: str = '') -> dict:
  """Trains `recipe` to the target and appends its entry; `change` is its CHANGES line."""
  check_rules(config)
  rules = rules_record(heldout_fingerprint(config.data.dir))
  board = load_board(results)
  check_board_rules(board, rules)
  if workdir.exists():
    raise SpeedrunError(f'workdir {workdir} exists: a speedrun starts from scratch')
  cmd = [sys.executable, '-m', 'moejax.train', f'--config={config_path}', f'--workdir={workdir}', *overrides,
         f'--config.train.eval_batches={HELDOUT_SEQUENCES // config.train.batch_size}',
         f'--config.train.target_loss={TARGET_LOSS}']
  print('speedrun: ' + ' '.join(cmd[1:]), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise SpeedrunError(f'training exited with code {proc.returncode}: no entry')
  result = read_result(workdir)
  if result['reached_step'] is None:
    e = result['eval']
    raise SpeedrunError(f'{recipe or "default"}: held-out loss {e.get("eval/loss", float("nan")):.4f} at its '
                        f'last step {e.get("step")}, above the target {TARGET_LOSS}: no entry')
  config_json = (workdir / 'config.json').read_bytes()
  entry = entry_for(config, recipe or 'default', change, wall, result, rules,
                    hashlib.sha256(config_json).hexdigest()[:16])
  board['rules'] = rules
  board['runs'].append(entry)
  write_board(results, board)
  return entry


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config_path, recipe = config_arg()
  module = _load_changes(config_path)
  recipe = recipe or getattr(module, 'BEST', '')   # the name the leaderboard shows
  config = _CONFIG.value
  stamp = time.strftime('%Y%m%d-%H%M%S')
  workdir = Path(_WORKDIR.value or f'runs/speedrun/{recipe or "default"}-{stamp}')
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  try:
    e = run(config, config_path, recipe, workdir, Path(_RESULTS.value), overrides,
            change=getattr(module, 'CHANGES', {}).get(recipe, ''))
  except SpeedrunError as err:
    print(f'speedrun: {err}', file=sys.stderr)
    sys.exit(1)
  print(f'speedrun: {e["recipe"]} reached held-out {e["final_loss"]:.4f} <= {e["target_loss"]} in '
        f'{e["wall_time_s"]:.1f} s ({e["steps"]} steps, {e["tokens"]:,} tokens); entry added to '
        f'{_RESULTS.value}/speedrun.json and speedrun.md', flush=True)


def _load_changes(config_path: str):
  """The recipe file's CHANGES ({recipe: what it changes}), for the leaderboard's change column."""
  import importlib.util
  path = config_path.partition(':')[0]
  spec = importlib.util.spec_from_file_location('speedrun_recipes', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


if __name__ == '__main__':   # flags defined here: importing this module (tests) defines none
  _CONFIG = config_flags.DEFINE_config_file('config', 'experiments/speedrun.py', 'Speedrun recipe (file[:recipe]).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/speedrun/<recipe>-<time>).')
  _RESULTS = flags.DEFINE_string('results', 'results', 'Folder of speedrun.json and speedrun.md.')
  from moejax import cli
  cli.check_config_args(sys.argv, default=_CONFIG.default)
  app.run(main)
