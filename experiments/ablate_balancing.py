"""`make ablate-balancing`: the default MoE on Shakespeare under five balancing methods.

`VARIANTS` maps a name to command-line overrides; `python -m moejax.ablate` trains each.
"""
from moejax.configs import base_config

VARIANTS = {
    'no balancing': ['--config.model.bias_update_rate=0'],
    'balance loss only': ['--config.model.bias_update_rate=0', '--config.model.balance_loss_weight=0.01'],
    'loss-free bias only': [],
    'bias + seq-wise loss 1e-4': ['--config.model.balance_loss_weight=0.0001'],
    'bias + 4 zero experts (target 1.5)': ['--config.model.num_zero_experts=4',
                                           '--config.model.target_active_experts=1.5'],
}


def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 128, 4, 1, 512
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 32
  m.num_experts, m.top_k, m.expert_ffn_dim, m.num_shared_experts = 16, 2, 128, 1
  c.train.steps, c.train.batch_size, c.train.seq_len = 250, 16, 128
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 10, 50, 4
  c.train.alert_maxvio = 0.0        # the unbalanced variants would alert every window
  c.optim.lr, c.optim.warmup_steps = 3e-3, 25
  c.checkpoint.every = 1000
  return c
