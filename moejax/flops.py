"""Model FLOPs per token (active parameters only) and per-device peak FLOP/s, for MFU."""
import os

import jax

from moejax.attention import ATTENTIONS, layer_attentions

# Dense bf16 peak per chip (vendor figures); f32 matmuls on these run on the same units or slower.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'B200': 2250e12,
}
# CPU: cores x 3 GHz x 32 f32 FLOP/cycle (two 256-bit FMA pipes): an estimate, override with
# --config.train.peak_flops_per_device for a measured figure.
CPU_FLOPS_PER_CORE = 3e9 * 32


def peak_flops_per_device(override: float = 0.0) -> float:
  if override:
    return override
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / jax.device_count()
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return flops
  return float('nan')


def forward_flops_per_token(cfg, seq_len: int, active_experts_per_token: float | None = None) -> float:
  """2 x active matmul parameters + attention scores. Routed experts count top_k of them, or the
  measured real experts per token when zero-computation experts take some of the top_k."""
  D = cfg.d_model
  attention = sum(ATTENTIONS[a].flops_per_token(cfg, seq_len) for a in layer_attentions(cfg))
  dense_ffn = 2 * 3 * D * cfg.dense_ffn_dim
  routed = cfg.top_k if active_experts_per_token is None else active_experts_per_token
  moe_ffn = 2 * (D * (cfg.num_experts + cfg.num_zero_experts)
                 + 3 * D * cfg.expert_ffn_dim * (routed + cfg.num_shared_experts))
  head = 2 * D * cfg.vocab_size
  num_moe = cfg.num_layers - cfg.num_dense_layers
  names = layer_attentions(cfg)
  if cfg.block == 'scmoe':   # each MoE block also runs a second attention and two dense FFNs
    attention += sum(ATTENTIONS[a].flops_per_token(cfg, seq_len) for a in names[cfg.num_dense_layers:])
    moe_ffn += 2 * dense_ffn
  return attention + cfg.num_dense_layers * dense_ffn + num_moe * moe_ffn + head


def train_flops_per_token(cfg, seq_len: int, active_experts_per_token: float | None = None) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len, active_experts_per_token)   # forward + backward (2x)
