"""The data config a checkpointed iterator position refers to.

A checkpoint stores the data iterator's position (the index of the next global batch). That index
means the same batches only under the same data config: the sources (their directories and the
exact prepared data, by the sha256 of manifest.json), their weights, epoch budgets, variant
policies, document fractions and score filters/weights (with the sha256 of a scored source's
scores.json), train.seq_len, train.batch_size and the seed. The fingerprint is
that config as a flat {field: value} dict saved next to the position; on resume `changes` names
what differs. The number of processes and of prefetch workers are left out: the position means
the same batches whatever they are.
"""
import hashlib
from pathlib import Path

SOURCE_FIELDS = ('dir', 'weight', 'epochs', 'variant_policy', 'doc_fraction')
SCORE_FIELDS = ('min_score', 'score_weights')   # only when set: older fingerprints stay equal


def file_sha256(path: Path) -> str | None:
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def manifest_sha256(data_dir: str) -> str | None:
  return file_sha256(Path(data_dir) / 'manifest.json')


def fingerprint(sources, *, seq_len: int, batch_size: int, seed: int) -> dict:
  """{config field: value} for the pipeline's sources (moejax.data.pipeline.Source) and shapes."""
  out = {'seed': seed, 'train.seq_len': seq_len, 'train.batch_size': batch_size}
  for s in sources:
    for f in SOURCE_FIELDS:
      out[f'{s.field}.{f}'] = getattr(s, f)
    out[f'{s.field}.dir/manifest.json sha256'] = manifest_sha256(s.dir)
    if getattr(s, 'scored', False):   # the scores select and weigh its documents
      for f in SCORE_FIELDS:
        if getattr(s, f) is not None:
          out[f'{s.field}.{f}'] = getattr(s, f)
      out[f'{s.field}.dir/scores.json sha256'] = file_sha256(Path(s.dir) / 'scores.json')
  return out


def _show(value) -> str:
  if value is None:
    return 'absent'
  if isinstance(value, str) and len(value) == 64:  # a sha256
    return value[:12]
  return repr(value)


def changes(saved: dict, current: dict) -> list[str]:
  """'field old -> new' for every field that differs, in a stable order."""
  return [f'{k} {_show(saved.get(k))} -> {_show(current.get(k))}'
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def describe(saved: dict, current: dict, limit: int = 4) -> str:
  """The changes on one line, at most `limit` of them spelled out."""
  c = changes(saved, current)
  more = f' (+{len(c) - limit} more)' if len(c) > limit else ''
  return '; '.join(c[:limit]) + more


def resume_state(saved: dict, current_fp: dict, allow_change: bool, log=print) -> dict:
  """The iterator state in a checkpoint's data item ({'iterator', 'fingerprint'}), after checking
  that the data config is the one it was saved under; raises DataError naming what changed."""
  from moejax.data.shards import DataError
  if 'fingerprint' not in saved:   # written before fingerprints: the item is the iterator state
    log('checkpoint has no data fingerprint; the data config cannot be checked')
    return saved
  if saved['fingerprint'] != current_fp:
    what = describe(saved['fingerprint'], current_fp)
    n = saved['iterator']['next_index']
    if not allow_change:
      raise DataError(f'data: config differs from the checkpoint\'s: {what}; its saved '
                      f'position (batch {n}) would index another stream; restore those values '
                      'or pass --allow_data_change to go on from that batch index of the new '
                      'stream')
    log(f'--allow_data_change: data config differs from the checkpoint\'s: {what}; going on '
        f'from batch {n} of the new stream')
  return saved['iterator']
