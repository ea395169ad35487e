"""Studies for `python -m moejax.tools.study --study=experiments/studies/<name>.py --out=results/<name>.md`.

A study file has `VARIANTS = {name: fn(config) -> None}` (each fn edits the config in place) and
`get_config(variant=None)`, which returns `apply(base config, VARIANTS, variant)`: the same function
builds the config in the runner (to validate every variant first) and in `python -m moejax.train
--config=<study file>:<variant>`, which trains it. Optional hooks (TITLE, ABOUT, COLUMNS, table,
plot, set_steps) are described in moejax/tools/study.py.
"""


def apply(config, variants: dict, variant: str | None = None):
  """`config` locked, then edited by `variants[variant]` (None: the base): a misspelt key raises."""
  config.lock()
  if variant is None:
    return config
  if variant not in variants:
    raise ValueError(f'unknown variant {variant!r}; choose one of {list(variants)}')
  variants[variant](config)
  return config


def smoke_run_text(c) -> str:
  """What the smoke-model studies' ABOUT texts say of the model, data and run of config `c`."""
  return ('Model and data: experiments/smoke.py (d_model 64, 3 layers (1 dense), 8 experts top-2, vocab 1024, '
          f'the committed three-play sample), {c.train.steps} steps of {c.train.batch_size} x {c.train.seq_len} '
          f'tokens on one device, cosine schedule with {c.optim.warmup_steps} warmup steps. Held-out loss: mean '
          f'over the held-out batches (up to {c.train.eval_batches}) at the last step.')


def smoke_on_one_device(steps: int):
  """experiments/smoke.py for `steps` steps of 16 x 64 tokens on one device, 8 held-out batches, a
  cosine schedule over the run and no checkpoint before the last: the optimizer, precision and
  width studies start here."""
  from experiments import smoke
  c = smoke.get_config()
  c.train.steps, c.train.batch_size, c.train.seq_len, c.train.eval_batches = steps, 16, 64, 8
  c.optim.decay_steps = 0
  c.checkpoint.every = 100_000
  c.mesh.data, c.mesh.expert = 1, 1
  return c
