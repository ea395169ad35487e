"""Training's data step: prepare `data.dir` from `data.raw` on first use (moejax.data.prepare)."""
import json
import os
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from moejax.data.prepare import prepare


def ensure_data(config):
  """Prepares `data.dir` from the raw text in `data.raw` (a no-op when it is up to date). A data.dir
  prepared some other way (other inputs, e.g. raw text plus rephrasings, or a given tokenizer) is
  left as it is.

  With several processes, process 0 prepares first and the others then find it up to date on a
  shared file system (or prepare the same bytes on their own disks)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      _prepare(config)
    multihost_utils.sync_global_devices('moejax.ensure_data')
    if jax.process_index() == 0:
      return
  _prepare(config)


def _prepare(config):
  d = config.data
  if not (d.raw and os.path.isdir(d.raw)):
    return
  manifest = Path(d.dir) / 'manifest.json'
  if manifest.is_file():
    try:
      m = json.loads(manifest.read_text())
    except json.JSONDecodeError:
      m = None   # unreadable: prepare it again
    if m is not None and ([Path(p).resolve() for p in m.get('inputs', [])] != [Path(d.raw).resolve()]
                          or m.get('args', {}).get('tokenizer_sha256')):
      return
  import fcntl
  out = Path(d.dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Runs started together (tests, a sweep) share one work folder: one prepares, the others wait
  # and then find it up to date.
  with open(out.parent / f'.{out.name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    msg = prepare(Path(d.raw), out, config.model.vocab_size, None, 0.05, config.seed,
                  variant_regex=d.get('variant_regex', ''))
  if 'up to date' not in msg:
    print(msg, flush=True)
