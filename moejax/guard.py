"""Runs that protect themselves: the checks the loop makes after each log window and before each
checkpoint, and the verdicts it acts on.

- Non-finite loss or gradient norm (any step): rewind to the last checkpoint and skip the batches
  that led to it, at most `train.max_rewinds` times; then stop (exit 4, `non_finite_loss`).
- Loss spike (with `train.spike_factor` > 0): a logged loss above that multiple of the median of the
  last `train.spike_window` logged losses rewinds the same way (`loss_spike` when exhausted).
- Router collapse (`train.stop_on_collapse`): a MoE layer whose window loads put (nearly) all
  assignments on at most top_k + 1 experts stops the run (exit 3, `router_collapse`); the last
  checkpoint is kept as it was.
"""
import dataclasses

import jax
import numpy as np

EXIT_COLLAPSE, EXIT_DIVERGED = 3, 4


class RunStopped(Exception):
  """The run stopped itself: `code` is the process exit code, `fail_code` the metrics.jsonl tag."""

  def __init__(self, message: str, code: int, fail_code: str):
    super().__init__(message)
    self.code, self.fail_code = code, fail_code


@dataclasses.dataclass
class Trouble:
  """Something that calls for a rewind: what (`fail_code`), the first step it showed at, and a line."""
  fail_code: str
  step: int
  message: str


class FiniteWatch:
  """Each step's non-finite flag (a device scalar), read on the host only when checked."""

  def __init__(self):
    self.flags = []   # (step, device bool)

  def add(self, step: int, flag):
    self.flags.append((step, flag))

  def clear(self):
    self.flags = []

  def check(self, up_to: int) -> Trouble | None:
    """The first non-finite step among the flags of steps <= up_to (those are dropped)."""
    due = [(s, f) for s, f in self.flags if s <= up_to]
    self.flags = [(s, f) for s, f in self.flags if s > up_to]
    if not due:
      return None
    bad = np.asarray(jax.device_get([f for _, f in due]))
    if not bad.any():
      return None
    first = due[int(np.argmax(bad))][0]
    return Trouble('non_finite_loss', first, f'step {first}: non-finite loss or gradient norm')


class SpikeWatch:
  """A logged loss above `factor` x the median of the previous `window` logged losses."""

  def __init__(self, factor: float, window: int, min_history: int = 5):
    self.factor, self.window, self.min_history = factor, window, min(min_history, window)
    self.history = []

  def clear(self):
    self.history = []

  def check(self, step: int, loss: float) -> Trouble | None:
    if not self.factor or not np.isfinite(loss):
      return None
    past = self.history[-self.window:]
    self.history.append(loss)
    if len(past) < self.min_history:
      return None
    median = float(np.median(past))
    if loss > self.factor * median:
      self.history.pop()   # the spike is not history to compare later losses with
      return Trouble('loss_spike', step, f'step {step}: loss {loss:.4f} is above {self.factor:g} x the '
                                         f'median {median:.4f} of the last {len(past)} logged losses')
    return None


def collapsed_layers(load_fraction_LE: np.ndarray, top_k: int) -> list[dict]:
  """MoE layers whose routing has collapsed over a window: at most top_k + 1 experts get a
  noticeable share (at least a tenth of the uniform 1/E) and the load coefficient of variation is
  at least 0.9 x that of "exactly top_k experts get every token", sqrt(E / top_k - 1)."""
  load_LE = np.asarray(load_fraction_LE, dtype=np.float64)
  num_experts = load_LE.shape[-1]
  if num_experts <= top_k + 1:   # every load would pass as collapsed
    return []
  cv_collapsed = float(np.sqrt(num_experts / top_k - 1))
  out = []
  for layer, load_E in enumerate(load_LE):
    total = load_E.sum()
    if total <= 0:
      continue
    share_E = load_E / total
    active = int((share_E >= 0.1 / num_experts).sum())
    cv = float(share_E.std() / share_E.mean())
    if active <= top_k + 1 and cv >= 0.9 * cv_collapsed:
      out.append({'layer': layer, 'active_experts': active, 'load_cv': cv, 'collapsed_cv': cv_collapsed})
  return out


def collapse_message(step: int, layers: list[dict], num_experts: int) -> str:
  parts = [f'MoE layer {c["layer"]} routes to {c["active_experts"]} of {num_experts} experts (load CV '
           f'{c["load_cv"]:.2f}; {c["collapsed_cv"]:.2f} when only top_k get tokens)' for c in layers]
  return f'router collapse at step {step}: ' + '; '.join(parts)
