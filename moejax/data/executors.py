"""The engines `moejax.data.prepare` runs its stages on: datatrove's executors, chained stage by
stage with `depends=`, each skipping the tasks a previous run completed (its logging folder's
`completions/`).

- `local`: this machine; `workers` tasks at once (datatrove's process pool; one worker runs the
  tasks in this process, which is what tests and small corpora want).
- `slurm`: one sbatch array job per stage, each depending on the previous one (datatrove's
  SlurmPipelineExecutor); the command returns once they are submitted.
- `ray`: a Ray cluster (`ray.init()` joins the one at RAY_ADDRESS, else starts a local one).

datatrove logs every task to `<work>/logs/<stage>/logs/task_*.log`; the console gets only moejax's
one line per stage (set verbose for datatrove's own console logging).
"""
import dataclasses
import os
from copy import deepcopy

os.environ.setdefault('TQDM_DISABLE', '1')   # datatrove's progress bars; read when tqdm is imported

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor import base as executor_base

EXECUTORS = ('local', 'slurm', 'ray')


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  pipeline: list
  tasks: int
  max_workers: int = 0    # 0: no cap beyond --workers


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  kind: str = 'local'
  workers: int = 1
  verbose: bool = False
  slurm_partition: str = ''
  slurm_time: str = '12:00:00'
  slurm_cpus_per_task: int = 1
  slurm_mem_per_cpu_gb: int = 2
  slurm_args: str = ''    # extra sbatch options, e.g. "--account=xyz --qos=high"


def _file_only_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
  """datatrove's task logger without its console sink (the log file keeps everything)."""
  from datatrove.utils.logging import logger
  logger.remove()
  logfile = logging_dir.open(f'logs/task_{rank:05d}.log', 'w')
  logger.add(logfile, colorize=False, level='DEBUG',
             format='{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}')
  return logfile


def _close_file_only_task_logger(logfile):
  from datatrove.utils.logging import logger
  logger.complete()
  logger.remove()
  logfile.close()


def quiet_datatrove():
  """Console logging off for datatrove (applied wherever this module is imported: pool workers
  unpickle our executor class, which imports it)."""
  from datatrove.utils.logging import logger
  logger.remove()
  executor_base.add_task_logger = _file_only_task_logger
  executor_base.close_task_logger = _close_file_only_task_logger


class LocalExecutor(LocalPipelineExecutor):
  """datatrove's local executor; with one worker the tasks run in this process, one after another
  (no process pool or manager process to start)."""

  verbose = False

  def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
    if not self.verbose:   # in a pool worker too: it unpickled this executor, not our setup
      quiet_datatrove()
    return super()._run_for_rank(rank, local_rank, node_rank)

  def run(self):
    if self.workers != 1:
      return super().run()
    if self.depends:
      self.depends.run()
    self._launched = True
    pipeline = self.pipeline
    for rank in self.get_incomplete_ranks(range(self.tasks)):
      self.pipeline = deepcopy(pipeline)
      self._run_for_rank(rank)
    self.pipeline = pipeline


def chain(stages: list[Stage], work: str, opts: EngineOptions):
  """The executor of the last stage, each stage depending on the one before."""
  if not opts.verbose:
    quiet_datatrove()
  prev = None
  for s in stages:
    workers = min(opts.workers, s.tasks, s.max_workers or s.tasks)
    logging_dir = f'{work}/logs/{s.name}'
    if opts.kind == 'local':
      prev = LocalExecutor(s.pipeline, tasks=s.tasks, workers=workers, logging_dir=logging_dir,
                           depends=prev)
      prev.verbose = opts.verbose
    elif opts.kind == 'slurm':
      from datatrove.executor import SlurmPipelineExecutor
      prev = SlurmPipelineExecutor(
          s.pipeline, tasks=s.tasks, time=opts.slurm_time, partition=opts.slurm_partition,
          job_name=f'moejax-prepare-{s.name}', logging_dir=logging_dir, depends=prev,
          slurm_logs_folder=f'{logging_dir}/slurm',
          cpus_per_task=opts.slurm_cpus_per_task, mem_per_cpu_gb=opts.slurm_mem_per_cpu_gb,
          sbatch_args=_sbatch_args(opts.slurm_args), workers=opts.workers if s.tasks > 1 else 1)
    elif opts.kind == 'ray':
      from datatrove.executor import RayPipelineExecutor
      prev = RayPipelineExecutor(s.pipeline, tasks=s.tasks, workers=workers,
                                 logging_dir=logging_dir, depends=prev)
    else:
      raise ValueError(f'--executor: unknown {opts.kind!r}; choose one of {list(EXECUTORS)}')
  return prev


def _sbatch_args(text: str) -> dict:
  out = {}
  for part in text.split():
    key, _, value = part.lstrip('-').partition('=')
    out[key] = value
  return out
