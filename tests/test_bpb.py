"""Bits per byte: the bytes are those of the text the eval targets spell, EOD counts no bytes, and
the figure is the same for two tokenizers on the same text when they give the same total loss."""
import math

import numpy as np

from moejax import bpb
from moejax.data import tokenizer as tokenizers

DOCS = ['Thou art the king, my lord — naïve café ✓.', 'A second document\nwith two lines.', 'x']


def _batches(ids: list[int], rows: int = 2) -> list[dict]:
  """Targets tiling `ids` in order, as pipeline.eval_batches gives them."""
  n = len(ids) // rows * rows
  return [{'targets': np.array(ids[:n]).reshape(rows, -1)}]


def test_target_bytes_are_the_utf8_bytes_of_the_documents_and_eod_counts_none():
  tok = tokenizers.train_bpe(DOCS * 20, 300)
  ids = [t for d in DOCS for t in tok.encode(d) + [tok.eod_id]]
  ids += ids[:1] if len(ids) % 2 else []   # an even count; the extra token starts the next document
  num_targets, num_bytes = bpb.target_bytes(tok, _batches(ids))
  extra = len(tok.decode(ids[-1:]).encode()) if len(ids) > sum(len(tok.encode(d)) + 1 for d in DOCS) else 0
  assert num_targets == len(ids)
  assert num_bytes == sum(len(d.encode('utf-8')) for d in DOCS) + extra


def test_bits_per_byte_is_total_nats_over_ln2_over_bytes_for_any_tokenizer():
  text_bytes = sum(len(d.encode()) for d in DOCS)
  coarse = tokenizers.train_bpe(DOCS * 20, 320)
  fine = tokenizers.train_bpe(DOCS * 20, 258)
  results = []
  for tok in (coarse, fine):
    ids = [t for d in DOCS for t in tok.encode(d) + [tok.eod_id]]
    n, b = bpb.target_bytes(tok, [{'targets': np.array(ids)[None]}])
    total_nats = 123.0   # the same total loss spread over a different number of tokens
    results.append((bpb.bits_per_byte(total_nats / n, n, b), b))
  assert len(fine.encode(DOCS[0])) > len(coarse.encode(DOCS[0]))
  assert results[0][1] == results[1][1] == text_bytes
  assert math.isclose(results[0][0], results[1][0]) and math.isclose(results[0][0], 123.0 / math.log(2) / text_bytes)
