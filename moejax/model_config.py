"""The model's typed config: one frozen, self-checking dataclass per component, built once from
`config.model` (`ModelConfig.from_config`) and passed to the code that uses it; kernels see only
their own component (attention: `AttentionConfig`, routing: `RouterConfig`, expert dispatch:
`DispatchConfig`), never the whole ConfigDict."""
from dataclasses import dataclass

import jax

from moejax import precision
from moejax.attention import check_pattern, pattern_names
from moejax.attention.config import AttentionConfig
from moejax.blocks import BLOCKS
from moejax.errors import check, non_negative, one_of, positive_int
from moejax.moe import DispatchConfig
from moejax.router import RouterConfig

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class LossConfig:
  """`model.loss`: the auxiliary losses' weights (the LM loss is always on)."""
  balance_weight: float = 0.0
  balance_scope: str = 'sequence'    # also read by the router (RouterConfig.balance_scope)
  balance_gnr_target: float = 0.0
  z_weight: float = 0.0
  hidden_z_weight: float = 0.0

  def __post_init__(self):
    for name in ('balance_weight', 'balance_gnr_target', 'z_weight', 'hidden_z_weight'):
      non_negative(getattr(self, name), f'model.loss.{name}')


MTP_SCHEDULES = ('constant', 'linear', 'step')


@dataclass(frozen=True)
class MTPConfig:
  """`model.mtp`: multi-token prediction (DeepSeek-V3, arXiv 2412.19437 sec. 2.2), moejax.mtp.
  The loss weight follows `schedule` from `loss_weight` to `final_weight`: 'linear' over training,
  'step' (DeepSeek-V3: 0.3, then 0.1) switching at `switch_frac` of train.steps."""
  depth: int = 0                 # D sequential modules; 0 = off
  loss_weight: float = 0.3       # lambda at step 0
  schedule: str = 'constant'
  final_weight: float = 0.1
  switch_frac: float = 0.7

  def __post_init__(self):
    check(isinstance(self.depth, int) and not isinstance(self.depth, bool) and self.depth >= 0,
          'model.mtp.depth', f'must be an integer >= 0 (0 = off), got {self.depth!r}')
    non_negative(self.loss_weight, 'model.mtp.loss_weight')
    non_negative(self.final_weight, 'model.mtp.final_weight')
    one_of(self.schedule, MTP_SCHEDULES, 'model.mtp.schedule')
    check(isinstance(self.switch_frac, (int, float)) and 0 < self.switch_frac <= 1, 'model.mtp.switch_frac',
          f'must be in (0, 1], got {self.switch_frac!r}')

  @classmethod
  def from_config(cls, m) -> 'MTPConfig':
    return cls(**m) if m is not None else cls()


@dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_dense_layers: int
  dense_ffn_dim: int
  attention: str
  num_experts: int
  top_k: int
  expert_ffn_dim: int
  num_shared_experts: int
  block: str
  tie_embeddings: bool
  init_std: float
  base_width: int
  variance_alignment: bool
  norm_eps: float
  scan_unroll: int
  remat: str
  precision: str
  document_mask: bool
  attn: AttentionConfig
  router: RouterConfig
  dispatch: DispatchConfig
  loss: LossConfig
  shared_expert_ffn_dim: int = 0   # the shared experts' fused SwiGLU width; 0 = num_shared * expert_ffn_dim
  shared_expert_gate: bool = False  # Qwen2-MoE: shared output times sigmoid(x . w_gate)
  dense_layers: str = ''           # comma list of layer indices with a dense FFN, besides the first k
  mtp: MTPConfig = MTPConfig()

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'dense_ffn_dim', 'expert_ffn_dim'):
      positive_int(getattr(self, name), f'model.{name}')
    check(0 <= self.num_dense_layers <= self.num_layers, 'model.num_dense_layers',
          f'{self.num_dense_layers} must be between 0 and model.num_layers ({self.num_layers})')
    check(self.num_shared_experts >= 0, 'model.num_shared_experts', 'must be >= 0')
    check(isinstance(self.shared_expert_ffn_dim, int) and self.shared_expert_ffn_dim >= 0,
          'model.shared_expert_ffn_dim', f'must be an integer >= 0 (0 = num_shared_experts x expert_ffn_dim)')
    check(not self.shared_expert_gate or self.num_shared_experts, 'model.shared_expert_gate',
          'needs model.num_shared_experts > 0')
    check(isinstance(self.dense_layers, str), 'model.dense_layers', 'must be a comma list of layer indices')
    idx = [p.strip() for p in self.dense_layers.split(',') if p.strip()]
    check(all(p.isdigit() and int(p) < self.num_layers for p in idx), 'model.dense_layers',
          f'{self.dense_layers!r}: every entry must be a layer index in [0, {self.num_layers})')
    check_pattern(self.attention, self.attn)
    one_of(self.block, BLOCKS, 'model.block')
    one_of(self.remat, REMAT_POLICIES, 'model.remat')
    one_of(self.precision, precision.POLICIES, 'model.precision')
    check(isinstance(self.base_width, int) and self.base_width >= 0, 'model.base_width',
          f'must be an integer >= 0 (0 = off), got {self.base_width!r}')

  @property
  def layer_attentions(self) -> tuple[str, ...]:
    """The attention type of every layer (dense blocks first)."""
    return pattern_names(self.attention, self.num_layers)

  @property
  def shared_ffn_dim(self) -> int:
    return self.shared_expert_ffn_dim or self.num_shared_experts * self.expert_ffn_dim

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The FFN kind of every layer: 'dense' for the first num_dense_layers and those in dense_layers."""
    listed = {int(p) for p in self.dense_layers.split(',') if p.strip()}
    return tuple('dense' if i < self.num_dense_layers or i in listed else 'moe' for i in range(self.num_layers))

  @property
  def num_moe_layers(self) -> int:
    return self.layer_kinds.count('moe')

  @property
  def mtp_moe_layers(self) -> int:
    """MoE blocks among the MTP modules (each module's block is of the last layer's kind)."""
    return self.mtp.depth if self.layer_kinds[-1] == 'moe' else 0

  @classmethod
  def from_config(cls, m) -> 'ModelConfig':
    """Checks every field of `config.model` (ConfigError naming the key) and builds the dataclasses."""
    check(isinstance(m.attention, str), 'model.attention', f'must be a name or a comma pattern, got {m.attention!r}')
    positive_int(m.d_model, 'model.d_model')
    positive_int(m.num_layers, 'model.num_layers')
    return cls(
        vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
        num_dense_layers=m.num_dense_layers, dense_ffn_dim=m.dense_ffn_dim, attention=m.attention,
        num_experts=m.num_experts, top_k=m.top_k, expert_ffn_dim=m.expert_ffn_dim,
        num_shared_experts=m.num_shared_experts, block=m.block, tie_embeddings=m.tie_embeddings,
        init_std=m.init_std, base_width=m.base_width, variance_alignment=m.variance_alignment,
        norm_eps=m.norm_eps, scan_unroll=m.scan_unroll, remat=m.remat, precision=m.precision,
        document_mask=m.attn.document_mask, attn=AttentionConfig.from_config(m),
        router=RouterConfig.from_config(m), dispatch=DispatchConfig.from_config(m),
        loss=LossConfig(**m.loss), shared_expert_ffn_dim=m.get('shared_expert_ffn_dim', 0),
        shared_expert_gate=m.get('shared_expert_gate', False), dense_layers=m.get('dense_layers', ''),
        mtp=MTPConfig.from_config(m.get('mtp')))
