"""Score-aware sources: which documents of a scored source (moejax.data.scoring) an epoch reads,
and how often.

A document's grade is its score's bucket, round(clip(score, 0, 5)) (FineWeb-Edu's int_score).
- `min_score`: keep the documents whose grade is at least this (FineWeb-Edu keeps grade >= 3).
- `score_weights`: {grade: weight} (grades left out weigh 1). A document of weight w is read
  floor(w) times per epoch, plus once more when its seeded draw u_d < w - floor(w); the draw is
  per document (not per epoch), so every epoch reads the same multiset in a new order, the epoch's
  length is fixed, and resuming needs nothing beyond the seed. Weight 0 drops the grade.
Both are a pure function of (scores, seed, source), which is what keeps resume exact.
"""
import numpy as np

from moejax.data.shards import DataError

NUM_GRADES = 6


def grades(scores_D) -> np.ndarray:
  return np.clip(np.rint(np.asarray(scores_D, np.float64)), 0, NUM_GRADES - 1).astype(np.int64)


def normalize_weights(weights, field: str) -> list[float] | None:
  """{grade: weight} or [w0..w5] -> [w0..w5] (JSON-able, for the data fingerprint); None stays None."""
  if weights is None:
    return None
  if isinstance(weights, (list, tuple)):
    if len(weights) != NUM_GRADES:
      raise DataError(f'{field}.score_weights: a list needs {NUM_GRADES} weights (grades 0-5), got {len(weights)}')
    items = dict(enumerate(weights))
  else:
    try:
      items = {int(k): v for k, v in dict(weights).items()}
    except (TypeError, ValueError):
      raise DataError(f'{field}.score_weights: keys must be grades 0-5, got {sorted(dict(weights))}') from None
  out = [1.0] * NUM_GRADES
  for g, w in items.items():
    if not 0 <= g < NUM_GRADES:
      raise DataError(f'{field}.score_weights: grade {g} is not in 0-5')
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      raise DataError(f'{field}.score_weights.{g}: must be a number >= 0, got {w!r}')
    out[g] = float(w)
  if not any(out):
    raise DataError(f'{field}.score_weights: every weight is 0')
  return out


def select(docs_i64: np.ndarray, scores_D: np.ndarray, *, min_score, weights, seed, field: str,
           data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(documents one epoch reads, with repeats, sorted; their copy index 0..copies-1)."""
  g = grades(scores_D)
  if min_score is not None:
    keep = docs_i64[g[docs_i64] >= min_score]
    if not len(keep):
      raise DataError(f'{field}.min_score: {min_score:g} is above every document\'s grade in {data_dir} '
                      f'(the highest is {int(g[docs_i64].max()) if len(docs_i64) else "none"}); '
                      'lower it or score the source again')
    docs_i64 = keep
  if weights is None:
    return docs_i64, np.zeros(len(docs_i64), np.int64)
  w = np.asarray(weights, np.float64)[g[docs_i64]]
  u = np.random.default_rng([*seed, 11]).random(len(scores_D))[docs_i64]
  copies = np.floor(w).astype(np.int64) + (u < w - np.floor(w))
  if not copies.sum():
    raise DataError(f'{field}.score_weights: the weights read none of the documents of {data_dir}')
  out = np.repeat(docs_i64, copies)
  starts = np.repeat(np.cumsum(copies) - copies, copies)
  return out, np.arange(len(out)) - starts
