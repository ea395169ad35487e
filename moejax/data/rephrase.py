"""Rephrase documents with an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...) to
make variants for `moejax.data.prepare`.

python -m moejax.data.rephrase --raw=data/shakespeare/raw --out=rephrased/wiki.jsonl \
    --style=wiki --base_url=http://localhost:8000/v1 --model=Qwen/Qwen2.5-7B-Instruct \
    [--api_key_env=OPENAI_API_KEY] [--concurrency=8] [--max_chunk_chars=6000] [--retries=4]
python -m moejax.data.rephrase --raw='corpus/*.jsonl' --out_dir=rephrased/simple --style=simple \
    --base_url=http://a:8000/v1,http://b:8000/v1 --model=... --variants=4 --workers=16 \
    [--classifier=clf --min_score=3] [--min_similarity=0.2] [--executor=slurm|ray]

The second form is the stage at scale (moejax.data.rephrase_stage): one datatrove task per input
file on prepare's engine, chunks sent with overlapping context, K variants per document,
resumable per task; the first is the original one-process tool described below.

Reads documents as prepare does (same --raw, --variant_regex, --no_split; originals only), splits
each into paragraph-aligned chunks of at most --max_chunk_chars, asks the endpoint to rewrite each
chunk in the named style, and appends one JSONL record per finished document:
{"id": <document id>, "variant": <style>, "text": <rephrased chunks joined>}. Feed that file to
prepare next to the originals (`--raw=data/x/raw --raw=rephrased/wiki.jsonl`): records with the
same id become variants of the document. Re-running skips documents already in --out (resume
after a crash). Empty or malformed replies are counted and the document is left out. The API key
is read from the environment variable named by --api_key_env and never printed.
"""
import argparse
import concurrent.futures
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from moejax.data import sources
from moejax.data.chat import ChatError as ReplyError, reply_text   # one reader of chat replies
from moejax.data.rephrase_stage import chunks   # one chunker for both paths

STYLE_DIR = Path(__file__).parent / 'prompts' / 'rephrase'
# Styles are prompt files (the system message): prompts/rephrase/<style>.txt, or --style=path/x.txt.
STYLES = {p.stem: p.read_text(encoding='utf-8').strip() for p in sorted(STYLE_DIR.glob('*.txt'))}
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Client:
  """Chat completions over urllib with retries and exponential backoff."""

  def __init__(self, base_url: str, model: str, api_key: str | None, *, retries: int,
               timeout: float, temperature: float, max_tokens: int, backoff: float = 1.0):
    self.url = base_url.rstrip('/') + '/chat/completions'
    self.model, self.retries, self.timeout, self.backoff = model, retries, timeout, backoff
    self.temperature, self.max_tokens = temperature, max_tokens
    self._headers = {'Content-Type': 'application/json'}
    if api_key:
      self._headers['Authorization'] = f'Bearer {api_key}'

  def complete(self, system: str, user: str) -> str:
    body = json.dumps({'model': self.model, 'temperature': self.temperature,
                       'max_tokens': self.max_tokens,
                       'messages': [{'role': 'system', 'content': system},
                                    {'role': 'user', 'content': user}]}).encode()
    last = ''
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
      req = urllib.request.Request(self.url, data=body, headers=self._headers, method='POST')
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
          raw = resp.read()
      except urllib.error.HTTPError as e:
        last = f'HTTP {e.code}'
        if e.code in RETRY_STATUS:
          continue
        raise ReplyError('failed', last) from None
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        last = f'{type(e).__name__}: {getattr(e, "reason", e)}'
        continue
      return reply_text(raw).strip()
    raise ReplyError('failed', f'gave up after {self.retries + 1} attempts ({last})')


def done_ids(out: Path, style: str) -> set[str]:
  """Ids of documents already rephrased in `style` in `out` (a torn last line is ignored)."""
  if not out.is_file():
    return set()
  ids = set()
  for line in out.read_text(encoding='utf-8').splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if rec.get('variant') == style:
      ids.add(str(rec['id']))
  return ids


def rephrase(docs: list[sources.Document], out: Path, style: str, client: Client, *,
             max_chunk_chars: int, concurrency: int, log=print, prompt: str | None = None) -> dict:
  """Rephrases every document not yet in `out`; returns counts."""
  done = done_ids(out, style)
  todo = [d for d in docs if d.id not in done]
  counts = {'documents': len(docs), 'skipped_done': len(docs) - len(todo), 'written': 0,
            'chunks': 0, 'empty': 0, 'malformed': 0, 'failed': 0}
  lock = threading.Lock()
  out.parent.mkdir(parents=True, exist_ok=True)
  # A torn last line from a crash would glue onto the next record: start on a fresh line.
  if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b'\n'):
    with out.open('a') as f:
      f.write('\n')

  def one(doc: sources.Document):
    parts = []
    for chunk in chunks(doc.variants[0], max_chunk_chars):
      try:
        parts.append(client.complete(prompt or STYLES[style], chunk))
      except ReplyError as e:
        with lock:
          counts[e.kind] += 1
          log(f'rephrase: {doc.id}: {e} ({e.kind}); left out')
        return
    with lock:
      counts['chunks'] += len(parts)
      counts['written'] += 1
      with out.open('a', encoding='utf-8') as f:
        f.write(json.dumps({'id': doc.id, 'variant': style, 'text': '\n\n'.join(parts)}) + '\n')

  with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
    list(pool.map(one, todo))
  return counts


def load_style(spec: str) -> tuple[str, str]:
  """(variant name, system prompt) of a style name (prompts/rephrase/<name>.txt) or a prompt file."""
  if spec in STYLES:
    return spec, STYLES[spec]
  path = Path(spec)
  if path.suffix == '.txt' and path.is_file():
    text = path.read_text(encoding='utf-8').strip()
    if not text:
      raise ValueError(f'--style: {spec} is empty')
    return path.stem, text
  raise ValueError(f'--style: unknown style {spec!r}; choose one of {list(STYLES)} or give a prompt .txt file')


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--raw', action='append', required=True, help='as for moejax.data.prepare')
  p.add_argument('--out', type=Path, default=None, help='JSONL to append rephrasings to (one process)')
  p.add_argument('--out_dir', default='', help='the stage at scale: DIR/part-<file>.jsonl, one task per '
                 'input file on --executor (moejax.data.rephrase_stage)')
  p.add_argument('--style', default='wiki', help=f'prompt style: {", ".join(STYLES)}, or a prompt .txt file')
  p.add_argument('--base_url', default='http://localhost:8000/v1', help='endpoint(s), comma-separated (--out_dir)')
  p.add_argument('--model', default='default')
  p.add_argument('--api_key_env', default='OPENAI_API_KEY', help='environment variable holding the key')
  p.add_argument('--concurrency', type=int, default=8, help='requests in flight (per task with --out_dir)')
  p.add_argument('--max_chunk_chars', type=int, default=6000, help='fit the model context')
  p.add_argument('--overlap_chars', type=int, default=400,
                 help='--out_dir: the previous chunk\'s tail sent as context with each chunk')
  p.add_argument('--variants', type=int, default=1, help='--out_dir: variants per document (seeds 0..K-1)')
  p.add_argument('--classifier', default='', help='--out_dir: a `judge train` model; with --min_score')
  p.add_argument('--min_score', type=float, default=None, help='--out_dir: only documents graded at least this')
  p.add_argument('--min_similarity', type=float, default=0.0,
                 help='--out_dir: drop rewrites whose word-set Jaccard similarity to the original is below this')
  p.add_argument('--executor', default='local', choices=('local', 'slurm', 'ray'))
  p.add_argument('--workers', type=int, default=1, help='--out_dir: tasks at once')
  p.add_argument('--max_tokens', type=int, default=2048)
  p.add_argument('--temperature', type=float, default=0.7)
  p.add_argument('--retries', type=int, default=4)
  p.add_argument('--timeout', type=float, default=120.0)
  p.add_argument('--backoff', type=float, default=1.0, help='first retry delay in seconds')
  p.add_argument('--variant_regex', default='')
  p.add_argument('--no_split', action='store_true')
  p.add_argument('--text_field', default='text')
  p.add_argument('--id_field', default='id')
  p.add_argument('--limit', type=int, default=0, help='only the first N documents (0 = all; --out only)')
  a = p.parse_args(argv)

  def error(msg):
    print(f'rephrase: error: {msg}', file=sys.stderr)
    return 2

  try:
    style, prompt = load_style(a.style)
  except ValueError as e:
    return error(e)
  if a.concurrency < 1 or a.max_chunk_chars < 1 or a.retries < 0 or a.variants < 1 or a.workers < 1:
    return error('--concurrency, --max_chunk_chars, --variants and --workers must be >= 1, --retries >= 0')
  if (a.out is None) == (not a.out_dir):
    return error('give one of --out (a JSONL file) and --out_dir (the stage at scale)')
  if (a.min_score is None) != (not a.classifier):
    return error('--min_score and --classifier go together')
  raw = [r for spec in a.raw for r in spec.split(',') if r]
  if a.out_dir:
    return _stage(a, raw, style, prompt, error)
  try:
    docs = sources.read_documents(raw, split_headings=not a.no_split, variant_regex=a.variant_regex,
                                  text_field=a.text_field)
  except sources.SourceError as e:
    return error(e)
  if a.limit:
    docs = docs[:a.limit]
  client = Client(a.base_url, a.model, os.environ.get(a.api_key_env), retries=a.retries,
                  timeout=a.timeout, temperature=a.temperature, max_tokens=a.max_tokens,
                  backoff=a.backoff)
  start = time.perf_counter()
  c = rephrase(docs, a.out, style, client, max_chunk_chars=a.max_chunk_chars, prompt=prompt,
               concurrency=a.concurrency, log=lambda m: print(m, file=sys.stderr, flush=True))
  print(f'rephrased {c["written"]} of {c["documents"]} documents ({c["chunks"]} chunks) into {a.out} '
        f'in {time.perf_counter() - start:.1f}s; {c["skipped_done"]} already done, {c["empty"]} empty, '
        f'{c["malformed"]} malformed, {c["failed"]} failed replies left out')
  return 0


def _stage(a, raw, style, prompt, error) -> int:
  from moejax.data import chat, executors, rephrase_stage
  try:
    urls = tuple(chat.base_urls(a.base_url))
    chat.Chat(list(urls), a.model, os.environ.get(a.api_key_env), timeout=a.timeout).preflight()
    if a.classifier:
      from moejax.data import classifier
      classifier.load(a.classifier)
  except Exception as e:   # EndpointError, ClassifierError: one line
    return error(e)
  job = rephrase_stage.Job(style=style, prompt=prompt, variants=a.variants, urls=urls, model=a.model,
                           api_key_env=a.api_key_env, concurrency=a.concurrency, retries=a.retries,
                           timeout=a.timeout, backoff=a.backoff, temperature=a.temperature,
                           max_tokens=a.max_tokens, max_chunk_chars=a.max_chunk_chars,
                           overlap_chars=a.overlap_chars, classifier_dir=a.classifier,
                           min_score=a.min_score, min_similarity=a.min_similarity)
  read = sources.ReadOptions(text_field=a.text_field, id_field=a.id_field, split_headings=not a.no_split,
                             variant_regex=a.variant_regex)
  start = time.perf_counter()
  try:
    c = rephrase_stage.run(raw, read, a.out_dir, job, executors.EngineOptions(kind=a.executor, workers=a.workers))
  except sources.SourceError as e:
    return error(e)
  lines = sum(1 for f in Path(a.out_dir).glob('part-*.jsonl') for _ in open(f, 'rb'))
  print(f'rephrase stage: {c["files"]} files, {c.get("documents", 0)} documents ({c.get("below_min_score", 0)} '
        f'below --min_score); {lines} rephrasings in {a.out_dir} ({c.get("written", 0)} written by the latest '
        f'run of each task, {c.get("already", 0)} already there) in {time.perf_counter() - start:.1f}s; '
        f'{c.get("failed", 0)} failed, {c.get("low_similarity", 0)} dropped below --min_similarity'
        + ('; run the same command again to retry the failed ones' if c.get('failed') else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
