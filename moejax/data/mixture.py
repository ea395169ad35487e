"""Mixing finite sources: grain's deterministic weighted interleave, renormalised as sources run out."""
import grain
import numpy as np

MIX_RESOLUTION = 100      # weights become integer proportions, the smallest scaled to this


def _interleave_count(k: int, props: tuple[int, ...], i: int) -> int:
  """How many of the first k elements of grain's weighted interleave come from input i."""
  rem, c = sum(props), k
  for p in props[:i]:
    c, rem = c * (rem - p) // rem, rem - p
  return c - c * (rem - props[i]) // rem


class PhasedMix(grain.transforms.DatasetSelectionMap):
  """Weighted interleave of sources with finite lengths: while every source has elements left the
  order is grain's `MapDataset.mix` interleave; when one runs out the rest continue with their
  weights renormalised. Stateless and O(sources) per index (the phases are precomputed)."""

  def __init__(self, lengths: list[int], weights: list[float]):
    scale = MIX_RESOLUTION / min(weights)
    props = [max(1, int(round(w * scale))) for w in weights]
    remaining = list(lengths)
    self.phases = []   # (start, length, active source ids, their proportions, offsets)
    start = 0
    while any(remaining):
      act = [i for i, r in enumerate(remaining) if r > 0]
      p = tuple(props[i] for i in act)
      fits = lambda n: all(_interleave_count(n, p, j) <= remaining[i] for j, i in enumerate(act))
      n = min(remaining[i] * sum(p) // p[j] for j, i in enumerate(act))
      while n > 0 and not fits(n):
        n -= 1
      while fits(n + 1):
        n += 1
      offsets = [lengths[i] - remaining[i] for i in act]
      self.phases.append((start, n, act, p, offsets))
      for j, i in enumerate(act):
        remaining[i] -= _interleave_count(n, p, j)
      start += n
    self._len = start
    self._starts = [ph[0] for ph in self.phases]

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> tuple[int, int]:
    if not 0 <= index < self._len:
      raise IndexError(index)
    start, _, act, p, offsets = self.phases[int(np.searchsorted(self._starts, index, 'right')) - 1]
    k = index - start
    for j, i in enumerate(act):
      before = _interleave_count(k, p, j)
      if _interleave_count(k + 1, p, j) > before:
        return i, offsets[j] + before
    raise AssertionError('unreachable')

  def counts(self, k: int) -> list[int]:
    """Elements taken from each source among the first k of the mixture."""
    out = [0] * (max(i for ph in self.phases for i in ph[2]) + 1)
    for start, n, act, p, offsets in self.phases:
      if k <= start:
        break
      m = min(k - start, n)
      for j, i in enumerate(act):
        out[i] = offsets[j] + _interleave_count(m, p, j)
    return out
