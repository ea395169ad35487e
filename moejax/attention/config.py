"""What the attention layers depend on: frozen dataclasses built once from `config.model`, each
checking its own fields (one-line ConfigError naming the config key)."""
from dataclasses import dataclass

from moejax.errors import check, non_negative, positive_int


@dataclass(frozen=True)
class MLAConfig:
  """`model.mla`: DeepSeek-V2/V3 multi-head latent attention shapes."""
  q_lora_rank: int = 0         # 0 = full-rank query projection
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 32
  v_head_dim: int = 64

  def __post_init__(self):
    for name in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
      positive_int(getattr(self, name), f'model.mla.{name}')
    check(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0, 'model.mla.q_lora_rank',
          f'must be an integer >= 0 (0 = full rank), got {self.q_lora_rank!r}')
    check(self.qk_rope_head_dim % 2 == 0, 'model.mla.qk_rope_head_dim', 'rotary dims must be even')


@dataclass(frozen=True)
class NSAConfig:
  """`model.nsa`: native sparse attention's compressed and selected blocks."""
  block: int = 16
  stride: int = 8
  select_block: int = 16
  num_selected: int = 4

  def __post_init__(self):
    for name in ('block', 'stride', 'select_block'):
      positive_int(getattr(self, name), f'model.nsa.{name}')
    check(isinstance(self.num_selected, int) and self.num_selected >= 2, 'model.nsa.num_selected',
          f'must be an integer >= 2 (the first and the local block are always selected), '
          f'got {self.num_selected!r}')


@dataclass(frozen=True)
class KDAConfig:
  """`model.kda`: Kimi delta attention's chunk length and short-convolution width."""
  chunk: int = 16
  conv: int = 4

  def __post_init__(self):
    positive_int(self.chunk, 'model.kda.chunk')
    positive_int(self.conv, 'model.kda.conv')


@dataclass(frozen=True)
class AttentionConfig:
  """`model.attn` plus the model facts every attention layer needs (width, depth for the output
  init scale, init std, norm eps, variance alignment for MLA's latents)."""
  d_model: int
  num_layers: int
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  qk_norm: bool = False
  softcap: float = 0.0
  sinks: bool = False
  window: int = 32
  init_std: float = 0.02
  norm_eps: float = 1e-6
  variance_alignment: bool = False
  mla: MLAConfig = MLAConfig()
  nsa: NSAConfig = NSAConfig()
  kda: KDAConfig = KDAConfig()

  def __post_init__(self):
    for name in ('num_heads', 'num_kv_heads', 'head_dim', 'window'):
      positive_int(getattr(self, name), f'model.attn.{name}')
    check(self.d_model % self.num_heads == 0, 'model.d_model',
          f'{self.d_model} is not divisible by model.attn.num_heads ({self.num_heads})')
    check(self.num_heads % self.num_kv_heads == 0, 'model.attn.num_kv_heads',
          f'model.attn.num_heads ({self.num_heads}) is not divisible by {self.num_kv_heads}')
    check(self.head_dim % 2 == 0, 'model.attn.head_dim', 'rotary dims must be even')
    non_negative(self.softcap, 'model.attn.softcap')

  @property
  def out_std(self) -> float:
    """Init std of output projections (scaled down with depth, GPT-2 style)."""
    return self.init_std / (2 * self.num_layers) ** 0.5

  @classmethod
  def from_config(cls, m) -> 'AttentionConfig':
    a = m.attn
    return cls(d_model=m.d_model, num_layers=m.num_layers, num_heads=a.num_heads,
               num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
               qk_norm=a.qk_norm, softcap=a.softcap, sinks=a.sinks, window=a.window,
               init_std=m.init_std, norm_eps=m.norm_eps, variance_alignment=m.variance_alignment,
               mla=MLAConfig(**m.mla), nsa=NSAConfig(**m.nsa), kda=KDAConfig(**m.kda))
