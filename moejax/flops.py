"""Model FLOPs per token (active parameters only) and per-device peak FLOP/s, for MFU."""
import os

import jax

from moejax.attention import ATTENTIONS
from moejax.blocks import block_layout

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
  dense_ffn = 2 * 3 * D * cfg.dense_ffn_dim
  routed = cfg.top_k if active_experts_per_token is None else active_experts_per_token
  moe_ffn = 2 * (D * cfg.router.num_routed + 3 * D * (cfg.expert_ffn_dim * routed + cfg.shared_ffn_dim))
  head = 2 * D * cfg.vocab_size

  def block(name, kind):
    layout = block_layout(cfg, kind)   # its attentions and extra dense MLPs (moejax.blocks)
    return (len(layout.attentions) * ATTENTIONS[name].flops_per_token(cfg.attn, seq_len)
            + len(layout.mlps) * dense_ffn + (dense_ffn if kind == 'dense' else moe_ffn))

  total = head + sum(block(name, kind) for name, kind in zip(cfg.layer_attentions, cfg.layer_kinds))
  # each MTP module (moejax.mtp): its 2D -> D projection, one block of the last layer's kind, the head
  mtp_module = 2 * 2 * D * D + block(cfg.layer_attentions[-1], cfg.layer_kinds[-1]) + head
  return total + cfg.mtp.depth * mtp_module


def train_flops_per_token(cfg, seq_len: int, active_experts_per_token: float | None = None) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len, active_experts_per_token)   # forward + backward (2x)
