"""Raw inputs -> documents with variants: text files, JSONL, Parquet; local paths, globs, or any
path `etils.epath` opens (e.g. gs://).

A document is (id, [variant texts]); variant 0 is the original, the others are rephrasings
of it (same id). Where variants come from:
- `.txt` files: one file is one document unless `split_headings` (then each act/scene/numbered
  section is a document, id `<stem>#<k>`). With `variant_regex` (named groups `doc` and
  `variant`), the file stem gives the document id and the variant name; files of the same doc
  become its variants (an empty `variant` group is the original), and such docs are not split.
- `.jsonl` / `.parquet`: one record per (document, variant): fields `text`, `id` (optional:
  the line/row number when absent) and `variant` (optional; missing, "" or "original" is the
  original). Records with the same id are variants of one document.
"""
import json
import re
from dataclasses import dataclass, field

from etils import epath

FORMATS = ('.txt', '.jsonl', '.parquet')
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


@dataclass
class Document:
  id: str
  variants: list[str] = field(default_factory=list)       # [0] is the original
  variant_names: list[str] = field(default_factory=list)


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


def expand(specs: list[str]) -> list[epath.Path]:
  """Paths, globs and directories (their *.txt/*.jsonl/*.parquet) -> sorted file list."""
  files = []
  for spec in specs:
    if any(c in spec for c in '*?['):
      parent, pattern = _glob_root(spec)
      matched = sorted(p for p in parent.glob(pattern) if p.suffix in FORMATS)
      if not matched:
        raise SourceError(f"{spec}: glob matches no {'/'.join(FORMATS)} file")
      files += matched
      continue
    path = epath.Path(spec)
    if path.is_dir():
      matched = sorted(p for p in path.iterdir() if p.suffix in FORMATS)
      if not matched:
        raise SourceError(f"{spec}: directory has no {'/'.join(FORMATS)} file")
      files += matched
    elif path.is_file():
      if path.suffix not in FORMATS:
        raise SourceError(f'{spec}: unknown format {path.suffix!r}; use one of {FORMATS}')
      files.append(path)
    else:
      raise SourceError(f'{spec}: no such file or directory')
  return files


def _glob_root(spec: str) -> tuple[epath.Path, str]:
  parts = spec.split('/')
  k = next(i for i, p in enumerate(parts) if any(c in p for c in '*?['))
  return epath.Path('/'.join(parts[:k]) or '.'), '/'.join(parts[k:])


def _read_text(path: epath.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise SourceError(f'{path}: undecodable bytes at offset {e.start} (not UTF-8)') from None


def _records(path: epath.Path, text_field: str):
  """Yields (where, record dict) from a .jsonl or .parquet file."""
  if path.suffix == '.jsonl':
    for n, line in enumerate(_read_text(path).splitlines(), 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise SourceError(f'{path}:{n}: not JSON ({e.msg})') from None
      if not isinstance(rec, dict):
        raise SourceError(f'{path}:{n}: not a JSON object')
      yield f'{path}:{n}', n, rec
  else:
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise SourceError(f'{path}: reading Parquet needs pyarrow (pip install pyarrow)') from None
    with path.open('rb') as f:
      table = pq.read_table(f)
    if text_field not in table.column_names:
      raise SourceError(f'{path}: no column {text_field!r} (has {table.column_names})')
    for n, rec in enumerate(table.to_pylist(), 1):
      yield f'{path}:row {n}', n, rec


def read_documents(specs: list[str], *, split_headings: bool = True, variant_regex: str = '',
                   text_field: str = 'text', id_field: str = 'id',
                   variant_field: str = 'variant') -> list[Document]:
  """Reads every input into documents (first-seen order); raises SourceError naming the file."""
  pattern = re.compile(variant_regex) if variant_regex else None
  docs: dict[str, Document] = {}

  def add(doc_id: str, variant: str, text: str, where: str):
    if not text.strip():
      raise SourceError(f'{where}: empty document')
    doc = docs.setdefault(doc_id, Document(doc_id))
    variant = variant or ORIGINAL
    if variant in doc.variant_names:
      raise SourceError(f'{where}: document {doc_id!r} already has variant {variant!r}')
    if variant == ORIGINAL:   # the original always comes first
      doc.variants.insert(0, text)
      doc.variant_names.insert(0, variant)
    else:
      doc.variants.append(text)
      doc.variant_names.append(variant)

  for path in expand(specs):
    if path.suffix == '.txt':
      text = _read_text(path).replace('\r\n', '\n')
      m = pattern.fullmatch(path.stem) if pattern else None
      if m:
        add(m.group('doc'), m.group('variant') or '', text.strip(), str(path))
      elif split_headings:
        if not text.strip():
          raise SourceError(f'{path}: empty document')
        for k, part in enumerate(split_documents(text)):
          add(f'{path.stem}#{k}', '', part, str(path))
      else:
        add(path.stem, '', text.strip(), str(path))
      continue
    for where, n, rec in _records(path, text_field):
      text = rec.get(text_field)
      if not isinstance(text, str):
        raise SourceError(f'{where}: field {text_field!r} missing or not a string')
      doc_id = str(rec.get(id_field, f'{path.stem}:{n}'))
      add(doc_id, str(rec.get(variant_field) or ''), text, where)
  for doc in docs.values():   # a doc seen only as rephrasings: its first one stands as original
    if doc.variant_names[0] != ORIGINAL:
      doc.variant_names[0] = f'{doc.variant_names[0]} (as original)'
  return list(docs.values())
