"""The `make train` run: a DeepSeek-style MoE on the embedded Shakespeare corpus, ~5 min on 2 CPU cores."""
from moejax.configs import base_config


def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 128, 4, 1, 512
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 4, 2, 32
  m.num_experts, m.top_k, m.expert_ffn_dim, m.num_shared_experts = 16, 2, 128, 1
  c.train.steps, c.train.batch_size, c.train.seq_len = 600, 16, 128
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 100, 4
  c.optim.lr, c.optim.warmup_steps = 3e-3, 50
  c.checkpoint.every = 200
  return c
