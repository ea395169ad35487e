"""`make ablate-balancing`: the default MoE on Shakespeare under five balancing methods.

`VARIANTS` maps a name to command-line overrides; `python -m moejax.ablate` trains each.
"""
from experiments import default

VARIANTS = {
    'no balancing': ['--config.model.bias_update_rate=0'],
    'balance loss only': ['--config.model.bias_update_rate=0', '--config.model.balance_loss_weight=0.01'],
    'loss-free bias only': [],
    'bias + seq-wise loss 1e-4': ['--config.model.balance_loss_weight=0.0001'],
    'bias + 4 zero experts (target 1.5)': ['--config.model.num_zero_experts=4',
                                           '--config.model.target_active_experts=1.5'],
}


def get_config():
  c = default.get_config()   # the `make train` model, trained shorter and logged more often
  c.train.steps, c.train.log_every, c.train.eval_every = 250, 10, 50
  c.train.alert_maxvio = 0.0        # the unbalanced variants would alert every window
  c.optim.warmup_steps = 25
  c.checkpoint.every = 1000
  return c
