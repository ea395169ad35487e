"""Grade documents with an LLM judge, learn a cheap classifier from its grades, and score a whole
prepared corpus with it (the FineWeb-Edu recipe).

  python -m moejax.data.judge label --raw=GLOB --out=labels.jsonl --base_url=URL[,URL...] \
      --model=NAME --sample=N [--seed=0] [--prompt=FILE] [--concurrency=16] [--max_failures=0.1]
  python -m moejax.data.judge train --labels=labels.jsonl --raw=GLOB --out=DIR
  python -m moejax.data.judge score --model_dir=DIR --data=PREPARED_DIR [--workers=N]

`label` draws a seeded sample of N original documents (read as prepare reads them, so the ids
match), sends each to <base_url>/chat/completions with a grading prompt (default: FineWeb-Edu's
educational-value prompt, moejax/data/prompts/fineweb_edu.txt; a --prompt file must contain
{document}) and reads the score from the reply's last `Educational score: <0-5>` line. Requests
run --concurrency at a time, spread over the --base_url list; errors, timeouts, non-JSON bodies
and replies without a score are retried with backoff, then counted for that document and the run
goes on. Each label is appended to --out as one line {"id", "score", "model"} the moment it is
known (kill -9 safe), and re-running the same command skips the documents already labelled by
that model. Exit 1 when more than --max_failures of the sample failed, 2 on bad input. The API key
is read from the environment variable --api_key_env names (default OPENAI_API_KEY), never printed.

`train` and `score`: moejax.data.classifier and moejax.data.scoring.
"""
import argparse
import concurrent.futures
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

from moejax.data import chat, classifier, jsonl_log, scoring, shards, sources

PROMPT_DIR = Path(__file__).parent / 'prompts'
DEFAULT_PROMPT = PROMPT_DIR / 'fineweb_edu.txt'
PLACEHOLDER = '{document}'
SCORE_LINE = re.compile(r'educational score\W*(\d+(?:\.\d+)?)', re.I)
MAX_SCORE = 5


class JudgeError(Exception):
  """Bad input to a judge command; one line, exit code 2."""


def parse_score(reply: str) -> float:
  """The last `Educational score: N` of a reply (0 <= N <= 5); ValueError if there is none."""
  found = SCORE_LINE.findall(reply)
  if not found:
    raise ValueError('no "Educational score: N" line')
  score = float(found[-1])
  if not 0 <= score <= MAX_SCORE:
    raise ValueError(f'score {score:g} outside 0-{MAX_SCORE}')
  return int(score) if score == int(score) else score


def load_prompt(path: str | Path | None) -> str:
  path = Path(path) if path else DEFAULT_PROMPT
  try:
    text = path.read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise JudgeError(f'--prompt: cannot read {path} ({e.__class__.__name__})') from None
  if PLACEHOLDER not in text:
    raise JudgeError(f'--prompt: {path} has no {PLACEHOLDER} placeholder for the document')
  return text


def sample(docs, n: int, seed: int) -> list[tuple[str, str]]:
  """A seeded uniform sample of n (reservoir: one pass, memory for n documents), in input order."""
  rng = random.Random(seed)
  kept: list[tuple[int, str, str]] = []
  for i, (doc_id, text) in enumerate(docs):
    if len(kept) < n:
      kept.append((i, doc_id, text))
    else:
      j = rng.randrange(i + 1)
      if j < n:
        kept[j] = (i, doc_id, text)
  return [(d, t) for _, d, t in sorted(kept)]


def done_ids(out: str, model: str) -> set[str]:
  return {str(r['id']) for r in jsonl_log.read(out) if r.get('model') == model and 'score' in r}


def label(docs: list[tuple[str, str]], out: str, client: chat.Chat, prompt: str, *,
          concurrency: int, max_doc_chars: int, log=print) -> dict:
  """Labels every document not yet in `out`; returns counts."""
  jsonl_log.repair(out)
  done = done_ids(out, client.model)
  todo = [(d, t) for d, t in docs if d not in done]
  counts = {'sample': len(docs), 'already': len(docs) - len(todo), 'labelled': 0,
            'no_score': 0, 'failed': 0, 'replies_without_score': 0}
  lock = threading.Lock()

  def bump(key):
    with lock:
      counts[key] += 1

  def check(text):
    try:
      parse_score(text)
    except ValueError:
      bump('replies_without_score')
      raise

  with jsonl_log.Appender(out) as sink:
    def one(item):
      doc_id, text = item
      message = prompt.replace(PLACEHOLDER, text[:max_doc_chars])
      try:
        reply = client.complete([{'role': 'user', 'content': message}], check=check)
      except chat.ChatError as e:
        bump('no_score' if e.kind == 'rejected' else 'failed')
        log(f'judge: {doc_id}: {e} ({e.kind})')
        return
      sink.write({'id': doc_id, 'score': parse_score(reply), 'model': client.model})
      bump('labelled')

    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
      for _ in pool.map(one, todo):
        pass
  return counts


def cmd_label(a) -> int:
  if a.sample < 1 or a.concurrency < 1 or a.retries < 0 or not 0 <= a.max_failures <= 1:
    raise JudgeError('--sample and --concurrency must be >= 1, --retries >= 0, --max_failures in [0, 1]')
  prompt = load_prompt(a.prompt)
  raw = [r for spec in a.raw for r in spec.split(',') if r]
  try:
    docs = sample(sources.originals(raw, sources.read_options(a)), a.sample, a.seed)
  except sources.SourceError as e:
    raise JudgeError(str(e)) from None
  if not docs:
    raise JudgeError(f'--raw: {raw} holds no original documents')
  try:
    client = chat.Chat(chat.base_urls(a.base_url), a.model, os.environ.get(a.api_key_env),
                       retries=a.retries, timeout=a.timeout, backoff=a.backoff,
                       max_tokens=a.max_tokens)
    client.preflight()
  except chat.EndpointError as e:
    raise JudgeError(str(e)) from None
  if Path(a.out).is_dir():
    raise JudgeError(f'--out: {a.out} is a directory')
  start = time.perf_counter()
  c = label(docs, a.out, client, prompt, concurrency=a.concurrency, max_doc_chars=a.max_doc_chars,
            log=lambda m: print(m, file=sys.stderr, flush=True))
  bad = c['no_score'] + c['failed']
  print(f'labelled {c["labelled"]} of {c["sample"]} sampled documents into {a.out} in '
        f'{time.perf_counter() - start:.1f}s ({c["already"]} already done); '
        f'{c["replies_without_score"]} replies had no score line (retried); '
        f'{c["no_score"]} documents without a score, {c["failed"]} failed requests')
  if bad > a.max_failures * c['sample']:
    print(f'judge: error: {bad} of {c["sample"]} documents got no label, more than '
          f'--max_failures={a.max_failures:g}; run the same command again to retry them', file=sys.stderr)
    return 1
  return 0


def add_read_flags(p):
  p.add_argument('--raw', action='append', required=True, help='as for moejax.data.prepare')
  p.add_argument('--variant_regex', default='')
  p.add_argument('--no_split', action='store_true')
  p.add_argument('--text_field', default='text')
  p.add_argument('--id_field', default='id')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m moejax.data.judge', description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest='cmd', required=True)
  lab = sub.add_parser('label', help='grade a sample with an LLM judge')
  add_read_flags(lab)
  lab.add_argument('--out', required=True, help='labels JSONL (appended to; re-runs resume)')
  lab.add_argument('--base_url', required=True, help='OpenAI-compatible endpoint(s), comma-separated')
  lab.add_argument('--model', required=True)
  lab.add_argument('--sample', type=int, required=True, help='documents to label')
  lab.add_argument('--seed', type=int, default=0)
  lab.add_argument('--prompt', default='', help=f'grading prompt file with {PLACEHOLDER} (default FineWeb-Edu)')
  lab.add_argument('--api_key_env', default='OPENAI_API_KEY')
  lab.add_argument('--concurrency', type=int, default=16, help='requests in flight')
  lab.add_argument('--retries', type=int, default=4)
  lab.add_argument('--timeout', type=float, default=120.0)
  lab.add_argument('--backoff', type=float, default=0.5, help='first retry delay in seconds')
  lab.add_argument('--max_tokens', type=int, default=512)
  lab.add_argument('--max_doc_chars', type=int, default=20000, help='documents are cut to this')
  lab.add_argument('--max_failures', type=float, default=0.1,
                   help='fraction of the sample allowed to end without a label (exit 1 above)')
  lab.set_defaults(fn=cmd_label)
  classifier.add_parser(sub, add_read_flags)
  scoring.add_parser(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  a = parser().parse_args(argv)
  try:
    return a.fn(a)
  except (JudgeError, classifier.ClassifierError, shards.DataError, sources.SourceError) as e:
    print(f'judge {a.cmd}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
