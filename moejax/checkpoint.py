"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state
(JSON: {'iterator': its state, 'fingerprint': the data config it refers to, moejax.data.fingerprint}).

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a checkpoint that restores garbage. Restoring takes the target shardings from
`abstract_state`, so a run can resume on a different mesh.
"""
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp


class CheckpointError(Exception):
  """No checkpoint of the workdir could be restored."""


class ParamsOnly(CheckpointError):
  """A parameters-only checkpoint (written by `moejax.convert import`) restored without an optimizer."""


PARAMS_ONLY = 'params_only'   # data_state key: the step holds no opt_state; restore creates a fresh one


def manager(workdir: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_names=('state', 'data'))


def _is_empty(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(getattr(l, 'size', 1) == 0 for l in leaves)


def saved_items(state: dict) -> dict:
  """The state items a checkpoint holds: all but those of zero-size arrays only (a model without MoE
  layers has a [0, E] router state), which orbax cannot save and restore re-creates empty."""
  return {k: v for k, v in state.items() if not _is_empty(v)}


def _with_empty_items(state: dict, abstract_state: dict) -> dict:
  import jax.numpy as jnp
  empty = lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)
  return {k: state[k] if k in state else jax.tree.map(empty, abstract_state[k]) for k in abstract_state}


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved_items(state)),
                                          data=ocp.args.JsonSave(data_state)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None, tx=None):
  """Returns (state, data_state) of `step` (default: the latest), placed as `abstract_state` says.

  A parameters-only step (an import: data_state[PARAMS_ONLY]) is restored without opt_state, and a
  fresh optimizer state is made by `tx.init` on the restored parameters; without `tx` it raises
  ParamsOnly."""
  step = mngr.latest_step() if step is None else step
  data = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
  if not (isinstance(data, dict) and data.get(PARAMS_ONLY)):
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(saved_items(abstract_state)), data=ocp.args.JsonRestore()))
    return _with_empty_items(restored['state'], abstract_state), restored['data']
  if tx is None:
    raise ParamsOnly(f'checkpoint step {step} holds parameters only (imported from '
                     f'{data.get("imported_from")}); restore it with the optimizer (tx=) to make its state')
  abstract = {k: v for k, v in saved_items(abstract_state).items() if k != 'opt_state'}
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))['state']
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state['opt_state'])
  state['opt_state'] = jax.jit(tx.init, out_shardings=shardings)(state['params'])
  return _with_empty_items(state, abstract_state), data


def restore_intact(mngr: ocp.CheckpointManager, abstract_state, log=print, before: int | None = None,
                   tx=None):
  """(state, data_state, step) of the latest step that restores, or None when there is no checkpoint.

  A step that cannot be read (damaged or partial files) is reported in one line and the previous
  step is tried. Once an earlier step restores, the unreadable ones are moved to
  `checkpoints_unreadable/` beside `checkpoints/` (kept, not deleted) so the run can save those
  steps again. When no step restores, nothing is moved and CheckpointError names each step's error."""
  steps = sorted((x for x in mngr.all_steps() if before is None or x < before), reverse=True)
  # `tx`: the optimizer, which makes the fresh optimizer state of a parameters-only (imported) step.
  failed = []
  for step in steps:
    try:
      state, data_state = restore(mngr, abstract_state, step, tx=tx)
    except ParamsOnly:   # readable, just needs the optimizer: never set aside
      raise
    except Exception as e:   # orbax surfaces damaged files as many error types (JSON, tensorstore, ...)
      failed.append((step, e))
      step_dir = os.path.join(str(mngr.directory), str(step))
      where = _file_named(e, step) or _unparsable_json(step_dir) or step_dir
      log(f'checkpoint step {step} is unreadable: {where}: {_first_line(e)}'
          + ('; trying the previous step' if step != steps[-1] else ''))
      continue
    if failed:
      aside = set_aside(mngr, [bad for bad, _ in failed], 'checkpoints_unreadable')
      log(f'restored step {step}; moved unreadable step(s) {", ".join(str(b) for b, _ in failed)} to {aside}')
    return state, data_state, step
  if failed:
    raise CheckpointError(f'checkpoint: no step under {mngr.directory} could be restored ('
                          + '; '.join(f'step {s}: {_first_line(e)}' for s, e in failed) + ')')
  return None


def set_aside(mngr: ocp.CheckpointManager, steps, folder: str) -> str:
  """Moves these steps out of checkpoints/ into `folder` beside it (kept, so nothing is lost, and
  the run can save those steps again); returns the folder."""
  aside = os.path.join(os.path.dirname(str(mngr.directory)), folder)
  os.makedirs(aside, exist_ok=True)
  for step in steps:
    target = os.path.join(aside, str(step))
    if os.path.exists(target):   # set aside before: keep both
      target += f'.{len(os.listdir(aside))}'
    shutil.move(os.path.join(str(mngr.directory), str(step)), target)
  mngr.reload()
  return aside


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200] if text else ""}'


def _file_named(e: Exception, step: int) -> str | None:
  """A path inside the step's directory named by the error or one it was raised from."""
  while e is not None:
    m = re.search(rf'(/[^\s\'",]*/{step}/[^\s\'",)]+)', str(e))
    if m:
      return m.group(1)
    e = e.__cause__ or e.__context__
  return None


def _unparsable_json(step_dir: str) -> str | None:
  """The first of the step's metadata files (JSON, outside the array data folders) that does not parse."""
  import json
  for root, dirs, files in os.walk(step_dir):
    dirs[:] = sorted(d for d in dirs if d not in ('d',) and not d.startswith('ocdbt'))
    for name in sorted(files):
      if name.endswith(('.txt', '.ocdbt')):   # not JSON
        continue
      path = os.path.join(root, name)
      try:
        with open(path, 'rb') as f:
          json.loads(f.read().decode())
      except (UnicodeDecodeError, ValueError):
        return path
      except OSError:
        continue
  return None


def restore_items(workdir: str, abstract: dict):
  """Only the state items in `abstract` (e.g. {'params': ...}) of the latest checkpoint, and its step."""
  mngr = manager(workdir, max_to_keep=1, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'workdir: no checkpoint under {workdir}/checkpoints')
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
  mngr.close()
  return restored['state'], step


def restore_params(workdir: str, abstract_params):
  """Only the parameters of the latest checkpoint (for sampling and evaluation)."""
  state, step = restore_items(workdir, {'params': abstract_params})
  return state['params'], step
