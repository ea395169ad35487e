"""Tests for the tokenizer kinds of moejax.data.tokenizer: an offline tiktoken encoding from a local
.tiktoken ranks file (built here: 256 byte ranks + a few merges), its manifest record, and the
refusal to mix sources made with different tokenizers. No network."""
import base64
import hashlib
import json
import random

import numpy as np
import pytest

from moejax.data import pipeline, prepare, shards, tokenizer

WORDS = 'thou the king of all my love and night doth fall upon sea where lords speak'.split()
MERGES = [b'th', b'ou', b'thou', b' th', b' the', b'in', b'ing', b' k', b' king']


def write_ranks(path, merges=MERGES, skip_byte=None):
  """A .tiktoken file: base64(token) rank per line; all single bytes, then the merges."""
  tokens = [bytes([b]) for b in range(256) if b != skip_byte] + list(merges)
  path.write_text(''.join(f'{base64.b64encode(t).decode()} {r}\n' for r, t in enumerate(tokens)))
  return {t: r for r, t in enumerate(tokens)}


def write_corpus(path, num_docs=12, seed=0):
  rng = random.Random(seed)
  texts = [f'doc {d}: ' + ' '.join(rng.choice(WORDS) for _ in range(30)) + ' ünï ✓' for d in range(num_docs)]
  path.write_text(''.join(json.dumps({'id': d, 'text': t}) + '\n' for d, t in enumerate(texts)))
  return texts


def run_prepare(*args) -> int:
  return prepare.main(['--workers=1', *args, '--val_fraction=0.25'])


@pytest.fixture(scope='module', autouse=True)
def no_tiktoken_cache():
  with pytest.MonkeyPatch.context() as mp:   # else tiktoken copies each ranks file into /tmp
    mp.setenv('TIKTOKEN_CACHE_DIR', '')
    yield


@pytest.fixture(scope='module')
def tik(tmp_path_factory):
  root = tmp_path_factory.mktemp('tik')
  ranks = write_ranks(root / 'tiny.tiktoken')
  texts = write_corpus(root / 'corpus.jsonl')
  assert run_prepare(f"--raw={root / 'corpus.jsonl'}", f"--out={root / 'p'}",
                     f"--tokenizer={root / 'tiny.tiktoken'}", '--tiktoken_pattern=cl100k_base') == 0
  return {'root': root, 'dir': str(root / 'p'), 'ranks': ranks, 'texts': texts}


def test_tiktoken_manifest_records_kind_name_and_ranks_hash(tik):
  m = shards.load_manifest(tik['dir'])
  ranks_bytes = (tik['root'] / 'tiny.tiktoken').read_bytes()
  assert m['tokenizer']['kind'] == 'tiktoken' and m['tokenizer']['name'] == 'cl100k_base'
  assert m['tokenizer']['ranks_sha256'] == hashlib.sha256(ranks_bytes).hexdigest()
  assert m['tokenizer']['pattern'] == tokenizer.PATTERNS['cl100k_base']
  assert m['eod_id'] == len(tik['ranks']) and m['vocab_size'] == len(tik['ranks']) + 1
  assert (tik['root'] / 'p' / 'tokenizer.tiktoken').read_bytes() == ranks_bytes


def test_tiktoken_applies_the_merges_and_round_trips_text(tik):
  tok = shards.load_tokenizer(tik['dir'])
  r = tik['ranks']
  # cl100k pieces "thou", " the", " king": each merged down to one rank
  assert tok.encode('thou the king') == [r[b'thou'], r[b' the'], r[b' king']]
  assert tok.encode('of') == [r[b'o'], r[b'f']]  # no merge for "of"
  for text in ("  Thou art, my lord!\n\n\tNay —  'tis ünïcode ✓", 'x', '\n', '<|endoftext|>'):
    assert tok.decode(tok.encode(text)) == text
  assert tok.eod_id not in tok.encode('<|endoftext|>')  # a literal EOD in a text stays text


def test_tiktoken_shards_hold_each_document_encoded_then_eod(tik):
  tok = shards.load_tokenizer(tik['dir'])
  decoded = set()
  for split in ('train', 'val'):
    s = shards.load_split(tik['dir'], split)
    for a, b in zip(s.offsets_i64[:-1], s.offsets_i64[1:]):
      doc = s.tokens[a:b].tolist()
      assert doc[-1] == tok.eod_id and tok.eod_id not in doc[:-1]
      assert tok.encode(tok.decode(doc[:-1])) == doc[:-1]
      decoded.add(tok.decode(doc[:-1]))
  assert decoded == set(tik['texts'])


def test_tiktoken_batches_feed_the_pipeline_with_its_eod_as_document_boundary(tik):
  ds = pipeline.train_dataset(tik['dir'], seq_len=128, batch_size=2, seed=0)
  eod = shards.load_manifest(tik['dir'])['eod_id']
  b = ds[0]
  assert b['inputs'].max() <= eod and (b['inputs'] == eod).any()
  for row_in, row_seg in zip(b['inputs'], b['segment_ids']):  # a new segment after each EOD
    np.testing.assert_array_equal(np.diff(row_seg), (row_in[:-1] == eod).astype(int))


def test_prepare_reuses_a_prepared_dirs_tiktoken_and_sources_with_it_mix(tik, tmp_path):
  write_corpus(tmp_path / 'other.jsonl', seed=1)
  assert run_prepare(f"--raw={tmp_path / 'other.jsonl'}", f"--out={tmp_path / 'o'}",
                     f"--tokenizer={tik['dir']}") == 0
  m = shards.load_manifest(str(tmp_path / 'o'))
  assert m['tokenizer_sha256'] == shards.load_manifest(tik['dir'])['tokenizer_sha256']
  data = pipeline.TrainData([pipeline.Source('a', tik['dir']), pipeline.Source('o', str(tmp_path / 'o'))],
                            seq_len=16, batch_size=2, seed=0, tokenizer_dir=tik['dir'])
  assert data.eod_id == len(tik['ranks'])


@pytest.mark.parametrize('other', ['bpe', 'pattern', 'ranks'])
def test_training_refuses_a_source_made_with_another_tokenizer_in_one_line(tik, tmp_path, other):
  write_corpus(tmp_path / 'c.jsonl', seed=2)
  args = [f"--raw={tmp_path / 'c.jsonl'}", f"--out={tmp_path / 'c'}", '--vocab_size=300']
  if other == 'pattern':   # same ranks, another pre-tokenizer regex: other ids for the same text
    args += [f"--tokenizer={tik['root'] / 'tiny.tiktoken'}", '--tiktoken_pattern=o200k_base']
  elif other == 'ranks':
    write_ranks(tmp_path / 'tiny.tiktoken', merges=MERGES[:3])
    args += [f"--tokenizer={tmp_path / 'tiny.tiktoken'}", '--tiktoken_pattern=cl100k_base']
  assert run_prepare(*args) == 0
  sources = [pipeline.Source('a', tik['dir']), pipeline.Source('c', str(tmp_path / 'c'))]
  with pytest.raises(pipeline.DataError) as e:
    pipeline.TrainData(sources, seq_len=16, batch_size=2, seed=0, tokenizer_dir=tik['dir'])
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith(f"data.sources.c.dir: {tmp_path / 'c'} was tokenized with another")
  assert 'tiktoken cl100k_base' in msg and f"--tokenizer={tik['dir']}" in msg


def test_bad_tiktoken_inputs_are_one_line_errors_naming_the_file_or_flag(tik, tmp_path, capsys):
  raw = f"--raw={tik['root'] / 'corpus.jsonl'}"
  out = f"--out={tmp_path / 'out'}"
  write_ranks(tmp_path / 'gappy.tiktoken', skip_byte=ord('q'))
  (tmp_path / 'junk.tiktoken').write_text('not base64 and no rank\n')
  write_ranks(tmp_path / 'mine.tiktoken')
  cases = [
      ([f"--tokenizer={tmp_path / 'gappy.tiktoken'}", '--tiktoken_pattern=cl100k_base'],
       'gappy.tiktoken: 1 single bytes have no rank'),
      ([f"--tokenizer={tmp_path / 'junk.tiktoken'}", '--tiktoken_pattern=cl100k_base'],
       'junk.tiktoken: not a .tiktoken ranks file'),
      ([f"--tokenizer={tmp_path / 'mine.tiktoken'}"], '--tiktoken_pattern: needed for'),
      ([f"--tokenizer={tmp_path / 'mine.tiktoken'}", '--tiktoken_pattern=(unclosed'],
       '--tiktoken_pattern: not a usable regex'),
      ([f"--tokenizer={tmp_path / 'none.tiktoken'}"], 'none.tiktoken: no such file'),
      (['--tiktoken_pattern=cl100k_base'], '--tiktoken_pattern: only with'),
  ]
  for args, match in cases:
    assert prepare.main(['--workers=1', raw, out, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count('\n') == 1, err
  assert not (tmp_path / 'out').exists()


def test_named_patterns_are_tiktokens_own(monkeypatch):
  """The regexes moejax names are the ones tiktoken's public encodings use (loaded without network)."""
  from tiktoken_ext import openai_public
  monkeypatch.setattr(openai_public, 'load_tiktoken_bpe', lambda *a, **k: {})
  monkeypatch.setattr(openai_public, 'data_gym_to_mergeable_bpe_ranks', lambda *a, **k: {})
  for name, pattern in tokenizer.PATTERNS.items():
    assert getattr(openai_public, name)()['pat_str'] == pattern, name
