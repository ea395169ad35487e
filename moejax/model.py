"""The decoder: embedding -> dense blocks -> MoE blocks -> norm -> head, as pure functions of the
params and a `ModelConfig` (moejax.model_config).

Blocks of each kind are stacked along a leading 'layers' axis and run with `lax.scan`, so compile
time does not grow with depth. With a per-layer attention pattern (moejax.attention), each kind's
blocks are scanned over the pattern's repeating unit: their params are a list with one stack per
position in the unit (a plain stack when every block of the kind has the same attention), and the
layers past the last whole unit run after the scan (`scan_layers`, shared with moejax.decode).
Block bodies come from the block table (moejax.blocks); with `model.mtp.depth` the loss adds the
multi-token prediction modules (moejax.mtp), which run the same block code. Axis letters: B batch, T sequence,
D model, V vocab, E experts, L layers, F FFN, H heads.
"""
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import diagnostics as diagnostics_lib, moe, mtp, precision, router, transfer
from moejax.attention import ATTENTIONS, repeating_unit
from moejax.blocks import block_layout
from moejax.layers import cross_entropy, dense, rms_norm, swiglu
from moejax.model_config import REMAT_POLICIES, ModelConfig  # noqa: F401
from moejax.params import ParamSpec, stacked
from moejax.sharding import BATCH_AXES

# Parameters that stay float32 whatever the compute dtype (norm scales and the router).
FLOAT32_PARAMS = ('norm', 'router')


@functools.partial(jax.tree_util.register_dataclass, data_fields=(
    'load_E', 'balance_loss', 'z_loss', 'dropped', 'router_stats', 'router_grads', 'bias_target',
    'health'), meta_fields=())
@dataclass
class MoEAux:
  """What an MoE layer returns besides its output (stacked [L, ...] over layers by the scan)."""
  load_E: Any              # assignments per routed expert (real, then zero-computation)
  balance_loss: Any
  z_loss: Any
  dropped: Any             # assignments the dispatch dropped (capacity dispatches only)
  router_stats: Any = None  # diagnostics only: {entropy, margins, real experts per token}
  router_grads: Any = None  # diagnostics only: {balance[, z]}: d loss / d router, unit weight
  bias_target: Any = None  # quantile / threshold controllers only: the bias this batch asks for
  health: Any = None       # diagnostics only: {router_x (the router's input), expert_out_norm}


@functools.partial(jax.tree_util.register_dataclass, data_fields=(
    'resid_max', 'attn_logit_max', 'hidden_z_loss'), meta_fields=())
@dataclass
class BlockAux:
  """Per block (stacked over all layers, dense first)."""
  resid_max: Any           # max |residual| after the block
  attn_logit_max: Any      # [heads] largest attention logit of the block's attentions (NaN: none)
  hidden_z_loss: Any = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=('lm_loss', 'moe', 'blocks', 'mtp'),
                   meta_fields=())
@dataclass
class Aux:
  lm_loss: Any
  moe: MoEAux | None       # None without MoE layers
  blocks: BlockAux
  mtp: Any = None          # moejax.mtp.MTPAux with model.mtp.depth > 0


# ----------------------------------------------------------------------------- parameters

def swiglu_specs(d_model: int, ffn_dim: int, cfg: ModelConfig, axis: str = 'mlp'):
  s, out = cfg.init_std, cfg.attn.out_std
  return {
      'w_gate': ParamSpec((d_model, ffn_dim), ('embed', axis), scale=s),
      'w_up': ParamSpec((d_model, ffn_dim), ('embed', axis), scale=s),
      'w_down': ParamSpec((ffn_dim, d_model), (axis, 'embed'), scale=out),
  }


def moe_specs(cfg: ModelConfig):
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  s, out = cfg.init_std, cfg.attn.out_std
  specs = {
      'router': ParamSpec((D, cfg.router.num_routed), ('embed', None), scale=s),
      'w_gate': ParamSpec((E, D, F), ('expert', 'embed', 'expert_mlp'), scale=s),
      'w_up': ParamSpec((E, D, F), ('expert', 'embed', 'expert_mlp'), scale=s),
      'w_down': ParamSpec((E, F, D), ('expert', 'expert_mlp', 'embed'), scale=out),
  }
  if cfg.num_shared_experts:
    specs['shared'] = swiglu_specs(D, cfg.shared_ffn_dim, cfg)
  if cfg.shared_expert_gate:
    specs['shared_gate'] = ParamSpec((D,), ('embed',), scale=s)
  return specs


def block_specs(cfg: ModelConfig, ffn: str, attention: str):
  """One block: its layout's attentions and dense MLPs (each with a pre-norm) and its FFN."""
  D, layout = cfg.d_model, block_layout(cfg, ffn)
  norm = ParamSpec((D,), ('embed',), init='ones')
  specs = {'ffn_norm': norm,
           'ffn': swiglu_specs(D, cfg.dense_ffn_dim, cfg) if ffn == 'dense' else moe_specs(cfg)}
  for key in layout.attentions:
    specs.update({f'{key}_norm': norm, key: ATTENTIONS[attention].specs(cfg.attn)})
  for key in layout.mlps:
    specs.update({f'{key}_norm': norm, key: swiglu_specs(D, cfg.dense_ffn_dim, cfg)})
  return specs


def kind_attentions(cfg: ModelConfig, ffn: str) -> tuple[str, ...]:
  """The attention type of each block of one FFN kind, in layer order."""
  return tuple(a for a, k in zip(cfg.layer_attentions, cfg.layer_kinds) if k == ffn)


@dataclass(frozen=True)
class Group:
  """One scan stack: the layers at one position of a segment's repeating (attention, kind) unit."""
  segment: int
  position: int
  attention: str
  kind: str
  layers: tuple[int, ...]        # layer indices, in order
  kind_index: tuple[int, ...]    # their indices among the layers of their kind


def segments(cfg: ModelConfig) -> list[range]:
  """The leading dense layers, then the rest (each scanned over its own repeating unit)."""
  kinds = cfg.layer_kinds
  k = next((i for i, kind in enumerate(kinds) if kind != 'dense'), len(kinds))
  return [r for r in (range(0, k), range(k, len(kinds))) if len(r)]


def groups(cfg: ModelConfig) -> tuple[Group, ...]:
  """Every scan stack, segment by segment and position by position."""
  pairs = list(zip(cfg.layer_attentions, cfg.layer_kinds))
  kind_index = [sum(1 for _, k in pairs[:i] if k == pairs[i][1]) for i in range(len(pairs))]
  out = []
  for s, seg in enumerate(segments(cfg)):
    unit = repeating_unit(pairs[seg.start:seg.stop])
    for j, (attention, kind) in enumerate(unit):
      layers = tuple(seg[j::len(unit)])
      out.append(Group(s, j, attention, kind, layers, tuple(kind_index[i] for i in layers)))
  return tuple(out)


def kind_groups(cfg: ModelConfig, ffn: str) -> tuple[Group, ...]:
  return tuple(g for g in groups(cfg) if g.kind == ffn)


def model_specs(cfg: ModelConfig):
  D, V = cfg.d_model, cfg.vocab_size
  specs = {'embed': ParamSpec((V, D), ('vocab', 'embed'), scale=1.0),
           'final_norm': ParamSpec((D,), ('embed',), init='ones')}
  if cfg.num_moe_layers < cfg.num_layers:
    specs['dense_blocks'] = group_specs(cfg, 'dense')
  if cfg.num_moe_layers:
    specs['moe_blocks'] = group_specs(cfg, 'moe')
  if not cfg.tie_embeddings:
    specs['head'] = ParamSpec((D, V), ('embed', 'vocab'), scale=D ** -0.5)
  if cfg.mtp.depth:
    specs['mtp_blocks'] = mtp.mtp_specs(cfg, block_specs(cfg, cfg.layer_kinds[-1], cfg.layer_attentions[-1]))
  return specs


def group_specs(cfg: ModelConfig, ffn: str):
  """Blocks of one FFN kind: one stack per scan group of that kind."""
  return kind_layout([stacked(block_specs(cfg, ffn, g.attention), len(g.layers)) for g in kind_groups(cfg, ffn)])


# A kind's blocks are stored as one stack when it has one scan group (e.g. every block of the kind
# has the same attention), else as a list of stacks; these two are the only places that know it
# (a single stack keeps the parameter paths, hence the initialisation, of uniform models).

def kind_stacks(stacks, cfg: ModelConfig, ffn: str) -> tuple:
  """A kind's params (or anything shaped like them) as one stack per group of the kind."""
  return (stacks,) if len(kind_groups(cfg, ffn)) == 1 else tuple(stacks)


def kind_layout(per_group):
  """The inverse of kind_stacks: one stack per group -> the kind's stored layout."""
  per_group = list(per_group)
  return per_group[0] if len(per_group) == 1 else per_group


def moe_layer_leaf(moe_blocks, path: tuple, cfg: ModelConfig):
  """One leaf of every MoE layer (params or grads), stacked in MoE-layer order [L, ...], whatever
  the scan groups."""
  stacks = kind_stacks(moe_blocks, cfg, 'moe')
  leaves = [functools.reduce(lambda t, k: t[k], path, s) for s in stacks]
  return reorder(leaves, [g.kind_index for g in kind_groups(cfg, 'moe')])


# ----------------------------------------------------------------------------- the layer scan

def reorder(per_group: list, indices: list):
  """Outputs [n_g, ...] per group, whose rows are items `indices[g]` -> [n, ...] in item order."""
  if len(per_group) == 1:
    return per_group[0]
  perm = np.argsort(np.concatenate([np.asarray(i) for i in indices]), kind='stable')
  return jax.tree.map(lambda *o: jnp.concatenate(o)[perm], *per_group)


def rows(a, index: tuple):
  """Rows `index` (an arithmetic progression) of a stacked array, as a slice."""
  step = index[1] - index[0] if len(index) > 1 else 1
  return a[index[0]:index[-1] + 1:step]


def run_layers(cfg: ModelConfig, block, x, xs_by_kind: dict, unroll=1):
  """Runs block(group, x, xs) -> (x, out) over every layer in order: each segment's repeating unit
  scanned over its whole repetitions, then its remaining layers. `xs_by_kind[kind]` holds, per
  group of that kind, the stacked inputs of its layers (params, router bias, caches...). Returns
  x and {kind: per-group outputs stacked like the inputs}."""
  outs = {k: [None] * len(kind_groups(cfg, k)) for k in ('dense', 'moe')}
  slot = {}
  for g in groups(cfg):
    slot[g] = sum(1 for h in groups(cfg) if h.kind == g.kind and (h.segment, h.position) < (g.segment, g.position))
  for s in range(len(segments(cfg))):
    unit = [g for g in groups(cfg) if g.segment == s]
    xs_unit = tuple(xs_by_kind[g.kind][slot[g]] for g in unit)
    x, seg_outs = scan_layers(block, x, xs_unit, unit, sum(len(g.layers) for g in unit), unroll)
    for g, o in zip(unit, seg_outs):
      outs[g.kind][slot[g]] = o
  return x, {k: v for k, v in outs.items() if v}


def scan_layers(block, x, xs_per_position: tuple, unit, n: int, unroll=1):
  """Runs block(unit[j], x, xs_j) over n layers, layer i at unit position i % U: the unit scanned
  over its whole repetitions, then the remaining layers."""
  U = len(unit)
  reps = n // U

  def unit_step(x, xs_unit):
    outs = []
    for g, xs_j in zip(unit, xs_unit):
      x, out = block(g, x, xs_j)
      outs.append(out)
    return x, outs

  x, outs = jax.lax.scan(unit_step, x, jax.tree.map(lambda a: a[:reps], xs_per_position),
                         unroll=unroll)
  for j in range(n - reps * U):   # layers past the last whole unit: index `reps` of position j
    x, out = block(unit[j], x, jax.tree.map(lambda a: a[reps], xs_per_position[j]))
    outs[j] = jax.tree.map(lambda o, t: jnp.concatenate([o, t[None]]), outs[j], out)
  return x, outs


class BlockOps:
  """The operations a block body runs on (moejax.blocks), for one block's params `p`.

  `attend(key, x)` calls `attention(key, p[key], rms_norm(x, p[key + '_norm']))`, which returns
  (y, extra); the extras (logit maxima, decode caches) are kept per key in `self.extras`."""

  def __init__(self, p, norm_eps: float, attention, mlp_einsum, ffn):
    self.p, self.eps, self.attention, self.mlp_einsum, self._ffn = p, norm_eps, attention, mlp_einsum, ffn
    self.extras = {}

  def norm(self, key: str, x):
    return rms_norm(x, self.p[f'{key}_norm'], self.eps)

  def attend(self, key: str, x):
    y, self.extras[key] = self.attention(key, self.p[key], self.norm(key, x))
    return y

  def mlp(self, key: str, x):
    return swiglu(self.p[key], self.norm(key, x), self.mlp_einsum)

  def ffn(self, x):
    return self._ffn(self.p['ffn'], self.norm('ffn', x))


# ----------------------------------------------------------------------------- the MoE layer

def router_grads(x_TD, router_DE, bias_E, cfg: ModelConfig, seq_len: int) -> dict:
  """Direct gradients of this layer's balance loss and z-loss (unit weight) w.r.t. its router,
  for the gradient-norm ratio; inputs are held fixed, so nothing flows back from here."""
  x_TD, router_DE = jax.lax.stop_gradient(x_TD), jax.lax.stop_gradient(router_DE)
  loss = lambda name: lambda w: getattr(router.route(x_TD, w, bias_E, cfg.router, seq_len), name)
  grads = {'balance': jax.grad(loss('balance_loss'))(router_DE)}
  if cfg.loss.z_weight:
    grads['z'] = jax.grad(loss('z_loss'))(router_DE)
  return grads


def moe_ffn(p, bias_E, x_BTD, cfg: ModelConfig, mesh, batch_axes, diagnostics: bool = False):
  """Routed (+ zero-computation) + shared experts. Returns y_BTD and this layer's MoEAux; router
  statistics and gradients only with `diagnostics` (log steps, or an adapting balance weight)."""
  B, T, D = x_BTD.shape
  x_TD = x_BTD.reshape(B * T, D)
  routing = router.route(x_TD, p['router'], bias_E, cfg.router, seq_len=T)
  y_TD, dropped = moe.routed_experts(x_TD, routing, p['w_gate'], p['w_up'], p['w_down'], cfg.dispatch,
                                     mesh, batch_axes)
  y_TD = y_TD * routed_variance_scale(cfg)
  if cfg.router.num_zero_experts and cfg.router.zero_expert_kind == 'identity':
    # identity experts: the token itself, weighted, at no expert FLOPs (null experts add nothing)
    zero_weight_T = jnp.sum(jnp.where(routing.expert_TK >= cfg.num_experts, routing.weight_TK, 0.0), -1)
    y_TD = y_TD + x_TD * zero_weight_T[:, None].astype(x_TD.dtype)
  y_BTD = y_TD.reshape(B, T, D)
  if 'shared' in p:
    shared_BTD = swiglu(p['shared'], x_BTD, precision.einsum_for(precision.fp8_mlp(cfg)))
    if 'shared_gate' in p:   # Qwen2-MoE: a per-token sigmoid gate on the shared experts
      shared_BTD = shared_BTD * jax.nn.sigmoid(x_BTD @ p['shared_gate'].astype(x_BTD.dtype))[..., None]
    y_BTD = y_BTD + shared_BTD
  aux = MoEAux(routing.load_E, routing.balance_loss, routing.z_loss, dropped)
  if diagnostics:
    aux.router_stats = router.routing_stats(routing, cfg.router)   # the scores this layer routed by
    aux.router_grads = router_grads(x_TD, p['router'], bias_E, cfg, T)
    aux.health = {'router_x': x_TD, 'expert_out_norm': diagnostics_lib.expert_output_norm(
        x_TD, routing.expert_TK, p['w_gate'], p['w_up'], p['w_down'])}
  if cfg.router.needs_bias_target:
    aux.bias_target = router.bias_target(routing, bias_E, cfg.router)
  return y_BTD, aux


def routed_variance_scale(cfg: ModelConfig) -> float:
  """Variance alignment (LongCat-Flash sec. 2.3, 'variance compensation'): with top-k weights
  normalised to sum to 1, K independent experts' outputs average, so the routed output's variance
  at init falls as 1/K while each expert's falls with its width F. Scaling by K (by 2 for
  unnormalised sigmoid weights ~0.5) keeps it at that of a dense SwiGLU of width K*F, whatever the
  granularity at fixed active parameters."""
  if not cfg.variance_alignment:
    return 1.0
  return float(cfg.top_k) if cfg.router.norm_topk else 2.0


def hidden_z_loss(x_BTD):
  """LongCat-Flash's hidden z-loss: mean over tokens of log(sum_i exp|h_i|)^2 (curbs massive
  activations in the residual stream)."""
  return jnp.mean(jax.nn.logsumexp(jnp.abs(x_BTD.astype(jnp.float32)), axis=-1) ** 2)


# ----------------------------------------------------------------------------- forward and loss

def cast_params(params, cfg: ModelConfig):
  """Every parameter in the compute dtype, except FLOAT32_PARAMS."""
  dtype = precision.compute_dtype(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, w: w if any(n in jax.tree_util.keystr(path) for n in FLOAT32_PARAMS)
      else w.astype(dtype), params)


def logits_from(params, x_BTD, cfg: ModelConfig):
  x_BTD = rms_norm(x_BTD, params['final_norm'], cfg.norm_eps)
  head_DV = params['embed'].T if cfg.tie_embeddings else params['head']
  logits = dense(x_BTD, head_DV).astype(jnp.float32)
  if transfer.enabled(cfg):   # muP's output multiplier 1/m
    logits = logits * transfer.output_multiplier(cfg)
  return logits


def block_functions(cfg: ModelConfig, mesh, batch_axes, segment_ids_BT=None, diagnostics: bool = False):
  """(dense_block, moe_block): one block of each FFN kind, `(attention, x_BTD, xs) -> (x_BTD, aux)`
  with xs its params (dense) or (params, router bias_E) (MoE) and aux BlockAux or (MoEAux, BlockAux);
  rematerialised per `cfg.remat`. The decoder's layers and the MTP modules (moejax.mtp) run these."""
  act = NamedSharding(mesh, P(batch_axes))
  policy = REMAT_POLICIES[cfg.remat]
  mlp_einsum = precision.einsum_for(precision.fp8_mlp(cfg))
  segments = segment_ids_BT if cfg.document_mask else None

  def run_block(ffn_kind, ffn, attention, x_BTD, p):
    x_BTD = jax.lax.with_sharding_constraint(x_BTD, act)
    attend = lambda key, p_attn, h: ATTENTIONS[attention].apply(p_attn, h, cfg.attn, segments)
    ops = BlockOps(p, cfg.norm_eps, attend, mlp_einsum, ffn)
    x_BTD = block_layout(cfg, ffn_kind).apply(x_BTD, ops)
    logit_max_H = functools.reduce(jnp.maximum, ops.extras.values())
    aux = BlockAux(jnp.max(jnp.abs(x_BTD)).astype(jnp.float32), logit_max_H,
                   hidden_z_loss(x_BTD) if cfg.loss.hidden_z_weight else None)
    return x_BTD, aux

  def dense_block(attention, x_BTD, p):
    return run_block('dense', lambda p_ffn, h: swiglu(p_ffn, h, mlp_einsum), attention, x_BTD, p)

  def moe_block(attention, x_BTD, p_and_bias):
    p, bias_E = p_and_bias
    moe_aux = []
    def ffn(p_ffn, h):
      y, aux = moe_ffn(p_ffn, bias_E, h, cfg, mesh, batch_axes, diagnostics)
      moe_aux.append(aux)
      return y
    x_BTD, block_aux = run_block('moe', ffn, attention, x_BTD, p)
    return x_BTD, (moe_aux[0], block_aux)

  if policy is not None:
    dense_block = jax.checkpoint(dense_block, policy=policy, static_argnums=(0,))
    moe_block = jax.checkpoint(moe_block, policy=policy, static_argnums=(0,))
  return dense_block, moe_block


def embed_tokens(params, tokens_BT, mesh, batch_axes):
  """Looks up whole rows (gathers the table over fsdp first, ZeRO-3 style): rows split over D would
  leave activations split over D, which the compiler can re-split over the batch only by
  replicating them."""
  embed_VD = jax.lax.with_sharding_constraint(params['embed'], NamedSharding(mesh, P(P.UNCONSTRAINED, None)))
  return jax.lax.with_sharding_constraint(embed_VD[tokens_BT], NamedSharding(mesh, P(batch_axes)))


def decoder(params, router_bias_LE, tokens_BT, cfg: ModelConfig, mesh, batch_axes, blocks):
  """Embedding and every layer (`params` in the compute dtype, `blocks` from block_functions).
  Returns the last block's output x_BTD (before the final norm) and (MoEAux stacked over MoE layers
  or None, BlockAux stacked over all layers)."""
  dense_block, moe_block = blocks
  x_BTD = embed_tokens(params, tokens_BT, mesh, batch_axes)
  xs_by_kind = {}
  if 'dense_blocks' in params:
    xs_by_kind['dense'] = kind_stacks(params['dense_blocks'], cfg, 'dense')
  if 'moe_blocks' in params:
    xs_by_kind['moe'] = tuple(zip(kind_stacks(params['moe_blocks'], cfg, 'moe'),
                                  (rows(router_bias_LE, g.kind_index) for g in kind_groups(cfg, 'moe'))))
  block = lambda g, x, xs: dense_block(g.attention, x, xs) if g.kind == 'dense' else moe_block(g.attention, x, xs)
  x_BTD, outs = run_layers(cfg, block, x_BTD, xs_by_kind, cfg.scan_unroll)
  moe_aux, per_group = None, []
  if 'moe' in outs:
    moe_aux = reorder([o[0] for o in outs['moe']], [g.kind_index for g in kind_groups(cfg, 'moe')])
  for kind in ('dense', 'moe'):
    if kind in outs:
      per_group += [(o[1] if kind == 'moe' else o, g.layers) for o, g in zip(outs[kind], kind_groups(cfg, kind))]
  block_aux = reorder([o for o, _ in per_group], [l for _, l in per_group])
  return x_BTD, (moe_aux, block_aux)


def forward(params, router_bias_LE, tokens_BT, cfg: ModelConfig, mesh, batch_axes=BATCH_AXES,
            segment_ids_BT=None, diagnostics: bool = False):
  """Returns logits_BTV (float32) and (MoEAux stacked over MoE layers or None, BlockAux stacked over
  all layers). With `cfg.document_mask`, attention stays within `segment_ids_BT`'s documents.

  Activations between blocks are split over `batch_axes` (those the mesh has) and whole over the
  rest; weights are used as sharded and the compiler gathers them (fsdp) or splits the matmuls
  (tensor)."""
  params = cast_params(params, cfg)
  batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  blocks = block_functions(cfg, mesh, batch_axes, segment_ids_BT, diagnostics)
  x_BTD, aux = decoder(params, router_bias_LE, tokens_BT, cfg, mesh, batch_axes, blocks)
  return logits_from(params, x_BTD, cfg), aux


def mtp_aux(params, x_BTD, batch, mtp_bias_KE, cfg: ModelConfig, mesh, batch_axes):
  """The MTP modules' losses and auxiliaries (moejax.mtp) on the decoder's output x_BTD; their
  blocks are the last layer's kind and attention, without diagnostics."""
  dense_block, moe_block = block_functions(cfg, mesh, batch_axes, batch.get('segment_ids'))
  attention, kind = cfg.layer_attentions[-1], cfg.layer_kinds[-1]

  def run_block(x_BTD, p, bias_E):
    if kind == 'dense':
      x_BTD, blocks = dense_block(attention, x_BTD, p)
      return x_BTD, None, blocks
    x_BTD, (moe, blocks) = moe_block(attention, x_BTD, (p, bias_E))
    return x_BTD, moe, blocks

  if kind == 'moe' and mtp_bias_KE is None:
    mtp_bias_KE = jnp.zeros((cfg.mtp.depth, cfg.router.num_routed), jnp.float32)
  return mtp.mtp_losses(params, x_BTD, batch, mtp_bias_KE, cfg,
                        lambda tokens_BT: embed_tokens(params, tokens_BT, mesh, batch_axes), run_block,
                        lambda h_BTD, norm_D: logits_from({**params, 'final_norm': norm_D}, h_BTD, cfg))


def loss_fn(params, router_bias_LE, batch, cfg: ModelConfig, mesh, balance_coef_L=None,
            batch_axes=BATCH_AXES, diagnostics: bool = False, mtp_weight=None, mtp_bias_KE=None):
  """Mean next-token cross-entropy over unmasked targets, plus the weighted auxiliary losses and,
  with `cfg.mtp.depth`, the MTP loss (moejax.mtp). Returns (loss, Aux).

  `balance_coef_L` (per MoE layer) replaces `loss.balance_weight` when the coefficient adapts;
  `mtp_weight` (lambda at this step) replaces `mtp.loss_weight`; `mtp_bias_KE`: the MTP MoE blocks'
  router bias (zeros when None)."""
  params = cast_params(params, cfg)
  batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  blocks = block_functions(cfg, mesh, batch_axes, batch.get('segment_ids'), diagnostics)
  x_BTD, (moe_aux, block_aux) = decoder(params, router_bias_LE, batch['inputs'], cfg, mesh, batch_axes, blocks)
  lm_loss = cross_entropy(logits_from(params, x_BTD, cfg), batch['targets'], batch['loss_mask'])
  loss = lm_loss
  if moe_aux is not None:
    coef_L = cfg.loss.balance_weight if balance_coef_L is None else balance_coef_L
    loss = loss + jnp.mean(coef_L * moe_aux.balance_loss)
    loss = loss + cfg.loss.z_weight * moe_aux.z_loss.mean()
  if cfg.loss.hidden_z_weight:
    loss = loss + cfg.loss.hidden_z_weight * block_aux.hidden_z_loss.mean()
  extra = None
  if cfg.mtp.depth:
    extra = mtp_aux(params, x_BTD, batch, mtp_bias_KE, cfg, mesh, batch_axes)
    loss = loss + (cfg.mtp.loss_weight if mtp_weight is None else mtp_weight) * jnp.mean(extra.loss_K)
    if extra.moe is not None:
      loss = loss + cfg.loss.balance_weight * extra.moe.balance_loss.mean()
      loss = loss + cfg.loss.z_weight * extra.moe.z_loss.mean()
  return loss, Aux(lm_loss, moe_aux, block_aux, extra)
