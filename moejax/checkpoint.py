"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state
(JSON: {'iterator': its state, 'fingerprint': the data config it refers to, moejax.data.fingerprint}).

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a checkpoint that restores garbage. Restoring takes the target shardings from
`abstract_state`, so a run can resume on a different mesh.
"""
import os

import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_names=('state', 'data'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Returns (state, data_state) of `step` (default: the latest), placed as `abstract_state` says."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


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
