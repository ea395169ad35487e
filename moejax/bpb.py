"""Bits per byte: held-out loss in a unit every tokenizer shares, so runs with different
tokenizers compare. bpb = (sum of the targets' losses in nats) / ln 2 / (UTF-8 bytes of the text
those targets spell). End-of-document tokens count their loss and no bytes, whatever text a
tokenizer would decode them to."""
import math

import numpy as np


def target_bytes(tokenizer, batches: list[dict]) -> tuple[int, int]:
  """(number of targets, UTF-8 bytes they decode to) of eval batches whose targets tile one token
  stream in order (pipeline.eval_batches); each document is decoded whole."""
  stream = np.concatenate([np.asarray(b['targets']).reshape(-1) for b in batches])
  cuts = np.flatnonzero(stream == tokenizer.eod_id)
  num_bytes, start = 0, 0
  for end in [*cuts.tolist(), len(stream)]:
    if end > start:
      num_bytes += len(tokenizer.decode(stream[start:end].tolist()).encode('utf-8'))
    start = end + 1
  return len(stream), num_bytes


def bits_per_byte(mean_loss_nats: float, num_targets: int, num_bytes: int) -> float:
  return mean_loss_nats * num_targets / math.log(2) / max(num_bytes, 1)
