"""`judge score`: the classifier's score for every document of a prepared corpus, written next to
the shards, as a pipeline of datatrove stages on the engine prepare runs on (moejax.data.executors:
all local cores, Slurm or Ray).

  python -m moejax.data.judge score --model_dir=DIR --data=PREPARED_DIR [--workers=N]

Layout added to PREPARED_DIR (the shards and manifest.json are left as they are):

  <split>/<shard>.scores.npy   float32 [num_docs]: document d's score (its original, decoded from
                               the shard's tokens, scored by the classifier), in [0, 5]
  scores.json                  which classifier (model_sha256) scored which preparation
                               (manifest_sha256), and per split the documents and original tokens
                               in each grade bucket round(score) = 0..5

One task per shard (stage `score`), then one that writes scores.json (stage `summary`). A task
writes its file whole (temp file, then rename) and datatrove records finished tasks in
`.<dir>.score-<model hash>/logs/`, so a run killed at any point and started again redoes only the
unfinished shards. A finished run for the same classifier and preparation prints `scores up to
date`. Training reads the scores through `load_scores` (data.sources.<name>.min_score / score_weights).
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from moejax.data import classifier, executors, shards

SCORES_JSON = 'scores.json'
NUM_BUCKETS = classifier.MAX_SCORE + 1
SCORE_BATCH_DOCS = 512


def shard_names(manifest: dict, split: str) -> list[str]:
  """Shard names (relative paths without the .tokens.npy suffix) of a split, in order."""
  stats = manifest['splits'][split]
  return [s['name'] for s in stats['shards']] if 'shards' in stats else [split]


def score_path(data_dir: str, name: str) -> Path:
  return Path(data_dir) / f'{name}.scores.npy'


def buckets(scores) -> np.ndarray:
  return classifier.grades(scores)


def _atomic_save(path: Path, arr: np.ndarray):
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp',
                                   delete=False) as f:
    np.save(f, arr)
  os.chmod(f.name, 0o644)
  os.replace(f.name, path)


def _shard_docs(data_dir: str, name: str):
  """(tokens memmap, entry offsets int64, first entry of each document int64) of one shard."""
  d = Path(data_dir)
  tokens = np.load(d / f'{name}.tokens.npy', mmap_mode='r')
  offsets = np.load(d / f'{name}.docs.npy').astype(np.int64)
  vpath = d / f'{name}.variants.npy'
  first = (np.load(vpath).astype(np.int64)[:-1] if vpath.is_file()
           else np.arange(len(offsets) - 1, dtype=np.int64))
  return tokens, offsets, first


class ScoreShards(PipelineStep):
  """Task t scores shard t (of every split's shards in order) into <shard>.scores.npy."""
  name = 'moejax score'
  type = '📊 - STATS'

  def __init__(self, data_dir: str, model_dir: str, names: list[str]):
    super().__init__()
    self.data_dir, self.model_dir, self.names = data_dir, model_dir, list(names)

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    model = classifier.load(self.model_dir)
    tok = shards.load_tokenizer(self.data_dir)
    for t in range(rank, len(self.names), world_size):
      tokens, offsets, first = _shard_docs(self.data_dir, self.names[t])
      out = np.zeros(len(first), np.float32)
      for a in range(0, len(first), SCORE_BATCH_DOCS):
        texts = [tok.decode(np.asarray(tokens[offsets[e]:offsets[e + 1] - 1]).tolist())
                 for e in first[a:a + SCORE_BATCH_DOCS]]
        out[a:a + len(texts)] = model.score(texts)
        self.stat_update('documents', value=len(texts))
      _atomic_save(score_path(self.data_dir, self.names[t]), out)
    return iter(())


class Summary(PipelineStep):
  """Writes scores.json once every shard has its scores."""
  name = 'moejax score summary'
  type = '💽 - WRITER'

  def __init__(self, data_dir: str, model_dir: str, model_sha: str, manifest_sha: str):
    super().__init__()
    self.data_dir, self.model_dir = data_dir, model_dir
    self.model_sha, self.manifest_sha = model_sha, manifest_sha

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    manifest = shards.load_manifest(self.data_dir)
    splits = {}
    for split in manifest['splits']:
      docs, toks = np.zeros(NUM_BUCKETS, np.int64), np.zeros(NUM_BUCKETS, np.int64)
      for name in shard_names(manifest, split):
        s = np.load(score_path(self.data_dir, name))
        _, offsets, first = _shard_docs(self.data_dir, name)
        b = buckets(s)
        docs += np.bincount(b, minlength=NUM_BUCKETS)
        toks += np.bincount(b, weights=offsets[first + 1] - offsets[first],
                            minlength=NUM_BUCKETS).astype(np.int64)
      splits[split] = {'docs_per_bucket': docs.tolist(), 'original_tokens_per_bucket': toks.tolist()}
    info = {'model_dir': os.path.abspath(self.model_dir), 'model_sha256': self.model_sha,
            'manifest_sha256': self.manifest_sha, 'buckets': 'round(clip(score, 0, 5))',
            'splits': splits}
    tmp = Path(self.data_dir) / f'.{SCORES_JSON}.tmp'
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, Path(self.data_dir) / SCORES_JSON)
    return iter(())


def manifest_sha256(data_dir: str) -> str:
  return hashlib.sha256((Path(data_dir) / 'manifest.json').read_bytes()).hexdigest()


def read_info(data_dir: str) -> dict | None:
  path = Path(data_dir) / SCORES_JSON
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def score(data_dir: str, model_dir: str, engine: executors.EngineOptions) -> str:
  """Scores every document; returns the one-line status (ClassifierError / DataError on bad input)."""
  classifier.load(model_dir)   # a bad model directory stops here, before any task
  manifest = shards.load_manifest(data_dir)
  for split in manifest.get('splits', {}):
    shards.load_split(data_dir, split)   # checks the shards against the manifest
  model_sha, manifest_sha = classifier.model_sha256(model_dir), manifest_sha256(data_dir)
  info = read_info(data_dir)
  if info and (info.get('model_sha256'), info.get('manifest_sha256')) == (model_sha, manifest_sha):
    return f'scores up to date: {data_dir}/{SCORES_JSON}'
  d = Path(data_dir).resolve()
  work = d.parent / f'.{d.name}.score-{model_sha[:16]}'
  for stale in d.parent.glob(f'.{d.name}.score-*'):   # another classifier's unfinished run
    if stale != work:
      shutil.rmtree(stale, ignore_errors=True)
  names = [n for split in manifest['splits'] for n in shard_names(manifest, split)]
  stages = [executors.Stage('score', [ScoreShards(data_dir, model_dir, names)], tasks=len(names)),
            executors.Stage('summary', [Summary(data_dir, model_dir, model_sha, manifest_sha)], tasks=1)]
  start = time.perf_counter()
  executors.chain(stages, str(work), engine).run()
  if engine.kind == 'slurm':
    return (f'submitted the score stages of {data_dir} to Slurm (logs in {work}/logs); run the same '
            'command again after they finish: it prints "scores up to date"')
  info = read_info(data_dir)
  if not info or info.get('model_sha256') != model_sha:
    raise shards.DataError(f'{work}: some score tasks did not finish (see {work}/logs/*/logs); '
                           'run the same command again to resume them')
  shutil.rmtree(work, ignore_errors=True)
  per = info['splits'].get('train', {}).get('docs_per_bucket', [])
  return (f'scored {sum(sum(s["docs_per_bucket"]) for s in info["splits"].values())} documents of '
          f'{data_dir} in {len(names)} shards in {time.perf_counter() - start:.1f}s; train documents '
          f'per grade 0-5: {per}')


def load_scores(data_dir: str, split: str, field: str) -> np.ndarray:
  """float32 [num_docs] of a split in load_split's document order; DataError naming `field` when
  the directory has no scores, or scores of another preparation."""
  info = read_info(data_dir)
  if info is None:
    raise shards.DataError(f'{field}: {data_dir} has no {SCORES_JSON}; score it first: python -m '
                           f'moejax.data.judge score --model_dir=<classifier> --data={data_dir}')
  if info.get('manifest_sha256') != manifest_sha256(data_dir):
    raise shards.DataError(f'{field}: {data_dir}/{SCORES_JSON} scores another preparation of it '
                           '(manifest.json changed since); run judge score again')
  manifest = shards.load_manifest(data_dir)
  parts = []
  for name in shard_names(manifest, split):
    p = score_path(data_dir, name)
    try:
      parts.append(np.load(p).astype(np.float32))
    except (OSError, ValueError) as e:
      raise shards.DataError(f'{field}: {p}: missing or unreadable ({type(e).__name__}); run judge '
                             'score again') from None
  return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def current_scores(data_dir: str, split: str) -> np.ndarray | None:
  """The scores when the directory has up-to-date ones, else None (never an error)."""
  try:
    return load_scores(data_dir, split, 'scores')
  except shards.DataError:
    return None


def cmd_score(a) -> int:
  engine = executors.EngineOptions(kind=a.executor, workers=a.workers, verbose=a.verbose,
                                   slurm_partition=a.slurm_partition, slurm_time=a.slurm_time,
                                   slurm_args=a.slurm_args)
  print(score(a.data, a.model_dir, engine))   # ClassifierError / DataError: one line (judge.main)
  return 0


def add_parser(sub):
  p = sub.add_parser('score', help='score every document of a prepared corpus')
  p.add_argument('--model_dir', required=True, help='the classifier from `judge train`')
  p.add_argument('--data', required=True, help='a prepared directory (moejax.data.prepare)')
  p.add_argument('--executor', default='local', choices=executors.EXECUTORS)
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='tasks at once')
  p.add_argument('--slurm_partition', default='')
  p.add_argument('--slurm_time', default='12:00:00')
  p.add_argument('--slurm_args', default='')
  p.add_argument('--verbose', action='store_true', help="datatrove's own console logs")
  p.set_defaults(fn=cmd_score)


if __name__ == '__main__':
  sys.exit('use: python -m moejax.data.judge score ...')
