"""`make ablate-precision`: fp32, bf16 and fp8 on the smoke model."""
from experiments.studies import apply, smoke_on_one_device, smoke_run_text

TITLE = 'Precision ablation'


def about(runs):
  c = next(iter(runs.values())).config
  return ('fp32; bf16 compute with fp32 parameters; fp8 (e4m3 forward, e5m2 gradients, per-tensor current '
          'scaling) expert and dense MLP matmuls with bf16 compute elsewhere. On CPU fp8 is emulated by '
          'quantize-dequantize, so its tokens/s measures the emulation overhead, not fp8 speed. '
          + smoke_run_text(c))


ABOUT = about


def policy(name):
  def edit(c):
    c.model.precision = name
  return edit


VARIANTS = {p: policy(p) for p in ('fp32', 'bf16', 'fp8')}


def get_config(variant=None):
  c = smoke_on_one_device(300)
  c.train.log_every, c.train.eval_every = 10, 50
  c.optim.warmup_steps = 30
  return apply(c, VARIANTS, variant)
