"""Prepare one source for training: read raw inputs (streaming), filter, deduplicate (exact or
MinHash), split train/val by document, tokenize, and write many shards -- a datatrove pipeline
that runs on this machine's cores, on Slurm or on Ray, and resumes where a killed run stopped.

python -m moejax.data.prepare --raw='corpus/*.jsonl.zst' --out=data/web/prepared \
    [--raw=more/ ...] [--vocab_size=4096 | --tokenizer=path/to/tokenizer.json | --tokenizer=prepared/dir \
     | --tokenizer=r50k_base.tiktoken [--tiktoken_pattern=gpt2]] [--tokenizer_sample_mb=256] \
    [--dedup=exact|minhash|none] [--filters=gopher_quality,gopher_repetition,c4,fineweb] \
    [--shard_tokens=500000000] [--val_fraction=0.05] [--seed=0] \
    [--text_field=text] [--id_field=id] [--bad_records=stop|skip] \
    [--variant_regex='(?P<doc>.+?)_gut(?:_(?P<variant>f))?'] [--no_split] \
    [--executor=local --workers=N | --executor=slurm --slurm_partition=P ... | --executor=ray]

--raw: files, directories, globs or fsspec URLs of .txt, .jsonl[.gz|.zst] and .parquet files
(moejax.data.sources says how records and their variants are read). Stages (moejax.data.steps,
shard_writer, finish): [train the tokenizer on a bounded sample] -> per raw file: read, filter,
tokenize, sign for dedup -> datatrove's dedup buckets and clusters -> per partition of documents:
join variants, drop duplicates, split, write shards -> manifest. Deduplication looks at
originals, before the split, so no document has a copy on the other side; a removed original
takes its rephrasings with it.

--out gets train/ and val/ shards ({p:05d}-{k:05d}.{tokens,docs,variants}.npy: token ids, entry
offsets, document -> entries; see moejax.data.shards), tokenizer.json (or tokenizer.tiktoken) and
manifest.json (shards, counts, filter drops, dedup removals). The work happens in a folder next
to --out named after the inputs and arguments; a killed run (even kill -9) is resumed by the same
command, byte for byte, and --out is replaced only by a finished run.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from moejax.data import executors, sources, tokenizer as tokenizers
from moejax.data.sources import SourceError
from moejax.data.steps import FORMAT_VERSION, Plan, PrepareError  # noqa: F401 (re-export)
from moejax.data.tokenizer import EOD_TOKEN, TokenizerError

DEDUPS = ('exact', 'minhash', 'none')
PARTITION_BYTES = 1 << 30   # raw bytes per join/write partition: bounds a shard writer's memory
DEFAULT_SHARD_TOKENS = 500_000_000   # ~1 GB of uint16 tokens


def _filter_steps(names: tuple[str, ...]) -> list:
  from datatrove.pipeline import filters as f
  table = {'gopher_quality': f.GopherQualityFilter, 'gopher_repetition': f.GopherRepetitionFilter,
           'c4': f.C4QualityFilter, 'fineweb': f.FineWebQualityFilter}
  return [table[n]() for n in names]


FILTERS = ('gopher_quality', 'gopher_repetition', 'c4', 'fineweb')


def load_given_tokenizer(path: str, tiktoken_pattern: str = ''):
  """--tokenizer: a prepared directory, a .tiktoken ranks file or a tokenizer.json."""
  path = Path(path)
  if path.is_dir():
    manifest = path / 'manifest.json'
    if not manifest.is_file():
      raise PrepareError(f'--tokenizer {path}: a directory without manifest.json '
                         '(give a prepared directory or a tokenizer file)')
    if tiktoken_pattern:
      raise PrepareError(f'--tiktoken_pattern: not with a prepared directory ({path} '
                         "records its tokenizer's pattern)")
    m = json.loads(manifest.read_text())
    tok = tokenizers.from_prepared(path, m)
    if tok.info['sha256'] != m.get('tokenizer_sha256'):   # replaced or edited after preparing
      raise PrepareError(f"--tokenizer {path}: its tokenizer file does not match the tokenizer its "
                         f"data was made with ({tokenizers.describe(m)} in manifest.json, the file "
                         f"has sha256 {tok.info['sha256'][:12]})")
    return tok
  if not path.is_file():
    raise PrepareError(f'--tokenizer {path}: no such file or directory')
  if path.suffix == '.tiktoken':
    return tokenizers.load_tiktoken(path, tiktoken_pattern)
  if tiktoken_pattern:
    raise PrepareError(f'--tiktoken_pattern: only for a .tiktoken --tokenizer, not {path}')
  return tokenizers.load_json(path)


def raw_fingerprint(files: list[str]) -> str:
  """Hash of the raw inputs: local files by content, remote ones by size and their store's
  checksum (fsspec `ukey`: etag/md5/generation), so a changed input is prepared again."""
  h = hashlib.sha256()
  for url in files:
    fs, path = fsspec.core.url_to_fs(url)
    h.update(url.encode() + b'\0')
    if isinstance(fs, LocalFileSystem):
      with open(path, 'rb') as f:
        h.update(hashlib.file_digest(f, 'sha256').digest())
    else:
      h.update(f'{fs.size(path)}:{fs.ukey(path)}'.encode())
  return h.hexdigest()


def _work_dir(out: str, fingerprint: str) -> str:
  parent, name = out.rstrip('/').rsplit('/', 1) if '/' in out.rstrip('/') else ('.', out)
  return f'{parent}/.{name}.prepare-{fingerprint[:16]}'


def _remove_stale_work_dirs(out: str, keep: str):
  """Work folders of other inputs/arguments for this --out cannot be resumed by this command."""
  fs, path = fsspec.core.url_to_fs(out)
  parent, name = path.rstrip('/').rsplit('/', 1) if '/' in path.rstrip('/') else ('.', path)
  keep_name = keep.rstrip('/').rsplit('/', 1)[-1]
  try:
    for p in fs.ls(parent, detail=False):
      base = p.rstrip('/').rsplit('/', 1)[-1]
      if base.startswith(f'.{name}.prepare-') and base != keep_name:
        fs.rm(p, recursive=True)
  except FileNotFoundError:
    pass


def _rm(url: str):
  fs, path = fsspec.core.url_to_fs(url)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def stages(plan: Plan, filters: tuple[str, ...], train_tokenizer: bool) -> list:
  from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster
  from moejax.data import finish, shard_writer, steps
  from moejax.data.executors import Stage
  out, T, work = [], len(plan.files), plan.work
  if train_tokenizer:
    out.append(Stage('tokenizer', [steps.RawReader(plan), *_filter_steps(filters),
                                   steps.TrainTokenizer(plan)], tasks=1))
  out.append(Stage('tokenize', [steps.RawReader(plan), *_filter_steps(filters),
                                steps.TokenizeRecords(plan)], tasks=T))
  if plan.dedup != 'none':
    cfg = steps.dedup_config(plan.dedup)
    out.append(Stage('dedup_buckets', [MinhashDedupBuckets(f'{work}/sig', f'{work}/dups', config=cfg)],
                     tasks=cfg.num_buckets))
    out.append(Stage('dedup_clusters', [MinhashDedupCluster(f'{work}/dups', f'{work}/remove', config=cfg)],
                     tasks=1))
  out.append(Stage('write_shards', [shard_writer.WriteShards(plan)], tasks=plan.num_partitions))
  out.append(Stage('manifest', [finish.Finish(plan, filters)], tasks=1))
  return out


def prepare(raw: list[str] | str | Path, out: str | Path, vocab_size: int = 4096,
            tokenizer_path: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0, *,
            variant_regex: str = '', split_headings: bool = True, text_field: str = 'text',
            id_field: str = 'id', tiktoken_pattern: str = '', dedup: str = 'exact',
            filters: tuple[str, ...] = (), shard_tokens: int = DEFAULT_SHARD_TOKENS,
            tokenizer_sample_mb: float = 256, bad_records: str = 'stop',
            engine: executors.EngineOptions = executors.EngineOptions(), log=None) -> str:
  """Runs the recipe; returns the one-line status message (PrepareError for bad inputs)."""
  log = log or (lambda m: None)
  raw = [str(raw)] if isinstance(raw, (str, Path)) else [str(r) for r in raw]
  out = str(out)
  if not 0.0 < val_fraction < 1.0:
    raise PrepareError(f'--val_fraction must be in (0, 1), got {val_fraction}')
  if dedup not in DEDUPS:
    raise PrepareError(f'--dedup: unknown {dedup!r}; choose one of {list(DEDUPS)}')
  unknown = [f for f in filters if f not in FILTERS]
  if unknown:
    raise PrepareError(f'--filters: unknown {unknown}; choose from {list(FILTERS)}')
  if shard_tokens < 1 or engine.workers < 1 or tokenizer_sample_mb <= 0:
    raise PrepareError('--shard_tokens, --workers and --tokenizer_sample_mb must be > 0')
  if bad_records not in ('stop', 'skip'):
    raise PrepareError(f"--bad_records: 'stop' or 'skip', not {bad_records!r}")
  if engine.kind not in executors.EXECUTORS:
    raise PrepareError(f'--executor: unknown {engine.kind!r}; choose one of {list(executors.EXECUTORS)}')
  opts = sources.ReadOptions(text_field=text_field, id_field=id_field,
                             split_headings=split_headings, variant_regex=variant_regex,
                             skip_bad_records=bad_records == 'skip')
  try:
    given = None if tokenizer_path is None else load_given_tokenizer(tokenizer_path, tiktoken_pattern)
    files = sources.expand(raw)
    for url in files:
      sources.check_readable(url, opts)
  except (SourceError, TokenizerError) as e:
    raise PrepareError(str(e)) from None
  if given is None and tiktoken_pattern:
    raise PrepareError('--tiktoken_pattern: only with --tokenizer=<file>.tiktoken')
  if given is not None and given.eod_id is None:
    raise PrepareError(f'--tokenizer {tokenizer_path}: has no {EOD_TOKEN} token')

  args = {'format_version': FORMAT_VERSION, 'vocab_size': vocab_size, 'seed': seed,
          'val_fraction': val_fraction, 'variant_regex': variant_regex,
          'split_headings': split_headings, 'text_field': text_field, 'id_field': id_field,
          'dedup': dedup, 'filters': list(filters), 'shard_tokens': shard_tokens,
          'tokenizer_sample_mb': tokenizer_sample_mb, 'bad_records': bad_records,
          'tokenizer_sha256': given and given.info['sha256']}
  raw_sha256 = raw_fingerprint(files)
  fingerprint = hashlib.sha256(json.dumps([raw_sha256, args], sort_keys=True).encode()).hexdigest()
  work = _work_dir(out, fingerprint)
  total_bytes = sum(fs.size(path) for fs, path in map(fsspec.core.url_to_fs, files))
  plan = Plan(files=tuple(files), read=opts, work=work, out=out,
              num_partitions=max(1, math.ceil(total_bytes / PARTITION_BYTES)), dedup=dedup, seed=seed,
              val_fraction=val_fraction, shard_tokens=shard_tokens, vocab_size=vocab_size,
              tokenizer_sample_bytes=int(tokenizer_sample_mb * 2**20),
              manifest={'fingerprint': fingerprint, 'raw_sha256': raw_sha256, 'args': args,
                        'inputs': raw, 'num_raw_files': len(files), 'raw_bytes': total_bytes})
  from moejax.data import finish, steps
  if finish.finished(plan):
    return f'prepared data up to date: {out}'

  _remove_stale_work_dirs(out, work)
  if given is not None:
    steps.save_tokenizer(work, given)
  last = executors.chain(stages(plan, tuple(filters), given is None), work, engine)
  start = time.perf_counter()
  try:
    last.run()
  except (SourceError, TokenizerError, PrepareError) as e:   # bad input: resuming would not help
    _rm(work)
    raise PrepareError(str(e)) from None
  if engine.kind == 'slurm':
    return (f'submitted the prepare stages of {out} to Slurm (logs in {work}/logs); run the same '
            'command again after they finish: it prints "prepared data up to date"')
  if not finish.finished(plan):
    raise PrepareError(f'{work}: some tasks did not finish (see {work}/logs/*/logs); run the same '
                       'command again to resume them')
  _rm(work)
  manifest = json.loads(fsspec.open(f'{out}/manifest.json', 'rt').open().read())
  split_stats = ', '.join(
      f"{k}: {v['num_docs']} docs / {v['num_entries']} variants / {v['num_tokens']} tokens in "
      f"{len(v['shards'])} shards" for k, v in manifest['splits'].items())
  dropped = sum(f.get('dropped', 0) for f in manifest['filters'].values())
  return (f"prepared {out} ({split_stats}; {manifest['duplicate_docs_removed']} duplicate docs "
          f"removed ({dedup}); {dropped} docs filtered; {manifest['tokenizer']['kind']} tokenizer, "
          f"vocab {manifest['vocab_size']}) in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  a = parser.add_argument
  a('--raw', action='append', required=True,
    help='file, directory, glob or fsspec URL; repeat or comma-separate')
  a('--out', required=True, help='output directory (local path or fsspec URL)')
  a('--vocab_size', type=int, default=4096, help='vocabulary of the BPE trained when no --tokenizer')
  a('--tokenizer', default=None,
    help='reuse a tokenizer: a tokenizer.json, a .tiktoken ranks file or a prepared directory '
         '(default: train a byte-level BPE on a sample of train)')
  a('--tiktoken_pattern', default='',
    help=f"with a .tiktoken file: {', '.join(tokenizers.PATTERNS)} or a regex "
         "(default: the file's stem if it is one of those names)")
  a('--tokenizer_sample_mb', type=float, default=256,
    help='MB of train text (first in file order) the BPE is trained on')
  a('--dedup', default='exact', choices=DEDUPS,
    help='exact: same original text; minhash: near duplicates (datatrove, 5-grams, 14x8 hashes)')
  a('--filters', default='', help=f'comma-separated quality filters: {",".join(FILTERS)}')
  a('--shard_tokens', type=int, default=DEFAULT_SHARD_TOKENS, help='target tokens per shard')
  a('--val_fraction', type=float, default=0.05)
  a('--seed', type=int, default=0)
  a('--variant_regex', default='', help='regex with groups (?P<doc>) and (?P<variant>) on .txt file stems')
  a('--no_split', action='store_true', help='one document per .txt file (default: split at headings)')
  a('--text_field', default='text', help='JSONL/Parquet text field')
  a('--id_field', default='id', help='JSONL/Parquet document id field (variants share it)')
  a('--bad_records', default='stop', choices=('stop', 'skip'),
    help='a malformed JSONL line or a record without text: stop (default) or skip and count')
  a('--executor', default='local', choices=executors.EXECUTORS)
  a('--workers', type=int, default=os.cpu_count() or 1, help='local: tasks at once (default: all cores)')
  a('--slurm_partition', default='')
  a('--slurm_time', default='12:00:00')
  a('--slurm_cpus_per_task', type=int, default=1)
  a('--slurm_mem_per_cpu_gb', type=int, default=2)
  a('--slurm_args', default='', help='extra sbatch options, e.g. "--account=abc --qos=high"')
  a('--verbose', action='store_true', help="datatrove's own console logs")
  ns = parser.parse_args(argv)
  raw = [r for spec in ns.raw for r in spec.split(',') if r]
  engine = executors.EngineOptions(
      kind=ns.executor, workers=ns.workers, verbose=ns.verbose, slurm_partition=ns.slurm_partition,
      slurm_time=ns.slurm_time, slurm_cpus_per_task=ns.slurm_cpus_per_task,
      slurm_mem_per_cpu_gb=ns.slurm_mem_per_cpu_gb, slurm_args=ns.slurm_args)
  if ns.workers > 1:   # one tokenizer thread per task: the tasks already use every core
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  try:
    msg = prepare(raw, ns.out, ns.vocab_size, ns.tokenizer, ns.val_fraction, ns.seed,
                  variant_regex=ns.variant_regex, split_headings=not ns.no_split,
                  text_field=ns.text_field, id_field=ns.id_field,
                  tiktoken_pattern=ns.tiktoken_pattern, dedup=ns.dedup,
                  filters=tuple(f for f in ns.filters.split(',') if f),
                  shard_tokens=ns.shard_tokens, tokenizer_sample_mb=ns.tokenizer_sample_mb,
                  bad_records=ns.bad_records, engine=engine)
  except PrepareError as e:
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # e.g. a full disk: --out is left as it was; the same command resumes
    print(f'prepare: error: {e.filename or ns.out}: {e.strerror or e}', file=sys.stderr)
    return 2
  print(msg)
  return 0


if __name__ == '__main__':
  sys.exit(main())
