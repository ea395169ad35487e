"""What the attention layers depend on: frozen dataclasses built once from `config.model`, each
checking its own fields (one-line ConfigError naming the config key)."""
from dataclasses import dataclass

from moejax.attention.fused import FUSED, IMPLEMENTATIONS
from moejax.errors import check, non_negative, one_of, positive_int


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


YARN_AND_LAYOUT = ('rope_layout', 'yarn_factor', 'yarn_original_max_len', 'yarn_beta_fast', 'yarn_beta_slow',
                   'yarn_mscale', 'yarn_mscale_all_dim', 'yarn_truncate', 'qk_norm_scope', 'qkv_bias')


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
  rope_layout: str = 'halves'  # 'halves' (rotate-half: Llama, Qwen) or 'pairs' (interleaved: DeepSeek)
  # YaRN (moejax.layers.rope_frequencies), as transformers' rope_type 'yarn'; factor 0 = off
  yarn_factor: float = 0.0
  yarn_original_max_len: int = 0   # the context the model was pretrained at
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 0.0   # > 0: MLA's softmax scale times yarn_mscale(factor, this) ** 2
  yarn_truncate: bool = True
  qk_norm: bool = False
  qk_norm_scope: str = 'head'  # 'head' (RMSNorm per head, Qwen3) or 'projection' (over all heads, OLMoE)
  qkv_bias: bool = False       # biases on the query, key and value projections (Qwen2)
  softcap: float = 0.0
  sinks: bool = False
  window: int = 32
  implementation: str = 'xla'   # softmax types' training forward (moejax.attention.fused.IMPLEMENTATIONS)
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
    one_of(self.implementation, IMPLEMENTATIONS, 'model.attn.implementation')
    check(not (self.sinks and self.implementation in FUSED), 'model.attn.implementation',
          f'{self.implementation!r} has no attention sinks; use xla or auto (auto keeps xla with sinks)')
    check(not (self.softcap and self.implementation == 'dot_product_attention'), 'model.attn.implementation',
          "'dot_product_attention' has no soft cap; use tokamax, xla or auto")
    one_of(self.rope_layout, ('halves', 'pairs'), 'model.attn.rope_layout')
    one_of(self.qk_norm_scope, ('head', 'projection'), 'model.attn.qk_norm_scope')
    check(self.qk_norm_scope == 'head' or self.qk_norm, 'model.attn.qk_norm_scope',
          f'{self.qk_norm_scope!r} needs model.attn.qk_norm = True')
    non_negative(self.yarn_factor, 'model.attn.yarn_factor')
    if self.yarn_factor:
      check(self.yarn_factor >= 1, 'model.attn.yarn_factor', f'{self.yarn_factor} must be >= 1 (0 = off)')
      positive_int(self.yarn_original_max_len, 'model.attn.yarn_original_max_len')
      for name in ('yarn_beta_fast', 'yarn_beta_slow'):   # rotation counts: log(orig / (2 pi beta))
        check(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0, f'model.attn.{name}',
              f'must be > 0, got {getattr(self, name)!r}')
      non_negative(self.yarn_mscale, 'model.attn.yarn_mscale')   # 0 = unset (transformers' None)
      non_negative(self.yarn_mscale_all_dim, 'model.attn.yarn_mscale_all_dim')
      check(isinstance(self.yarn_truncate, bool), 'model.attn.yarn_truncate',
            f'must be True or False, got {self.yarn_truncate!r}')

  @property
  def out_std(self) -> float:
    """Init std of output projections (scaled down with depth, GPT-2 style)."""
    return self.init_std / (2 * self.num_layers) ** 0.5

  @classmethod
  def from_config(cls, m) -> 'AttentionConfig':
    a = m.attn
    return cls(d_model=m.d_model, num_layers=m.num_layers, num_heads=a.num_heads,
               num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
               **{k: a[k] for k in YARN_AND_LAYOUT if k in a},   # absent from older runs' configs
               qk_norm=a.qk_norm, softcap=a.softcap, sinks=a.sinks, window=a.window,
               implementation=a.get('implementation', 'xla'),   # absent from older runs' configs
               init_std=m.init_std, norm_eps=m.norm_eps, variance_alignment=m.variance_alignment,
               mla=MLAConfig(**m.mla), nsa=NSAConfig(**m.nsa), kda=KDAConfig(**m.kda))
