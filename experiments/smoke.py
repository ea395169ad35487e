"""A tiny MoE that trains in seconds on CPU (used by the tests and acceptance checks)."""
from moejax.configs import base_config


def get_config():
  c = base_config()
  c.data.raw = 'tests/fixtures/shakespeare_sample'   # three plays, committed: no fetch needed
  c.data.dir = 'data/smoke/prepared'
  c.data.variant_policy = 'cycle'   # the fixture has modern + folio editions of each play
  m = c.model
  m.vocab_size = 1024
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 64, 3, 1, 128
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 4, 2, 16
  m.num_experts, m.top_k, m.expert_ffn_dim = 8, 2, 32
  c.train.steps, c.train.batch_size, c.train.seq_len = 20, 8, 64
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 5, 10, 2
  c.optim.warmup_steps = 5
  c.optim.decay_steps = 200   # fixed, so a run resumed with more --config.train.steps keeps its schedule
  c.checkpoint.every = 10
  return c
