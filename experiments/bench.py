"""The speed-bar shape: a DeepSeek-style MoE with MLA, timed by `make bench` (f32, CPU, one device).

d_model 256, 4 layers (the first dense, FFN 1024), MLA with 4 heads (qk 32 + 32 rope, v 64, kv latent
64), 16 routed experts of FFN 256 (bench sweeps 64 too), top-2, 1 shared expert, vocab 8192,
batch 8 x 256 tokens, AdamW, dropless dispatch, quantile balancing (the controller with the lowest
steady MaxVio on this shape at 16 and 64 experts: results/balancing_speedbar.md).
"""
from moejax.configs import base_config


def get_config():
  c = base_config()
  c.data.dir = 'data/shakespeare/prepared_8k'
  m = c.model
  m.vocab_size = 8192
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 256, 4, 1, 1024
  m.attention, m.attn.num_heads = 'mla', 4
  m.mla.update(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
  m.num_experts, m.top_k, m.expert_ffn_dim, m.num_shared_experts = 16, 2, 256, 1
  m.dispatch = 'dropless'
  m.router.balancer = 'quantile'
  c.train.steps, c.train.batch_size, c.train.seq_len = 60, 8, 256
  c.train.log_every, c.train.eval_every = 10, 1000
  c.mesh.data = 1
  return c
