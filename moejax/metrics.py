"""Training metrics: one JSON object per log step in metrics.jsonl, TensorBoard events, a progress line.

Per-layer expert loads go to loads.jsonl (fractions of the window's assignments, one row per MoE layer).
"""
import json
import os
import sys
import time

import jax
import numpy as np


class Window:
  """Accumulates what happens between two log records (device-side sums; read only when logged)."""

  def __init__(self, flops_per_step: float, peak_flops: float, tokens_per_step: int):
    self.flops_per_step, self.peak_flops, self.tokens_per_step = flops_per_step, peak_flops, tokens_per_step
    self.reset()

  def reset(self):
    self.steps, self.load_sum_LE, self.start = 0, None, time.perf_counter()

  def add(self, out: dict):
    self.steps += 1
    if 'load_LE' in out:
      self.load_sum_LE = out['load_LE'] if self.load_sum_LE is None else self.load_sum_LE + out['load_LE']


def moe_stats(load_LE: np.ndarray, window_load_LE: np.ndarray) -> dict:
  """MaxVio (DeepSeek/Wang et al.): max over layers of (max load - mean load) / mean load."""
  mean_L = load_LE.mean(-1)
  maxvio_L = (load_LE.max(-1) - mean_L) / np.maximum(mean_L, 1e-9)
  return {'moe/maxvio': float(maxvio_L.max()),
          'moe/dead_experts': int((window_load_LE == 0).sum())}


class MetricsLog:
  def __init__(self, workdir: str, resume_step: int, is_writer: bool = True):
    self.is_writer = is_writer
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.loads_path = os.path.join(workdir, 'loads.jsonl')
    self.tb = None
    self.last_time = time.perf_counter()
    if not is_writer:
      return
    for path in (self.path, self.loads_path):   # a resumed run rewrites what came after its checkpoint
      if os.path.exists(path):
        with open(path) as f:
          keep = [l for l in f if json.loads(l)['step'] <= resume_step]
        with open(path, 'w') as f:
          f.writelines(keep)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, record: dict, loads=None):
    if not self.is_writer:
      return
    record = {'step': step, **record}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if loads is not None:
      with open(self.loads_path, 'a') as f:
        f.write(json.dumps({'step': step, 'load_fraction': loads}) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    if 'eval/loss' in record:
      print(f'step {step:>6} | eval/loss {record["eval/loss"]:.4f}', flush=True)

  def write_train(self, step: int, out: dict, window: Window, total_steps: int, extra: dict | None = None):
    out = jax.device_get(out)
    window_load = jax.device_get(window.load_sum_LE)
    elapsed = time.perf_counter() - window.start
    step_time = elapsed / max(window.steps, 1)
    record = {k: float(v) for k, v in out.items() if k != 'load_LE'}
    record['tokens_per_sec'] = window.tokens_per_step / step_time
    record['step_time_s'] = step_time
    record['mfu'] = window.flops_per_step / step_time / window.peak_flops
    loads = None
    if 'load_LE' in out:
      record.update(moe_stats(np.asarray(out['load_LE']), np.asarray(window_load)))
      loads = (window_load / window_load.sum(-1, keepdims=True)).round(5).tolist()
    record.update(extra or {})   # e.g. data/<source>/... from the input pipeline
    window.reset()
    self.write(step, record, loads)
    self.progress(step, record, total_steps, step_time)

  def progress(self, step, r, total_steps, step_time):
    eta = (total_steps - step) * step_time
    line = (f'step {step:>6}/{total_steps} | loss {r["loss"]:.4f} | {r["tokens_per_sec"]:,.0f} tok/s'
            f' | mfu {r["mfu"]:.1%} | eta {int(eta // 60)}m{int(eta % 60):02d}s')
    if 'moe/maxvio' in r:
      line += f' | maxvio {r["moe/maxvio"]:.2f} dead {r["moe/dead_experts"]}'
    print(line, flush=True, file=sys.stdout)

  def close(self):
    if self.tb is not None:
      self.tb.close()
