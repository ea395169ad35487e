"""The tokenizers prepared data can be made with, behind one small interface.

Three kinds:
- `bpe`: a byte-level BPE trained on the train split with `tokenizers` (`<|endoftext|>` = id 0);
- `tokenizer.json`: any local `tokenizers` file (it must have `<|endoftext|>`);
- `tiktoken`: an offline tiktoken encoding: a local `.tiktoken` BPE ranks file (one
  `base64(token) rank` per line, as `tiktoken.load.load_tiktoken_bpe` reads) and a pre-tokenizer
  regex, named (`cl100k_base`, `o200k_base`, `r50k_base`/`p50k_base`/`gpt2`) or given verbatim.
  End of document is the special token `<|endoftext|>` with id max(rank) + 1.

Each tokenizer carries `info`, the manifest's record of it: kind, name, and `sha256`, its identity
(the tokenizer.json as written; for tiktoken, the ranks file's sha256 with the pattern and EOD id).
Two prepared directories hold comparable token ids exactly when their `sha256` agree.
"""
import hashlib
import json
from pathlib import Path

EOD_TOKEN = '<|endoftext|>'

# Pre-tokenizer regexes of tiktoken's public encodings (tiktoken_ext/openai_public.py, 0.14.0).
_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
PATTERNS = {
    'gpt2': _R50K,
    'r50k_base': _R50K,
    'p50k_base': _R50K,
    'cl100k_base': r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    'o200k_base': '|'.join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}


class TokenizerError(ValueError):
  """An unusable tokenizer file or pattern (one line, names the file or flag)."""


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class BPETokenizer:
  """A `tokenizers.Tokenizer` (trained here or loaded from a tokenizer.json)."""

  def __init__(self, tok, info: dict):
    self._tok = tok
    self.eod_id = tok.token_to_id(EOD_TOKEN)
    self.vocab_size = tok.get_vocab_size()
    self._json = tok.to_str().encode()
    self.info = {**info, 'sha256': sha256_bytes(self._json)}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts)]

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids))

  def save(self, out: Path):
    (out / 'tokenizer.json').write_bytes(self._json)


class TiktokenTokenizer:
  """A `tiktoken.Encoding` from a local ranks file; text is encoded as ordinary text (a literal
  `<|endoftext|>` in a document stays text), EOD is appended by the caller."""

  def __init__(self, ranks_bytes: bytes, ranks_path: str, pattern: str, name: str):
    import tiktoken
    import tiktoken.load
    ranks_sha256 = sha256_bytes(ranks_bytes)
    try:  # the expected hash makes tiktoken's path-keyed cache ignore a stale copy
      ranks = tiktoken.load.load_tiktoken_bpe(ranks_path, expected_hash=ranks_sha256)
    except ValueError as e:
      raise TokenizerError(f'{ranks_path}: not a .tiktoken ranks file ({e})') from None
    if not ranks:
      raise TokenizerError(f'{ranks_path}: no ranks')
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
      raise TokenizerError(f'{ranks_path}: {len(missing)} single bytes have no rank (e.g. '
                           f'{bytes([missing[0]])!r}); byte-level BPE needs all 256')
    if len(set(ranks.values())) != len(ranks):
      raise TokenizerError(f'{ranks_path}: two tokens share a rank')
    self.eod_id = max(ranks.values()) + 1
    self.vocab_size = self.eod_id + 1
    try:
      self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                    special_tokens={EOD_TOKEN: self.eod_id})
    except ValueError as e:
      raise TokenizerError(f'--tiktoken_pattern: not a usable regex ({e})') from None
    self._ranks_bytes = ranks_bytes
    identity = json.dumps({'ranks_sha256': ranks_sha256, 'pattern': pattern,
                           'special_tokens': {EOD_TOKEN: self.eod_id}}, sort_keys=True)
    self.info = {'kind': 'tiktoken', 'name': name, 'pattern': pattern, 'ranks_file': ranks_path,
                 'ranks_sha256': ranks_sha256, 'sha256': sha256_bytes(identity.encode())}

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(texts)

  def decode(self, ids) -> str:
    return self._enc.decode([int(i) for i in ids])

  def save(self, out: Path):
    (out / 'tokenizer.tiktoken').write_bytes(self._ranks_bytes)


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
  """Trains a byte-level BPE tokenizer with EOD as id 0."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return BPETokenizer(tok, {'kind': 'bpe', 'name': 'trained by moejax.data.prepare',
                            'vocab_size': vocab_size})


def load_json(path: Path) -> BPETokenizer:
  from tokenizers import Tokenizer
  try:
    tok = Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    raise TokenizerError(f'{path}: not a tokenizer.json ({str(e).splitlines()[0]})') from None
  return BPETokenizer(tok, {'kind': 'tokenizer.json', 'name': str(path)})


def tiktoken_pattern(pattern: str, ranks_path: Path) -> tuple[str, str]:
  """(name, regex) for --tiktoken_pattern: a known name, a regex, or '' (the file stem's name)."""
  pattern = pattern or (ranks_path.stem if ranks_path.stem in PATTERNS else '')
  if not pattern:
    raise TokenizerError(f'--tiktoken_pattern: needed for {ranks_path} (a name: '
                         f'{", ".join(PATTERNS)}; or a regex)')
  return (pattern, PATTERNS[pattern]) if pattern in PATTERNS else ('custom', pattern)


def load_tiktoken(path: Path, pattern: str = '') -> TiktokenTokenizer:
  name, regex = tiktoken_pattern(pattern, path)
  return TiktokenTokenizer(path.read_bytes(), str(path), regex, name)


def from_prepared(data_dir: str | Path, manifest: dict):
  """The tokenizer a prepared directory was made with (its manifest says which kind)."""
  d = Path(data_dir)
  info = manifest.get('tokenizer', {})
  if info.get('kind') == 'tiktoken':
    path = d / 'tokenizer.tiktoken'
    if not path.is_file():
      raise TokenizerError(f'{path}: missing; prepare the data again')
    return TiktokenTokenizer(path.read_bytes(), str(path), info['pattern'], info['name'])
  path = d / 'tokenizer.json'
  if not path.is_file():
    raise TokenizerError(f'{path}: missing; prepare the data again')
  return load_json(path)


def describe(manifest: dict) -> str:
  """'tiktoken cl100k_base (sha256 1a2b3c4d5e6f)' and the like, for error messages."""
  info = manifest.get('tokenizer', {})
  name = f'{info.get("kind", "?")} {info.get("name", "")}'.strip()
  return f'{name} (sha256 {str(manifest.get("tokenizer_sha256"))[:12]})'
