"""Raw inputs -> records: text files, JSONL (plain, .gz, .zst) and Parquet, as local paths, globs,
directories or fsspec URLs (gs://, s3://, hf://datasets/..., memory://, file://), read as streams.

A record is one (document id, variant name, text). Records with the same id are the variants of
one document; variant "original" (or a missing/empty variant field) is the original, the others
are rephrasings of it. Where records come from:
- `.txt` files: one file is one document unless `split_headings` (then each act/scene/numbered
  section is a document, id `<stem>#<k>`). With `variant_regex` (named groups `doc` and
  `variant`), the file stem gives the document id and the variant name; files of the same doc
  become its variants (an empty `variant` group is the original), and such docs are not split.
- `.jsonl[.gz|.zst]` / `.parquet`: one record per line/row: the text field, the id field
  (optional: `<file stem>:<line or row number>` when absent) and `variant` (optional).

`records` streams one file (memory independent of its size, except a .txt file, which is one
document or its sections); `read_documents` gathers every record into documents in memory, for
tools that work on a handful of documents (moejax.data.rephrase).
"""
import io
import json
import re
from dataclasses import dataclass, field

import fsspec

FORMATS = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
ORIGINAL = 'original'
MIN_DOC_CHARS = 200  # shorter sections (e.g. a bare "ACT II." line) merge into the next one
# Section headings: "ACT I.", "SCENE 2.", "ACT FIFTH.", folio "Actus Primus. Scoena Prima.",
# and bare roman-numeral lines (numbered sonnets / poems).
HEADING = re.compile(
    r'^[ \t]*(?:(?:ACT|Act)[ \t]+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b'
    r'|(?:SCENE|Scene)[ \t]+(?:[IVXL]+|\d+)\b|Actus\b|Scena\b|Scoena\b|[IVXLC]+\.?[ \t]*$)',
    re.M)


class SourceError(Exception):
  """A problem with one raw input; the message names the file (and line or field)."""


@dataclass(frozen=True)
class ReadOptions:
  """How records are read from raw files (the prepare flags of the same names)."""
  text_field: str = 'text'
  id_field: str = 'id'
  variant_field: str = 'variant'
  split_headings: bool = True
  variant_regex: str = ''
  skip_bad_records: bool = False   # False: a malformed record stops with SourceError


@dataclass(frozen=True)
class Record:
  id: str
  variant: str       # ORIGINAL for the original
  text: str


def fmt(path: str) -> str:
  """The format suffix of a path ('' if not one of FORMATS)."""
  return next((f for f in sorted(FORMATS, key=len, reverse=True) if path.endswith(f)), '')


def stem(path: str) -> str:
  name = path.rstrip('/').rsplit('/', 1)[-1]
  return name[:len(name) - len(fmt(name))] if fmt(name) else name.rsplit('.', 1)[0]


def split_documents(text: str) -> list[str]:
  """Splits one raw text into documents at act/scene/numbered-section headings."""
  starts = [0] + [m.start() for m in HEADING.finditer(text)] + [len(text)]
  docs, pending = [], ''
  for a, b in zip(starts[:-1], starts[1:]):
    pending += text[a:b]
    if len(pending.strip()) >= MIN_DOC_CHARS:
      docs.append(pending)
      pending = ''
  if pending.strip():
    if docs:
      docs[-1] += pending
    else:
      docs.append(pending)
  return [re.sub(r'\n{3,}', '\n\n', d.strip()) for d in docs]


def _url(fs, path: str) -> str:
  """A path fsspec opens again: plain for local files, with its protocol otherwise."""
  from fsspec.implementations.local import LocalFileSystem
  return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand(specs: list[str]) -> list[str]:
  """Paths, globs, directories (their files of FORMATS, not recursive) and URLs -> file URLs, in
  the order given (each glob or directory sorted). Raises SourceError naming a spec that
  matches nothing."""
  files = []
  for spec in specs:
    try:
      fs, path = fsspec.core.url_to_fs(spec)
    except (ValueError, ImportError) as e:
      raise SourceError(f'{spec}: cannot open ({e})') from None
    try:
      if any(c in path for c in '*?['):
        matched = sorted(p for p in fs.glob(path) if fmt(p) and fs.isfile(p))
        if not matched:
          raise SourceError(f"{spec}: glob matches no {'/'.join(FORMATS)} file")
      elif fs.isdir(path):
        matched = sorted(p for p in fs.ls(path, detail=False) if fmt(p) and fs.isfile(p))
        if not matched:
          raise SourceError(f"{spec}: directory has no {'/'.join(FORMATS)} file")
      elif fs.isfile(path):
        if not fmt(path):
          raise SourceError(f'{spec}: unknown format; use one of {FORMATS}')
        matched = [path]
      else:
        raise SourceError(f'{spec}: no such file or directory')
    except (OSError, PermissionError) as e:
      raise SourceError(f'{spec}: cannot list ({e})') from None
    files += [_url(fs, p) for p in matched]
  return files


def check_readable(url: str, opts: ReadOptions):
  """Opens a file (and for Parquet reads its schema) so that an unreadable file or a Parquet file
  without the text field stops before any work, naming the file."""
  try:
    with fsspec.open(url, 'rb') as f:
      if fmt(url) == '.parquet':
        import pyarrow.parquet as pq
        names = pq.ParquetFile(f).schema_arrow.names
        if opts.text_field not in names:
          raise SourceError(f'{url}: no column {opts.text_field!r} (has {names})')
      else:
        f.read(1)
  except SourceError:
    raise
  except Exception as e:  # OSError, PermissionError, pyarrow's ArrowInvalid, ...
    raise SourceError(f'{url}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise SourceError(f'{where}: undecodable bytes at offset {e.start} (not UTF-8)') from None


def _jsonl(url: str, opts: ReadOptions, bad: list):
  import orjson
  with fsspec.open(url, 'rb', compression='infer') as f:
    for n, line in enumerate(io.BufferedReader(f, 1 << 20), 1):
      if not line.strip():
        continue
      try:
        rec = orjson.loads(line)
        if not isinstance(rec, dict):
          raise ValueError('not a JSON object')
      except (ValueError, orjson.JSONDecodeError) as e:
        problem = 'not a JSON object' if 'object' in str(e) else f'not JSON ({str(e).split(":")[0]})'
        if opts.skip_bad_records:
          bad.append(f'{url}:{n}')
          continue
        raise SourceError(f'{url}:{n}: {problem} (--bad_records=skip skips and counts such lines)') from None
      yield f'{url}:{n}', n, rec


def _parquet(url: str, opts: ReadOptions, bad: list):
  import pyarrow.parquet as pq
  with fsspec.open(url, 'rb') as f:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if opts.text_field not in names:
      raise SourceError(f'{url}: no column {opts.text_field!r} (has {names})')
    cols = [c for c in (opts.text_field, opts.id_field, opts.variant_field) if c in names]
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
      for rec in batch.to_pylist():
        n += 1
        yield f'{url}:row {n}', n, rec


def records(url: str, opts: ReadOptions, bad: list | None = None):
  """Streams the records of one file; malformed ones raise SourceError naming the file and line,
  or with opts.skip_bad_records are appended to `bad` ('file:line') and skipped. A file that cannot
  be read (I/O error, broken compression, not Parquet) raises SourceError naming it."""
  try:
    yield from _records(url, opts, [] if bad is None else bad)
  except SourceError:
    raise
  except (OSError, EOFError, ValueError) as e:   # incl. gzip/zstd/pyarrow errors
    raise SourceError(f'{url}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None


def _records(url: str, opts: ReadOptions, bad: list):
  if fmt(url) == '.txt':
    with fsspec.open(url, 'rb') as f:
      text = _decode(f.read(), url).replace('\r\n', '\n')
    m = re.fullmatch(opts.variant_regex, stem(url)) if opts.variant_regex else None
    if not text.strip():
      raise SourceError(f'{url}: empty document')
    if m:
      yield Record(m.group('doc'), m.group('variant') or ORIGINAL, text.strip())
    elif opts.split_headings:
      for k, part in enumerate(split_documents(text)):
        yield Record(f'{stem(url)}#{k}', ORIGINAL, part)
    else:
      yield Record(stem(url), ORIGINAL, text.strip())
    return
  rows = _parquet(url, opts, bad) if fmt(url) == '.parquet' else _jsonl(url, opts, bad)
  for where, n, rec in rows:
    text = rec.get(opts.text_field)
    problem = (f'field {opts.text_field!r} missing or not a string' if not isinstance(text, str)
               else 'empty document' if not text.strip() else '')
    if problem:
      if opts.skip_bad_records:
        bad.append(where)
        continue
      raise SourceError(f'{where}: {problem}')
    doc_id = rec.get(opts.id_field)
    yield Record(str(doc_id) if doc_id is not None else f'{stem(url)}:{n}',
                 str(rec.get(opts.variant_field) or '') or ORIGINAL, text)


@dataclass
class Document:
  id: str
  variants: list[str] = field(default_factory=list)       # [0] is the original
  variant_names: list[str] = field(default_factory=list)


def read_documents(specs: list[str], *, split_headings: bool = True, variant_regex: str = '',
                   text_field: str = 'text') -> list[Document]:
  """Reads every input into documents in memory (first-seen order); SourceError names the file."""
  opts = ReadOptions(text_field=text_field, split_headings=split_headings, variant_regex=variant_regex)
  docs: dict[str, Document] = {}
  for url in expand(specs):
    for r in records(url, opts):
      doc = docs.setdefault(r.id, Document(r.id))
      if r.variant in doc.variant_names:
        raise SourceError(f'{url}: document {r.id!r} already has variant {r.variant!r}')
      at = 0 if r.variant == ORIGINAL else len(doc.variants)   # the original always comes first
      doc.variants.insert(at, r.text)
      doc.variant_names.insert(at, r.variant)
  for doc in docs.values():   # a doc seen only as rephrasings: its first one stands as original
    if doc.variant_names[0] != ORIGINAL:
      doc.variant_names[0] = f'{doc.variant_names[0]} (as original)'
  return list(docs.values())


def read_options(a) -> ReadOptions:
  """The ReadOptions of a command's --text_field, --id_field, --no_split and --variant_regex flags."""
  return ReadOptions(text_field=a.text_field, id_field=a.id_field,
                     split_headings=not a.no_split, variant_regex=a.variant_regex)


def originals(raw: list[str], opts: ReadOptions):
  """(id, text) of every original document in the inputs, first occurrence of an id only."""
  seen = set()
  for url in expand(raw):
    for r in records(url, opts):
      if r.variant == ORIGINAL and r.id not in seen:
        seen.add(r.id)
        yield r.id, r.text
