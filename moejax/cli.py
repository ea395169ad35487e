"""Command-line checks run before flag parsing, so a misused CLI answers in one line: a missing
experiment file names the path; an unknown `--config.a.b` override names the key and the closest
valid ones."""
import difflib
import importlib.util
import os
import sys


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_arg(argv: list[str], default: str) -> str:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return default


def load_config(spec: str):
  """The ConfigDict of `path.py[:arg]` (as ml_collections' config_flags loads it)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    _fail(f'--config: no experiment file {path}')
  module_spec = importlib.util.spec_from_file_location('_moejax_experiment', path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, os.getcwd())   # experiment files import `experiments.*`
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def leaf_keys(config, prefix: str = '') -> list[str]:
  """Every settable dotted key of a ConfigDict (groups included, so a whole group may be set)."""
  keys = []
  for k, v in config.items():
    keys.append(f'{prefix}{k}')
    if hasattr(v, 'items') and not isinstance(v, (str, bytes)):
      keys.extend(leaf_keys(v, f'{prefix}{k}.'))
  return keys


def closest(key: str, keys: list[str], n: int = 3) -> list[str]:
  """Keys spelt like `key`, then keys that end in its last name (a setting moved to a group)."""
  near = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
  last = key.rsplit('.', 1)[-1]
  moved = [k for k in keys if k.rsplit('.', 1)[-1] == last and k not in near]
  near += moved + difflib.get_close_matches(last, [k.rsplit('.', 1)[-1] for k in keys], n=n)
  seen, out = set(), []
  for k in near:
    full = k if k in keys else next((c for c in keys if c.endswith('.' + k)), k)
    if full not in seen:
      seen.add(full)
      out.append(full)
  if not out:   # nothing spelt alike: the nearest settings of the same group
    parent = key.rsplit('.', 1)[0] + '.' if '.' in key else ''
    group = [k for k in keys if k.startswith(parent) and '.' not in k[len(parent):]] or keys
    out = difflib.get_close_matches(key, group, n=n, cutoff=0)
  return out[:n]


def check_config_args(argv: list[str], default: str, flag: str = 'config'):
  """Exits with one line when --config names no file or an override names no setting."""
  prefix = f'--{flag}.'
  overrides = [a[len(prefix):].split('=', 1)[0] for a in argv[1:] if a.startswith(prefix)]
  spec = _config_arg(argv, default)
  if not overrides and os.path.isfile(spec.partition(':')[0]):
    return
  config = load_config(spec)
  keys = leaf_keys(config)
  for key in overrides:
    if key not in keys:
      near = closest(key, keys)
      _fail(f'--{flag}.{key}: no such setting in {spec}'
            + (f'; closest: {", ".join(near)}' if near else ''))
