"""A ~1B-total DeepSeek-style MoE (fine-grained routed experts + shared experts), for a 64-chip
v5p-like slice: `python -m moejax.tools.memory` reports its bytes per device (docs/memory.md)."""
from moejax.configs import base_config


def get_config():
  c = base_config()
  m = c.model
  m.vocab_size = 32768
  m.d_model, m.num_layers, m.num_dense_layers, m.dense_ffn_dim = 1024, 18, 1, 2816
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 16, 4, 64
  m.num_experts, m.top_k, m.expert_ffn_dim, m.num_shared_experts = 64, 6, 256, 2
  m.precision, m.remat = 'bf16', 'full'
  c.train.batch_size, c.train.seq_len = 64, 4096   # one 4096-token sequence per device
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 16, 4
  return c
