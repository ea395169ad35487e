"""Trains a model: `python -m moejax.train --config=experiments/X.py --workdir=runs/X [--config.a.b=v]`.

The loop reads top to bottom: validate the config, build the mesh and the sharded state (or restore
it), then step. Step N+1 is dispatched before step N's metrics are read, so the host never waits on
the device inside the loop. Running the same command again resumes from the latest checkpoint;
SIGTERM saves a checkpoint and exits 0.
"""
import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import numpy as np
import optax

from moejax import (checkpoint, diagnostics, distributed, flops, metrics as metrics_lib, model, optim,
                    qk_clip, router, sharding, transfer)
from moejax.data import fingerprint, pipeline
from moejax.data.prepare import PrepareError
from moejax.params import logical_axes
from moejax.state import Setup, init_state, setup
from moejax.validate import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/default.py', 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics).')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-process job detected by jax (TPU pod '
                               'slices, SLURM, JAX_COORDINATOR_ADDRESS...); see moejax.distributed.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (or MOEJAX_COORDINATOR).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the job (or MOEJAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (or MOEJAX_PROCESS_ID).')
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    'allow_data_change', False, 'Resume even though the data config differs from the checkpoint\'s '
    '(the saved batch index then points into the new data stream).')


def make_train_step(s: Setup):
  cfg = s.config.model
  tokens_per_batch = s.config.train.batch_size * s.config.train.seq_len
  batch_axes = sharding.batch_axes(s.config.sharding, s.mesh)

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state['params'], state['router_bias'], batch, cfg, s.mesh,
                                 state['balance_coef'], batch_axes)
    updates, opt_state = s.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if s.config.optim.qk_clip:
      params = qk_clip.qk_clip(params, aux['blocks']['attn_logit_max'], cfg, s.config.optim.qk_clip)
    new_state = {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    lrs = optim.learning_rates(opt_state)   # what each group used in this step
    out = {'loss': loss, 'lm_loss': aux['lm_loss'], 'grad_norm': optax.global_norm(grads),
           'lr': lrs.get('lr/hidden', next(iter(lrs.values()))), **lrs,
           'resid_max': aux['blocks']['resid_max'], 'attn_logit_max': aux['blocks']['attn_logit_max']}
    if cfg.hidden_z_loss_weight:
      out['moe/hidden_z_loss'] = aux['blocks']['hidden_z_loss'].mean()
    if 'load_E' in aux:
      ratio_L, ratio_unit_L = diagnostics.gradient_norm_ratio(
          model.moe_layer_leaf(grads['moe_blocks'], ('ffn', 'router'), cfg), aux, state['balance_coef'],
          cfg.z_loss_weight)
      new_state['router_bias'] = router.update_router_bias(
          state['router_bias'], aux['load_E'], router.bias_rate(cfg, state['step'], s.config.train.steps),
          num_real=cfg.num_experts, target_active=cfg.target_active_experts or cfg.top_k,
          mode=cfg.bias_update_mode, center=cfg.bias_center, top_k=cfg.top_k)
      if cfg.balance_gnr_target:
        new_state['balance_coef'] = diagnostics.adapt_balance_coef(
            state['balance_coef'], ratio_L, cfg.balance_gnr_target, cfg.balance_loss_weight)
      out.update({k: aux[k] for k in diagnostics.ROUTER_STATS + ('real_experts_hist',) if k in aux})
      out.update({'load_LE': aux['load_E'], 'router_bias': state['router_bias'],
                  'balance_coef': state['balance_coef'], 'grad_norm_ratio': ratio_L,
                  'grad_norm_ratio_unit': ratio_unit_L,
                  'moe/balance_loss': aux['balance_loss'].mean(), 'moe/z_loss': aux['z_loss'].mean(),
                  'moe/dropped_frac': aux['dropped'].sum() / (aux['dropped'].size * tokens_per_batch * cfg.top_k)})
    return new_state, out

  return jax.jit(train_step, in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, sharding.replicated(s.mesh)), donate_argnums=0)


def make_eval_step(s: Setup):
  def eval_step(params, router_bias, batch):
    _, aux = model.loss_fn(params, router_bias, batch, s.config.model, s.mesh,
                           batch_axes=sharding.batch_axes(s.config.sharding, s.mesh))
    return aux['lm_loss']
  return jax.jit(eval_step, in_shardings=(s.state_shardings['params'], s.state_shardings['router_bias'],
                                          s.batch_sharding))


def to_global(batch: dict, batch_sharding):
  """This process's rows -> global arrays sharded over the batch axes (works multi-host too)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def process_rows(batch: dict) -> dict:
  """This process's rows of a global batch: rows [p*B:(p+1)*B], as the train pipeline shards them."""
  n = jax.process_count()
  return {k: np.split(v, n)[jax.process_index()] for k, v in batch.items()}


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (pre-emptible VMs send SIGTERM)."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True


def train(config, workdir: str, allow_data_change: bool = False):
  s = setup(config)
  c, t = config, config.train
  axes = logical_axes(model.model_specs(c.model))
  print(optim.group_table(transfer.optim_config(c.optim, c.model, axes), axes, s.abstract_state['params']),
        flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  preemption = Preemption()

  sources = pipeline.sources_from_config(c.data)
  ds, train_data = pipeline.train_data(
      sources, seq_len=t.seq_len, batch_size=t.batch_size, seed=c.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      tokenizer_dir=c.data.dir)
  if len(ds) < t.steps:
    raise pipeline.DataError(f'data: the sources\' epoch budgets give {len(ds)} batches; train.steps is {t.steps}')
  # Saved with the iterator position: resuming under another data config is refused.
  data_fp = fingerprint.fingerprint(sources, seq_len=t.seq_len, batch_size=t.batch_size, seed=c.seed)
  data_iter = pipeline.train_iterator(ds, c.data.workers)
  mngr = checkpoint.manager(workdir, c.checkpoint.max_to_keep, c.checkpoint.async_save)
  if mngr.latest_step() is not None:
    state, data_state = checkpoint.restore(mngr, s.abstract_state)
    data_iter.set_state(fingerprint.resume_state(data_state, data_fp, allow_data_change,
                                                 log=lambda m: print(m, flush=True)))
    start = int(state['step'])
    print(f'resumed from step {start} in {workdir}', flush=True)
  else:
    state, start = init_state(s), 0
  log = metrics_lib.MetricsLog(workdir, resume_step=start, is_writer=jax.process_index() == 0,
                               num_real_experts=c.model.num_experts, alert_maxvio=t.alert_maxvio,
                               alert_dead_experts=t.alert_dead_experts)

  eval_data = [to_global(process_rows(b), s.batch_sharding) for b in pipeline.eval_batches(
      c.data.dir, seq_len=t.seq_len, batch_size=t.batch_size, max_batches=t.eval_batches)]
  eval_step = make_eval_step(s)
  train_step = make_train_step(s)
  similarity = jax.jit(lambda moe_blocks: diagnostics.expert_similarity(
      {k: model.moe_layer_leaf(moe_blocks, ('ffn', k), c.model) for k in ('w_gate', 'w_up', 'w_down')}))

  def evaluate(step):
    start_time = time.perf_counter()
    losses = [eval_step(state['params'], state['router_bias'], b) for b in eval_data]
    log.write(step, {'eval/loss': float(np.mean(jax.device_get(losses)))})
    return time.perf_counter() - start_time

  if start == 0:
    evaluate(0)
  def flops_per_step(active_experts_per_token=None):
    return flops.train_flops_per_token(c.model, t.seq_len, active_experts_per_token) * t.batch_size * t.seq_len

  peak = flops.peak_flops_per_device(t.peak_flops_per_device) * jax.device_count()
  window = metrics_lib.Window(flops_per_step, peak, t.batch_size * t.seq_len)
  pending = None
  for step in range(start + 1, t.steps + 1):
    batch = to_global(next(data_iter), s.batch_sharding)
    state, out = train_step(state, batch)
    stop = preemption.requested
    if pending is not None:          # read the previous step's metrics while this step runs
      log.write_train(*pending, window, total_steps=t.steps, extra=train_data.metrics(pending[0]))
      pending = None
    window.add(out)
    if step % t.log_every == 0 or step == t.steps or stop:
      if 'moe_blocks' in state['params']:
        out = {**out, **similarity(state['params']['moe_blocks'])}
      pending = (step, out)
    if step % t.eval_every == 0 or step == t.steps:
      if pending is not None:
        log.write_train(*pending, window, total_steps=t.steps, extra=train_data.metrics(pending[0]))
        pending = None
      window.start += evaluate(step)   # throughput counts training time only
    if step % c.checkpoint.every == 0 or step == t.steps or stop:
      checkpoint.save(mngr, step, state, {'iterator': data_iter.get_state(), 'fingerprint': data_fp},
                      force=True)
    if stop:
      print(f'SIGTERM: saved a checkpoint at step {step}; exiting', flush=True)
      break
  if pending is not None:
    log.write_train(*pending, window, total_steps=t.steps, extra=train_data.metrics(pending[0]))
  data_iter.close()
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  return state


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  if _WORKDIR.value is None:
    sys.exit('error: --workdir is required')
  config = _CONFIG.value
  try:
    distributed.initialize(dict(os.environ), coordinator=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           multihost=_MULTIHOST.value)
    train(config, _WORKDIR.value, _ALLOW_DATA_CHANGE.value)
  except (ConfigError, pipeline.DataError, PrepareError, distributed.DistributedError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
