"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Which processes form the job, first match wins:
  1. an explicit coordinator: `--coordinator=host:port --num_processes=N --process_id=i` or the
     environment variables MOEJAX_COORDINATOR, MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID;
  2. `--multihost` (or MOEJAX_MULTIHOST=1): jax's own detection (Cloud TPU pod slices, SLURM, Open MPI,
     JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID);
  3. a SLURM job step with more than one task (`srun`): jax's SLURM detection;
  4. otherwise one process, nothing to initialise.
On CPU, cross-process collectives use gloo (jax's default, `jax_cpu_collectives_implementation`).
"""
import jax

class DistributedError(ValueError):
  """Flags or environment that describe no job (reported as one line by the CLI)."""


ENV = ('MOEJAX_COORDINATOR', 'MOEJAX_NUM_PROCESSES', 'MOEJAX_PROCESS_ID')


def init_kwargs(env: dict, coordinator: str = '', num_processes: int = 0, process_id: int = -1,
                multihost: bool = False) -> dict | None:
  """Arguments for `jax.distributed.initialize` ({} = let jax detect), or None for one process."""
  coordinator = coordinator or env.get('MOEJAX_COORDINATOR', '')
  num_processes = num_processes or int(env.get('MOEJAX_NUM_PROCESSES', 0))
  process_id = process_id if process_id >= 0 else int(env.get('MOEJAX_PROCESS_ID', -1))
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f'coordinator {coordinator} needs num_processes >= 1 and 0 <= process_id < '
                       f'num_processes (got {num_processes}, {process_id}); set them by flag or '
                       f'{", ".join(ENV[1:])}')
    return {'coordinator_address': coordinator, 'num_processes': num_processes, 'process_id': process_id}
  if multihost or env.get('MOEJAX_MULTIHOST', '') not in ('', '0'):
    return {}
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', 1))) > 1:
    return {}
  return None


def initialize(env: dict, **flags) -> bool:
  """Joins the job described by the flags/environment; returns whether it is multi-process."""
  kwargs = init_kwargs(env, **flags)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True
