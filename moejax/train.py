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
import jax.numpy as jnp
import numpy as np
import optax

from moejax import (checkpoint, cli, diagnostics as diagnostics_lib, distributed, flops,
                    evals, guard, metrics as metrics_lib, model, mtp, optim, qk_clip, router, sample,
                    sharding, transfer)
from moejax.data import fingerprint, pipeline, shards
from moejax.data.ensure import ensure_data
from moejax.data.prepare import PrepareError
from moejax.errors import ConfigError
from moejax.params import logical_axes
from moejax.state import Setup, init_state, setup
from moejax import validate
from moejax.validate import validate_data

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/default.py', 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics).')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-process job detected by jax (TPU pod '
                               'slices, SLURM, JAX_COORDINATOR_ADDRESS...); see moejax.distributed.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (or MOEJAX_COORDINATOR).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the job (or MOEJAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (or MOEJAX_PROCESS_ID).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Validate the config and print the per-device memory from '
                             'its shardings (moejax.dry_run); nothing is allocated or trained.')
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    'allow_data_change', False, 'Resume even though the data config differs from the checkpoint\'s '
    '(the saved batch index then points into the new data stream).')


def make_train_step(s: Setup, diagnostics: bool):
  """The jitted step. With `diagnostics` (log steps, or always when the balance weight adapts to
  the gradient-norm ratio) it also returns router statistics and the ratio; otherwise it computes
  only what the update and the throughput window need."""
  cfg = s.model
  batch_axes = sharding.batch_axes(s.config.sharding, s.mesh)
  diagnostics = diagnostics or cfg.loss.balance_gnr_target > 0

  def train_step(state, batch):
    (loss, aux), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        state['params'], state['router_bias'], batch, cfg, s.mesh, state['balance_coef'], batch_axes,
        diagnostics, mtp.loss_weight(cfg.mtp, state['step'], s.config.train.steps),
        state.get('mtp_router_bias'))
    new_state = apply_gradients(s, state, grads, aux)
    ratios = None
    if aux.moe is not None:
      if diagnostics:
        ratios = diagnostics_lib.gradient_norm_ratio(
            model.moe_layer_leaf(grads['moe_blocks'], ('ffn', 'router'), cfg), aux.moe.router_grads,
            state['balance_coef'], cfg.loss.z_weight)
      new_state.update(update_router(cfg, state, aux.moe, ratios, s.config.train.steps))
    if aux.mtp is not None and aux.mtp.moe is not None:
      new_state.update(update_mtp_router(cfg, state, aux.mtp.moe, s.config.train.steps))
    out = step_metrics(s, state, new_state, loss, aux, grads, ratios)
    if aux.moe is not None and aux.moe.health is not None:
      out.update(expert_health(cfg, state, new_state, aux.moe.health))
    return new_state, out

  return jax.jit(train_step, in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, sharding.replicated(s.mesh)), donate_argnums=0)


def apply_gradients(s: Setup, state, grads, aux):
  """The optimizer update, then QK-clip on this step's attention logits."""
  updates, opt_state = s.tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  if s.config.optim.qk_clip:
    params = qk_clip.qk_clip(params, aux.blocks.attn_logit_max, s.model, s.config.optim.qk_clip,
                             None if aux.mtp is None else aux.mtp.blocks.attn_logit_max)
  return {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}


def update_router(cfg, state, moe_aux, ratios, total_steps: int) -> dict:
  """What the train step updates outside the optimizer: the loss-free router bias from this step's
  global loads, and (with `loss.balance_gnr_target`) each layer's balance coefficient."""
  new = router.update_state(state, moe_aux, cfg.router, state['step'], total_steps)
  if cfg.loss.balance_gnr_target:
    new['balance_coef'] = diagnostics_lib.adapt_balance_coef(
        state['balance_coef'], ratios[0], cfg.loss.balance_gnr_target, cfg.loss.balance_weight)
  return new


def update_mtp_router(cfg, state, mtp_moe_aux, total_steps: int) -> dict:
  """The MTP modules' MoE blocks' bias: the decoder's controller, on their own loads."""
  keys = {'router_bias': 'mtp_router_bias', 'router_momentum': 'mtp_router_momentum'}
  own = {k: state[v] for k, v in keys.items() if v in state}
  new = router.update_state(own, mtp_moe_aux, cfg.router, state['step'], total_steps)
  return {keys[k]: v for k, v in new.items()}


def expert_health(cfg, state, new_state, health: dict) -> dict:
  """Log steps: per-expert output and update norms, and the routing churn of this step's update."""
  leaf = lambda params, k: model.moe_layer_leaf(params['moe_blocks'], ('ffn', k), cfg)
  names = ('w_gate', 'w_up', 'w_down')
  old_moe, new_moe = ({k: leaf(p, k) for k in names} for p in (state['params'], new_state['params']))
  route = lambda x_TD, w_DE, b_E: router.route(x_TD, w_DE, b_E, cfg.router, x_TD.shape[0]).expert_TK
  churn_L = diagnostics_lib.routing_churn(
      route, health['router_x'], (leaf(state['params'], 'router'), state['router_bias']),
      (leaf(new_state['params'], 'router'), new_state['router_bias']))
  return {'routing_churn': churn_L, 'expert_out_norm': health['expert_out_norm'],
          'expert_update_norm': diagnostics_lib.expert_update_norm(old_moe, new_moe)}


def step_metrics(s: Setup, state, new_state, loss, aux, grads, ratios) -> dict:
  """Every value a step reports, in one place (read on the host only at log steps)."""
  cfg = s.model
  lrs = optim.learning_rates(new_state['opt_state'])   # what each group used in this step
  grad_norm = optax.global_norm(grads)
  out = {'loss': loss, 'lm_loss': aux.lm_loss, 'grad_norm': grad_norm,
         'nonfinite': ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm)),
         'lr': lrs[f'lr/{next(iter(s.config.optim.groups))}'], **lrs,   # 'lr': the first group's
         'resid_max': aux.blocks.resid_max, 'attn_logit_max': aux.blocks.attn_logit_max}
  if cfg.loss.hidden_z_weight:
    out['moe/hidden_z_loss'] = aux.blocks.hidden_z_loss.mean()
  if aux.mtp is not None:
    out.update(mtp.loss_metrics(aux.mtp.loss_K))
    out['mtp_weight'] = mtp.loss_weight(cfg.mtp, state['step'], s.config.train.steps)
  m = aux.moe
  if m is None:
    return out
  tokens = s.config.train.batch_size * s.config.train.seq_len
  if 'router_momentum' in state:
    out['router_momentum'] = state['router_momentum']
  out.update({'load_LE': m.load_E, 'router_bias': state['router_bias'],
              'balance_coef': state['balance_coef'],
              'moe/balance_loss': m.balance_loss.mean(), 'moe/z_loss': m.z_loss.mean(),
              'moe/dropped_frac': m.dropped.sum() / (m.dropped.size * tokens * cfg.top_k)})
  if m.router_stats is not None:
    out.update(m.router_stats)
  if ratios is not None:
    out['grad_norm_ratio'], out['grad_norm_ratio_unit'] = ratios
  return out


def make_eval_step(s: Setup):
  def eval_step(params, router_bias, batch):
    _, aux = model.loss_fn(params, router_bias, batch, s.model, s.mesh,
                           batch_axes=sharding.batch_axes(s.config.sharding, s.mesh))
    return aux.lm_loss
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


class ProfileWindow:
  """A jax.profiler trace of train steps A..B (train.profile_steps) in WORKDIR/profile, viewable in
  xprof / TensorBoard's profile plugin. Started before step A runs; stopped once step B's results
  are on the host, so the trace holds the device work of A..B."""

  def __init__(self, spec, workdir: str):
    self.steps = validate.profile_steps(spec)
    self.dir = os.path.join(workdir, 'profile')
    self.active = self.done = False

  def before(self, step: int):
    if self.steps and not (self.active or self.done) and self.steps[0] <= step <= self.steps[1]:
      jax.profiler.start_trace(self.dir)
      self.active, self.first = True, step

  def after(self, step: int, state):
    if self.active and step >= self.steps[1]:
      self.stop(state)

  def stop(self, state=None):
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active, self.done = False, True
      print(f'profile of steps {self.first}-{self.steps[1]} written to {self.dir}', flush=True)


def train(config, workdir: str, allow_data_change: bool = False):
  s = setup(config)
  ensure_data(config)
  validate_data(config)
  c, t = config, config.train
  axes = logical_axes(model.model_specs(s.model))
  print(optim.group_table(transfer.optim_config(c.optim, s.model, axes), axes, s.abstract_state['params']),
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
  fresh_iter_state = data_iter.get_state()
  restored = checkpoint.restore_intact(mngr, s.abstract_state, log=lambda m: print(m, flush=True), tx=s.tx)
  if restored is not None:
    state, data_state, _ = restored
    if 'imported_from' in data_state:   # moejax.convert import: weights only, the data starts afresh
      print(f'starting from the checkpoint imported from {data_state["imported_from"]}', flush=True)
    else:
      data_iter.set_state(fingerprint.resume_state(data_state, data_fp, allow_data_change,
                                                   log=lambda m: print(m, flush=True)))
    start = int(state['step'])
    print(f'resumed from step {start} in {workdir}', flush=True)
  else:
    state, start = init_state(s), 0
  log = metrics_lib.MetricsLog(workdir, resume_step=start, is_writer=jax.process_index() == 0,
                               num_real_experts=s.model.num_experts, alert_maxvio=t.alert_maxvio,
                               alert_dead_experts=t.alert_dead_experts,
                               wandb_run=metrics_lib.open_wandb(c.log, c.to_dict(), workdir)
                               if jax.process_index() == 0 else None)

  tokenizer = shards.load_tokenizer(c.data.dir)
  sample.record_tokenizer(workdir, tokenizer)
  eval_sources = evals.eval_sources(c, tokenizer)
  eval_data = [[to_global(process_rows(b), s.batch_sharding) for b in src.batches] for src in eval_sources]
  downstream = evals.Downstream(c, s, tokenizer)
  eval_step = make_eval_step(s)
  steps = {False: make_train_step(s, diagnostics=False), True: make_train_step(s, diagnostics=True)}
  similarity = jax.jit(lambda moe_blocks: diagnostics_lib.expert_similarity(
      {k: model.moe_layer_leaf(moe_blocks, ('ffn', k), s.model) for k in ('w_gate', 'w_up', 'w_down')}))

  def evaluate(step):
    start_time = time.perf_counter()
    record = {}
    for src, data in zip(eval_sources, eval_data):
      losses = [eval_step(state['params'], state['router_bias'], b) for b in data]
      record.update(evals.source_metrics(src, float(np.mean(jax.device_get(losses)))))
    record['eval/loss'] = record['eval/main/loss']
    if downstream.due(step, t.steps):
      record.update(downstream(state))
    log.write(step, record)
    return time.perf_counter() - start_time, record['eval/loss']

  def flops_per_step(active_experts_per_token=None):
    return flops.train_flops_per_token(s.model, t.seq_len, active_experts_per_token) * t.batch_size * t.seq_len

  peak = flops.peak_flops_per_device(t.peak_flops_per_device) * jax.device_count()
  window = metrics_lib.Window(flops_per_step, peak, t.batch_size * t.seq_len)
  finite, spikes = guard.FiniteWatch(), guard.SpikeWatch(t.spike_factor, t.spike_window)
  pending, rewinds = None, 0

  def flush(final: bool = False) -> guard.Trouble | None:
    """Writes the last logged step's metrics (read from the device only now) and checks them."""
    nonlocal pending
    if pending is None:
      return None
    step_logged, out = pending
    pending = None
    record, layers = log.write_train(step_logged, out, window, total_steps=t.steps,
                                     extra=train_data.metrics(step_logged))
    trouble = finite.check(step_logged) or spikes.check(step_logged, record['loss'])
    if trouble is None and t.stop_on_collapse and 'load_fraction' in layers:
      collapsed = guard.collapsed_layers(layers['load_fraction'], s.model.top_k)
      if collapsed and final:
        print('warning: ' + guard.collapse_message(step_logged, collapsed, s.model.num_experts), flush=True)
      elif collapsed:
        stop_run(guard.collapse_message(step_logged, collapsed, s.model.num_experts),
                 guard.EXIT_COLLAPSE, 'router_collapse', step_logged, {'collapsed_layers': collapsed})
    return trouble

  def stop_run(message, code, fail_code, step, extra=None):
    """Ends the run without saving: the last checkpoint stays the last good state."""
    last = mngr.latest_step()
    message += f'; stopping (last checkpoint: {"none" if last is None else f"step {last}"})'
    log.write(step, {'fail_code': fail_code, 'event': message, **(extra or {})})
    data_iter.close()
    mngr.wait_until_finished()
    mngr.close()
    log.close()
    raise guard.RunStopped(message, code, fail_code)

  rewound_to, saved_since_rewind = None, True

  def rewind(trouble: guard.Trouble):
    """Back to the last checkpoint (or the initial state), skipping the batches up to the bad step.
    When the previous rewind diverged again before the next save, its checkpoint is a state that
    diverges whatever the data: it is set aside (checkpoints_diverged/) and the rewind goes further back."""
    nonlocal state, rewinds, pending, rewound_to, saved_since_rewind
    mngr.wait_until_finished()
    aside = ''
    if rewound_to and not saved_since_rewind:
      aside = (f'; set aside checkpoint step {rewound_to} (a rewind to it diverged again) in '
               + checkpoint.set_aside(mngr, [rewound_to], 'checkpoints_diverged'))
    rewinds += 1
    if rewinds > t.max_rewinds:
      stop_run(f'{trouble.message} after {t.max_rewinds} rewinds{aside}', guard.EXIT_DIVERGED,
               trouble.fail_code, trouble.step)
    back = checkpoint.restore_intact(mngr, s.abstract_state, log=lambda m: print(m, flush=True),
                                     before=trouble.step, tx=s.tx)
    if back is None:
      state, at = init_state(s), 0
      data_iter.set_state(fresh_iter_state)
    else:
      state, data_state, at = back
      data_iter.set_state(data_state['iterator'])
    for _ in range(trouble.step - at):   # the batches of steps at+1 .. trouble.step
      next(data_iter)
    rewound_to, saved_since_rewind = at, False
    message = (f'{trouble.message}; rewound to step {at} and skipped the batches of steps {at + 1}-'
               f'{trouble.step} (rewind {rewinds} of {t.max_rewinds}){aside}')
    print(message, flush=True)
    log.rewind(at)
    log.write(trouble.step, {'event': message, 'rewind': rewinds, 'reason': trouble.fail_code})
    finite.clear(), spikes.clear(), window.reset()
    pending = None
    return at

  profile = ProfileWindow(t.get('profile_steps', ''), workdir)
  if start == 0:
    evaluate(0)
  step = start
  while step < t.steps:
    step += 1
    batch = to_global(next(data_iter), s.batch_sharding)
    logged = step % t.log_every == 0 or step == t.steps or preemption.requested
    profile.before(step)
    state, out = steps[logged](state, batch)
    profile.after(step, state)
    finite.add(step, out['nonfinite'])
    stop = preemption.requested
    trouble = flush()                # the previous log step's metrics, read while this step runs
    window.add(out)
    if logged or stop:
      if 'moe_blocks' in state['params']:
        out = {**out, **similarity(state['params']['moe_blocks'])}
      pending = (step, out)
    reached = False
    if trouble is None and (step % t.eval_every == 0 or step == t.steps or downstream.due(step, t.steps)):
      trouble = flush() or finite.check(step)   # never evaluate (or stop on) a diverged state
      if trouble is None:
        spent, eval_loss = evaluate(step)
        window.start += spent        # throughput counts training time only
        reached = bool(t.target_loss) and eval_loss <= t.target_loss
    saving = step % c.checkpoint.every == 0 or step == t.steps or stop or reached
    if trouble is None and saving:   # a non-finite (or collapsed) state never reaches a checkpoint
      trouble = (flush() if step < t.steps else None) or finite.check(step)
    if trouble is not None:
      step = rewind(trouble)
      continue
    if saving:
      checkpoint.save(mngr, step, state, {'iterator': data_iter.get_state(), 'fingerprint': data_fp},
                      force=True)
      saved_since_rewind = True
    if reached:
      flush()
      if downstream.tasks and not downstream.due(step, t.steps):   # a speedrun's tasks at its stop
        log.write(step, downstream(state))
      print(f'target reached: eval/loss {eval_loss:.4f} <= {t.target_loss} at step {step}', flush=True)
      log.write(step, {'event': 'target_reached', 'target_loss': t.target_loss})
      break
    if stop:
      print(f'SIGTERM: saved a checkpoint at step {step}; exiting', flush=True)
      break
  profile.stop(state)   # a run that ended inside the window
  trouble = flush(final=True)
  if trouble is not None:   # only the last window's spike can show here, after its save
    print(f'warning: {trouble.message} in the last window', flush=True)
  data_iter.close()
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  return state


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  if _DRY_RUN.value:
    from moejax.dry_run import dry_run
    try:
      print(dry_run(_CONFIG.value))
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    return
  if _WORKDIR.value is None:
    sys.exit('error: --workdir is required')
  try:
    config = _CONFIG.value
    distributed.initialize(dict(os.environ), coordinator=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           multihost=_MULTIHOST.value)
    train(config, _WORKDIR.value, _ALLOW_DATA_CHANGE.value)
  except (ConfigError, pipeline.DataError, PrepareError, distributed.DistributedError,
          checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except guard.RunStopped as e:
    print(f'stopped: {e}', file=sys.stderr, flush=True)
    sys.exit(e.code)


if __name__ == '__main__':
  cli.check_config_args(sys.argv, default=_CONFIG.default)
  app.run(main)
