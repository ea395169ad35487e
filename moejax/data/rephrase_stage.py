"""Rephrasing at scale: `python -m moejax.data.rephrase --out_dir=DIR ...` runs the rephrasing as a
datatrove stage on prepare's engine (moejax.data.executors: local processes, Slurm, Ray), one task
per input file, each with --concurrency requests in flight over one or many endpoints.

Task t reads the originals of raw file t (as prepare reads them, so the ids match), keeps those the
classifier grades at least --min_score (with --classifier), and for each of --variants=K variants
rewrites the document chunk by chunk: paragraph-aligned chunks of at most --max_chunk_chars, each
sent with the last --overlap_chars of the chunk before it as context (in the system message, not
to be rewritten), the rewrites stitched back in order. Each finished (document, variant) is one
line {"id", "variant", "text"} appended to DIR/part-<t>.jsonl (kill -9 safe, moejax.data.jsonl_log);
variant names are the style (K = 1) or <style>-1 .. <style>-K, variant k asking with seed k.
With --min_similarity, a rewrite whose word-set Jaccard similarity to its original is below it
(lost fidelity) is dropped and counted.

Re-running the same command resumes: datatrove skips finished tasks (DIR/.logs-<hash>/), an
unfinished task skips the lines already in its part file, and a task that had failures is marked
unfinished again so that the next run retries just those. `prepare --raw=<originals> --raw=DIR`
joins the rephrasings to their documents as variants, which `cycle` / `random` read per epoch.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from moejax.data import chat, executors, jsonl_log, sources

CONTEXT_NOTE = ('\n\nThe text to rewrite continues the passage below. It is context only: do not '
                'rewrite or repeat it.\n<<<\n{context}\n>>>')


def chunks(text: str, max_chars: int) -> list[str]:
  """Greedy paragraph-aligned chunks of at most max_chars (long paragraphs are cut)."""
  out, cur = [], ''
  for para in text.split('\n\n'):
    while len(para) > max_chars:
      if cur:
        out.append(cur)
        cur = ''
      out.append(para[:max_chars])
      para = para[max_chars:]
    if cur and len(cur) + 2 + len(para) > max_chars:
      out.append(cur)
      cur = ''
    cur = f'{cur}\n\n{para}' if cur else para
  if cur.strip():
    out.append(cur)
  return out


@dataclasses.dataclass(frozen=True)
class Job:
  style: str                 # variant name (stem of the prompt file)
  prompt: str                # the style's system message
  variants: int
  urls: tuple[str, ...]
  model: str
  api_key_env: str
  concurrency: int = 8
  retries: int = 4
  timeout: float = 120.0
  backoff: float = 1.0
  temperature: float = 0.7
  max_tokens: int = 2048
  max_chunk_chars: int = 6000
  overlap_chars: int = 400
  classifier_dir: str = ''
  min_score: float | None = None
  min_similarity: float = 0.0

  def variant_names(self) -> list[str]:
    return [self.style] if self.variants == 1 else [f'{self.style}-{k + 1}' for k in range(self.variants)]


def similarity(a: str, b: str) -> float:
  """Jaccard similarity of the lower-cased word sets."""
  wa, wb = set(a.lower().split()), set(b.lower().split())
  return len(wa & wb) / max(1, len(wa | wb))


def overlap_tail(text: str, n: int) -> str:
  if n <= 0 or not text:
    return ''
  tail = text[-n:]
  cut = tail.find(' ')
  return tail[cut + 1:] if 0 <= cut < len(tail) - 1 and len(text) > n else tail


def rewrite(client: chat.Chat, job: Job, text: str, k: int) -> str:
  """One variant of a document: its chunks rewritten with overlapping context, stitched."""
  parts, prev = [], ''
  for chunk in chunks(text, job.max_chunk_chars):
    context = overlap_tail(prev, job.overlap_chars)
    system = job.prompt + (CONTEXT_NOTE.format(context=context) if context else '')
    parts.append(client.complete([{'role': 'system', 'content': system}, {'role': 'user', 'content': chunk}],
                                 extra={'seed': k}).strip())
    prev = chunk
  return '\n\n'.join(parts)


class RephraseFiles(PipelineStep):
  """Task t rephrases the originals of files[t] into out_dir/part-<t>.jsonl."""
  name = 'moejax rephrase'
  type = '✍️ - WRITER'

  def __init__(self, files: list[str], read: sources.ReadOptions, out_dir: str, job: Job, counts_dir: str):
    super().__init__()
    self.files, self.read, self.out_dir, self.job, self.counts_dir = list(files), read, out_dir, job, counts_dir

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    for t in range(rank, len(self.files), world_size):
      counts = self._file(t)
      Path(self.counts_dir).mkdir(parents=True, exist_ok=True)
      (Path(self.counts_dir) / f'{t:05d}.json').write_text(json.dumps(counts))
    return iter(())

  def _file(self, t: int) -> dict:
    job = self.job
    out = f'{self.out_dir}/part-{t:05d}.jsonl'
    jsonl_log.repair(out)
    done = {(str(r.get('id')), r.get('variant')) for r in jsonl_log.read(out)}
    seen, docs = set(), []
    for r in sources.records(self.files[t], self.read):
      if r.variant == sources.ORIGINAL and r.id not in seen:
        seen.add(r.id)
        docs.append((r.id, r.text))
    counts = {'documents': len(docs), 'below_min_score': 0, 'already': 0, 'written': 0, 'failed': 0,
              'low_similarity': 0, 'chunks': 0}
    if job.classifier_dir and job.min_score is not None:
      from moejax.data import classifier
      grades = classifier.grades(classifier.load(job.classifier_dir).score([d[1] for d in docs]))
      counts['below_min_score'] = int((grades < job.min_score).sum())
      docs = [d for d, g in zip(docs, grades) if g >= job.min_score]
    names = job.variant_names()
    todo = [(d, k) for d in docs for k in range(job.variants) if (d[0], names[k]) not in done]
    counts['already'] = len(docs) * job.variants - len(todo)
    client = chat.Chat(list(job.urls), job.model, os.environ.get(job.api_key_env), retries=job.retries,
                       timeout=job.timeout, backoff=job.backoff, temperature=job.temperature,
                       max_tokens=job.max_tokens)
    lock = threading.Lock()

    def bump(key, n=1):
      with lock:
        counts[key] += n

    with jsonl_log.Appender(out) as sink:
      def one(item):
        (doc_id, text), k = item
        try:
          new = rewrite(client, job, text, k)
        except chat.ChatError as e:
          bump('failed')
          self.stat_update('failed')
          from datatrove.utils.logging import logger
          logger.warning(f'rephrase: {doc_id} variant {names[k]}: {e} ({e.kind})')
          return
        if job.min_similarity and similarity(text, new) < job.min_similarity:
          bump('low_similarity')
          return
        sink.write({'id': doc_id, 'variant': names[k], 'text': new})
        bump('written')
        bump('chunks', len(chunks(text, job.max_chunk_chars)))

      with concurrent.futures.ThreadPoolExecutor(max(1, job.concurrency)) as pool:
        for _ in pool.map(one, todo):
          pass
    return counts


def run(raw: list[str], read: sources.ReadOptions, out_dir: str, job: Job,
        engine: executors.EngineOptions) -> dict:
  """Runs (or resumes) the stage; returns the summed counts of every task's latest run."""
  files = sources.expand(raw)
  for url in files:
    sources.check_readable(url, read)
  os.makedirs(out_dir, exist_ok=True)
  key = json.dumps([files, dataclasses.asdict(job), dataclasses.asdict(read)], sort_keys=True, default=str)
  work = f'{out_dir}/.logs-{hashlib.sha256(key.encode()).hexdigest()[:16]}'
  counts_dir = f'{work}/counts'
  stage = executors.Stage('rephrase', [RephraseFiles(files, read, out_dir, job, counts_dir)], tasks=len(files))
  executors.chain([stage], work, engine).run()
  total = {}
  for t in range(len(files)):
    path = Path(counts_dir) / f'{t:05d}.json'
    c = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in c.items():
      total[k] = total.get(k, 0) + v
    if c.get('failed'):   # run again: only this task, only what it did not write
      Path(f'{work}/logs/rephrase/completions/{t:05d}').unlink(missing_ok=True)
  total['files'] = len(files)
  return total
