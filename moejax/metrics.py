"""Training metrics: one JSON object per log step in metrics.jsonl, TensorBoard events, a progress line.

Per-layer expert loads go to loads.jsonl (fractions of the window's assignments, one row per MoE layer).
"""
import json
import os
import secrets
import sys
import time

import jax
import numpy as np

from moejax import diagnostics


class Window:
  """Accumulates what happens between two log records (device-side sums; read only when logged)."""

  def __init__(self, flops_per_step, peak_flops: float, tokens_per_step: int):
    """`flops_per_step(active_experts_per_token or None)` -> model FLOPs of one step."""
    self.flops_per_step, self.peak_flops, self.tokens_per_step = flops_per_step, peak_flops, tokens_per_step
    self.reset()

  def reset(self):
    self.steps, self.load_sum_LE, self.start = 0, None, time.perf_counter()

  def add(self, out: dict):
    self.steps += 1
    if 'load_LE' in out:
      self.load_sum_LE = out['load_LE'] if self.load_sum_LE is None else self.load_sum_LE + out['load_LE']


def open_wandb(log_cfg, config_dict: dict, workdir: str):
  """A Weights & Biases run for this workdir (or None when log.wandb_project is empty): named after
  the workdir, with the config; its id is kept in the workdir so a resumed run continues it."""
  if not log_cfg.wandb_project:
    return None
  import wandb
  id_path = os.path.join(workdir, 'wandb_run_id')
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(6)
    with open(id_path, 'w') as f:
      f.write(run_id + '\n')
  return wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity or None, id=run_id,
                    resume='allow', name=os.path.basename(os.path.abspath(workdir)), config=config_dict,
                    dir=workdir)


class MetricsLog:
  def __init__(self, workdir: str, resume_step: int, is_writer: bool = True, num_real_experts: int = 0,
               alert_maxvio: float = 0.0, alert_dead_experts: int = 0, wandb_run=None):
    """wandb_run: an open W&B run (open_wandb) that also gets every record, or None."""
    self.is_writer = is_writer
    self.wandb = wandb_run
    self.num_real_experts = num_real_experts
    self.alert_maxvio, self.alert_dead_experts = alert_maxvio, alert_dead_experts
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.loads_path = os.path.join(workdir, 'loads.jsonl')
    self.tb = None
    self.last_time = time.perf_counter()
    if not is_writer:
      return
    self.rewind(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def rewind(self, step: int):
    """Drops the records after `step` (a resumed or rewound run writes them again); events (a
    rewind, a stop: records with an 'event') are history and stay."""
    if not self.is_writer:
      return
    for path in (self.path, self.loads_path):
      if os.path.exists(path):
        with open(path) as f:
          keep = [l for l in f if (r := json.loads(l))['step'] <= step or 'event' in r]
        with open(path, 'w') as f:
          f.writelines(keep)

  def write(self, step: int, record: dict, layers: dict | None = None):
    if not self.is_writer:
      return
    record = {'step': step, **record}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if layers:
      with open(self.loads_path, 'a') as f:
        f.write(json.dumps({'step': step, **layers}) + '\n')
    scalars = {k: v for k, v in record.items()   # non-finite ones stay in metrics.jsonl only
               if k != 'step' and isinstance(v, (int, float)) and np.isfinite(v)}
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)
    if 'eval/loss' in record:
      bpb = ''.join(f' | {k} {v:.4f}' for k, v in record.items() if k.endswith('/bpb') or k == 'eval/core')
      print(f'step {step:>6} | eval/loss {record["eval/loss"]:.4f}{bpb}', flush=True)

  def write_train(self, step: int, out: dict, window: Window, total_steps: int, extra: dict | None = None):
    out = jax.device_get(out)
    window_load = jax.device_get(window.load_sum_LE)
    elapsed = time.perf_counter() - window.start
    step_time = elapsed / max(window.steps, 1)
    record = {k: float(v) for k, v in out.items() if np.ndim(v) == 0}
    record['tokens_per_sec'] = window.tokens_per_step / step_time
    record['step_time_s'] = step_time
    summary, layers = diagnostics.summarize(out, window_load, self.num_real_experts)
    record.update(summary)
    # MFU counts the real experts a token actually used (zero-computation experts cost nothing)
    record['mfu'] = window.flops_per_step(record.get('moe/active_experts_per_token')) / step_time / window.peak_flops
    record.update(extra or {})   # e.g. data/<source>/... from the input pipeline
    window.reset()
    record.update(self.alerts(step, record))
    self.write(step, record, layers)
    self.progress(step, record, total_steps, step_time)
    return record, layers

  def alerts(self, step: int, r: dict) -> dict:
    """Warns in the log (and the record) when the router drifts towards collapse."""
    found = []
    if self.alert_maxvio and r.get('moe/maxvio_global', 0.0) > self.alert_maxvio:
      found.append(f'global MaxVio {r["moe/maxvio_global"]:.2f} > {self.alert_maxvio}')
    if self.alert_dead_experts and r.get('moe/dead_experts', 0) >= self.alert_dead_experts:
      found.append(f'{r["moe/dead_experts"]} dead experts')
    for message in found:
      print(f'ALERT step {step}: {message}', flush=True)
    return {'alerts': found} if found else {}

  def progress(self, step, r, total_steps, step_time):
    if not self.is_writer:   # one console line per step, from process 0
      return
    eta = (total_steps - step) * step_time
    line = (f'step {step:>6}/{total_steps} | loss {r["loss"]:.4f} | {r["tokens_per_sec"]:,.0f} tok/s'
            f' | mfu {r["mfu"]:.1%} | eta {int(eta // 60)}m{int(eta % 60):02d}s')
    if 'moe/maxvio' in r:
      line += f' | maxvio {r["moe/maxvio"]:.2f} dead {r["moe/dead_experts"]}'
    if self.num_real_experts and 'moe/active_experts_per_token' in r:
      line += f' | real/token {r["moe/active_experts_per_token"]:.2f}'
    print(line, flush=True, file=sys.stdout)

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
