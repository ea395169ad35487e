"""The manifest stage: writes manifest.json and the tokenizer into the work folder's final/, then
puts final/ at --out; and `finished`, whether --out already holds what a plan makes."""
import collections
import json
from pathlib import Path

from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from moejax.data.steps import FORMAT_VERSION, Plan, PrepareError, load_tokenizer, token_dtype


def _count(v) -> int:
  return int(v['total'] if isinstance(v, dict) else v)


class Finish(PipelineStep):
  """Writes manifest.json (shards, counts, filter and dedup drops) and the tokenizer into final/,
  then puts final/ at --out (a previous --out is replaced only now, by a finished one)."""
  name = 'moejax manifest'
  type = '💽 - WRITER'

  def __init__(self, plan: Plan, filters: tuple[str, ...]):
    super().__init__()
    self.plan, self.filters = plan, filters

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    plan, work = self.plan, get_datafolder(self.plan.work)
    if not work.exists('final/manifest.json') and finished(plan):   # moved before a kill
      return iter(())
    parts = [json.loads(work.open(f'shards/{p:05d}.json', 'rt').read())
             for p in range(plan.num_partitions)]
    splits = {}
    for split in ('train', 'val'):
      shards = [s for part in parts for s in part['splits'][split]]
      splits[split] = {k: sum(s[k] for s in shards)
                       for k in ('num_docs', 'num_entries', 'num_tokens', 'num_original_tokens')}
      splits[split]['shards'] = shards
    num_docs = sum(s['num_docs'] for s in splits.values())
    if not splits['train']['num_docs'] or not splits['val']['num_docs']:
      raise PrepareError(f"inputs {','.join(plan.manifest['inputs'])} are empty or hold fewer than "
                         f'2 documents ({num_docs} documents after filters and dedup)')
    tok, info = load_tokenizer(work)
    for name in work.list_files('tokenizer'):
      if not name.endswith('manifest.json'):
        with work.open(f'final/{Path(name).name}', 'wb') as f:
          f.write(work.open(name, 'rb').read())
    filters, bad_records = self._filter_stats(work)
    merged = lambda key: dict(sum((collections.Counter(p[key]) for p in parts), collections.Counter()))
    removed = sum(p['docs_removed'] for p in parts)
    manifest = {
        'format_version': FORMAT_VERSION, **plan.manifest,
        'tokenizer': info['tokenizer'], 'tokenizer_sha256': info['tokenizer_sha256'],
        'vocab_size': tok.vocab_size, 'eod_id': tok.eod_id,
        'token_dtype': token_dtype(tok.vocab_size).name,
        'duplicate_docs_removed': removed,
        'dedup': {'method': plan.dedup, 'docs_removed': removed},
        'filters': filters, 'bad_records_skipped': bad_records,
        'variants': {'names': merged('variant_names'),
                     'docs_with_n_variants': dict(sorted(merged('docs_with_n_variants').items()))},
        'files': {f'{s["name"]}.{suffix}.npy': work.size(f'final/{s["name"]}.{suffix}.npy')
                  for split in splits.values() for s in split['shards']
                  for suffix in ('tokens', 'docs', 'variants')},
        'splits': splits}
    with work.open('final/manifest.json', 'wt') as f:
      f.write(json.dumps(manifest, indent=2) + '\n')
    put_in_place(work, plan.out)
    return iter(())

  def _filter_stats(self, work) -> tuple[dict, int]:
    """Documents each filter dropped (with datatrove's reasons) and malformed records skipped,
    from the tokenize stage's task stats."""
    filters = {name: {'dropped': 0} for name in self.filters}
    bad = 0
    for name in work.list_files('logs/tokenize/stats', glob_pattern='*.json'):
      steps = json.loads(work.open(name, 'rt').read())
      bad += _count(steps[0]['stats'].get('bad_records', 0))
      for fname, step in zip(self.filters, steps[1:]):
        for key, value in step['stats'].items():
          if key not in ('total', 'forwarded'):
            filters[fname][key] = filters[fname].get(key, 0) + _count(value)
    return filters, bad


def finished(plan: Plan) -> bool:
  """Whether --out already holds what this plan makes (same inputs, arguments and code)."""
  try:
    fs, path = _fs(plan.out)
    with fs.open(f'{path}/manifest.json', 'rt') as f:
      return json.load(f).get('fingerprint') == plan.manifest['fingerprint']
  except (OSError, ValueError):
    return False


def _fs(url: str):
  import fsspec
  return fsspec.core.url_to_fs(url)


def put_in_place(work, out_url: str):
  """final/ becomes --out: local directories are swapped by rename (the previous one removed
  afterwards); other file systems move the tree."""
  fs, out = _fs(out_url)
  final = f'{work.path}/final'
  if work.is_local():
    import shutil
    out_path, trash = Path(out), Path(work.path) / 'trash'
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
      trash.mkdir(exist_ok=True)
      out_path.rename(trash / 'previous')
    Path(final).rename(out_path)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    if fs.exists(out):
      fs.rm(out, recursive=True)
    work.fs.mv(final, out, recursive=True)
