"""moejax.distributed: which `jax.distributed.initialize` arguments the flags and environment give
(the multi-process run itself is tests/test_train.py::test_two_processes_...)."""
import pytest

from moejax.distributed import DistributedError, init_kwargs

SLURM = {'SLURM_JOB_ID': '42', 'SLURM_NTASKS': '16', 'SLURM_STEP_NUM_TASKS': '16', 'SLURM_PROCID': '3'}


def test_single_process_without_flags_or_cluster_environment():
  assert init_kwargs({}) is None
  assert init_kwargs({'SLURM_JOB_ID': '42', 'SLURM_NTASKS': '1'}) is None   # one task: no job to join


def test_explicit_coordinator_from_environment_or_flags_flags_winning():
  env = {'MOEJAX_COORDINATOR': '10.0.0.1:1234', 'MOEJAX_NUM_PROCESSES': '4', 'MOEJAX_PROCESS_ID': '2'}
  assert init_kwargs(env) == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}
  assert init_kwargs(env, coordinator='h:1', process_id=0) == {
      'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 0}
  assert init_kwargs({**SLURM, **env})['process_id'] == 2   # explicit beats detection


def test_multihost_flag_or_env_and_multi_task_slurm_let_jax_detect():
  assert init_kwargs({}, multihost=True) == {}
  assert init_kwargs({'MOEJAX_MULTIHOST': '1'}) == {}
  assert init_kwargs({'MOEJAX_MULTIHOST': '0'}) is None
  assert init_kwargs(SLURM) == {}


@pytest.mark.parametrize('env', [{'MOEJAX_COORDINATOR': 'h:1'},
                                 {'MOEJAX_COORDINATOR': 'h:1', 'MOEJAX_NUM_PROCESSES': '2', 'MOEJAX_PROCESS_ID': '2'}])
def test_coordinator_without_a_valid_process_id_is_refused_naming_the_variables(env):
  with pytest.raises(DistributedError, match='MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID'):
    init_kwargs(env)
