"""Expert dispatch: permute -> expert FFN -> unpermute, after routing (moejax/router.py).

Axis letters: T tokens (batch x sequence, flattened), D model, E experts, J experts local to a
device, K top-k, F expert FFN, A = T*K token-to-expert assignments, R dispatch rows, C capacity
(rows) per expert, S devices on the `expert` mesh axis, N blocks of Z rows (the block layout).

One interface, `routed_experts`, with the implementation named by `model.dispatch`:
  - 'dropless' (sort + dense einsums): assignments sorted by expert into [E, C] slots, C chosen at
    run time from a few static sizes as the smallest that holds the busiest expert (`lax.switch`),
    so no token is dropped and work is ~T*K*(1 + MaxVio); under heavy imbalance a block layout (rows
    padded per expert to blocks) bounds the work instead. Its work grows with T*K, not with E, which
    is what XLA:CPU needs (it lowers `ragged_dot` to a dense matmul over every group).
  - 'capacity': C = ceil(capacity_factor * A / E) slots per expert for each device's A assignments
    (GShard); overflow is dropped, in token order, and counted.
  - 'capacity_a2a': the same slots and the same dropped tokens, exchanged with `all_to_all`.
  - 'ragged_dot': dropless grouped matmul, `jax.lax.ragged_dot` over the rows sorted by expert.
  - 'gmm': the same with the Pallas megablox grouped matmul (TPU; interpreted on other backends).
  - 'tokamax': the same with `tokamax.ragged_dot` (Mosaic GPU / Triton, Mosaic TPU; XLA on CPU).
  - 'ragged_a2a': dropless; each device sends every expert owner exactly its rows with
    `jax.lax.ragged_all_to_all` (offsets in moejax/a2a.py), then a grouped matmul. XLA:CPU lacks the
    op, so there the exchange is emulated with a padded `all_to_all` (tests only).
  - 'auto' (the default): cpu -> 'dropless'; gpu -> 'ragged_a2a' when the expert axis has more than
    one device, else 'ragged_dot'; tpu -> 'gmm'.
Expert parallelism for 'dropless', 'capacity', 'ragged_dot', 'gmm' and 'tokamax': tokens are all-gathered over
the `expert` mesh axis, each device runs its local experts on the rows routed to them, and
`psum_scatter` returns each device its tokens' outputs. The `*_a2a` variants move only the rows.
The fp8 policy (moejax.precision) applies to every dispatch: qwix's fp8 einsum for the einsum
dispatches, qwix's fp8 ragged_dot for the grouped ones (moejax.grouped_matmul).
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import a2a, precision
from moejax.grouped_matmul import grouped_matmul
from moejax.errors import check, one_of


@dataclass(frozen=True)
class DispatchConfig:
  """What the expert dispatch depends on: `model.dispatch`, `model.capacity_factor`, the number of
  real experts, and whether the MLP matmuls run in fp8 (`model.precision`)."""
  name: str = 'auto'
  capacity_factor: float = 1.25
  num_experts: int = 16
  fp8: bool = False

  def __post_init__(self):
    one_of(self.name, DISPATCH_NAMES, 'model.dispatch')
    check(self.capacity_factor > 0, 'model.capacity_factor', f'must be positive, got {self.capacity_factor}')

  @classmethod
  def from_config(cls, m) -> 'DispatchConfig':
    return cls(name=m.dispatch, capacity_factor=m.capacity_factor, num_experts=m.num_experts,
               fp8=m.precision == 'fp8')


def _swiglu(x_NSD, w_gate_NDF, w_up_NDF, w_down_NFD, einsum=jnp.einsum):
  h = jax.nn.silu(einsum('nsd,ndf->nsf', x_NSD, w_gate_NDF))
  h = h * einsum('nsd,ndf->nsf', x_NSD, w_up_NDF)
  return einsum('nsf,nfd->nsd', h, w_down_NFD)


def _group_by_expert(expert_A, num_local: int, offset):
  """For each assignment: its local expert, whether the expert is local, and its rank in that expert."""
  local_A = expert_A - offset
  valid_A = (local_A >= 0) & (local_A < num_local)
  key_A = jnp.where(valid_A, local_A, num_local)
  count_E = jnp.bincount(key_A, length=num_local + 1)
  start_E = jnp.cumsum(count_E) - count_E
  order_A = jnp.argsort(key_A, stable=True)
  sorted_pos_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
  rank_A = sorted_pos_A - start_E[key_A]
  return jnp.minimum(key_A, num_local - 1), valid_A, rank_A, count_E[:num_local]


def _rows_to_tokens(row_A, num_rows: int, K: int, T: int):
  """Row -> source token (T = an all-zero padding token) for the rows that assignments occupy."""
  tok_R = jnp.full((num_rows + 1,), T, jnp.int32)
  return tok_R.at[row_A].set(jnp.arange(row_A.shape[0], dtype=jnp.int32) // K)[:num_rows]


def _gather_rows(x_TD, row_A, num_rows: int, K: int):
  """The dispatch buffer x_RD: row r holds the token whose assignment occupies it (zeros where no
  assignment does; row_A = num_rows marks an assignment that occupies none)."""
  T, D = x_TD.shape
  tok_R = _rows_to_tokens(row_A, num_rows, K, T)
  return jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])[tok_R]


def _combine(out_RD, row_A, weight_TK):
  """Gathers each assignment's output row (dropped -> zeros) and sums over k with the weights."""
  T, K = weight_TK.shape
  out_RD = jnp.concatenate([out_RD, jnp.zeros((1, out_RD.shape[1]), out_RD.dtype)])
  out_TKD = out_RD[row_A].reshape(T, K, -1)
  return jnp.einsum('tkd,tk->td', out_TKD, weight_TK.astype(out_TKD.dtype))


def _take(x_ND, idx_M):
  """Rows idx_M of x_ND, zeros where idx_M is out of range (a sentinel for 'no row')."""
  return jnp.take(x_ND, idx_M, axis=0, mode='fill', fill_value=0)


def layout_rows(layout, num_assignments: int, num_local: int) -> int:
  """Rows of a static dropless layout: E*C for ('capacity', C); for ('blocks', Z), enough Z-row blocks
  for every assignment plus each expert's last partial block."""
  kind, Z = layout
  if kind == 'capacity':
    return num_local * Z
  return (num_assignments + num_local * (Z - 1) + Z - 1) // Z * Z


def _dropless_rows(layout, local_A, valid_A, rank_A, count_E, num_experts: int):
  """Where a dropless layout puts each assignment: (row_A, groups N, rows per group Z, expert of each
  group, or None when group n is expert n). row_A = N*Z marks an assignment with no row (not local)."""
  kind, Z = layout
  E = num_experts
  A = local_A.shape[0]
  if kind == 'capacity':   # group e = expert e, Z = C slots (the layout holds the busiest expert)
    return jnp.where(valid_A, local_A * Z + rank_A, E * Z), E, Z, None
  padded_E = (count_E + Z - 1) // Z * Z
  end_E = jnp.cumsum(padded_E)
  N = layout_rows(layout, A, E) // Z
  row_A = jnp.where(valid_A, (end_E - padded_E)[local_A] + rank_A, N * Z)
  expert_N = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(N) * Z, side='right'), E - 1)
  return row_A, N, Z, expert_N


def _row_assignments(row_A, num_rows: int):
  """The inverse of row_A: the assignment in each row (A = none)."""
  A = row_A.shape[0]
  return jnp.full((num_rows + 1,), A, jnp.int32).at[row_A].set(
      jnp.arange(A, dtype=jnp.int32), mode='drop')[:num_rows]


def _layout_operands(layout, x_TD, K: int, local_A, valid_A, rank_A, count_E, ws):
  """What both passes of one dropless layout start from: row_A, a_R (the assignment in each row), the
  groups' expert (or None), the rows x_NZD and the weights per group (a copy per block in the
  fallback for heavy imbalance)."""
  row_A, N, Z, expert_N = _dropless_rows(layout, local_A, valid_A, rank_A, count_E, ws[0].shape[0])
  if expert_N is not None:
    ws = tuple(w[expert_N] for w in ws)
  a_R = _row_assignments(row_A, N * Z)
  x_NZD = _take(x_TD, a_R // K).reshape(N, Z, -1)   # a_R = A -> token T: out of range -> zeros
  return row_A, a_R, expert_N, x_NZD, ws


def _dropless_fwd_rows(layout, einsum, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd):
  """Forward of one layout. Returns y_TD and the residuals in assignment space (o_AD, g_AF, u_AF), whose
  shapes do not depend on the layout, so `lax.switch` branches share them."""
  T, K = weight_TK.shape
  row_A, _, _, x_NZD, (wg, wu, wd) = _layout_operands(layout, x_TD, K, local_A, valid_A, rank_A, count_E,
                                                      (wg, wu, wd))
  N, Z = x_NZD.shape[:2]
  g_NZF = einsum('nzd,ndf->nzf', x_NZD, wg)
  u_NZF = einsum('nzd,ndf->nzf', x_NZD, wu)
  o_NZD = einsum('nzf,nfd->nzd', jax.nn.silu(g_NZF) * u_NZF, wd)
  o_AD = _take(o_NZD.reshape(N * Z, -1), row_A)
  g_AF, u_AF = (_take(a.reshape(N * Z, -1), row_A) for a in (g_NZF, u_NZF))
  y_TD = jnp.einsum('tkd,tk->td', o_AD.reshape(T, K, -1), weight_TK.astype(o_AD.dtype))
  return y_TD, (o_AD, g_AF, u_AF)


def _dropless_bwd_rows(layout, einsum, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd,
                       res, dy_TD):
  """Backward of one layout from the forward's residuals: the six matmuls of a SwiGLU's backward, no
  forward recompute; rows move by gathers only (no scatter-add)."""
  T, K = weight_TK.shape
  E = wg.shape[0]
  o_AD, g_AF, u_AF = res
  row_A, a_R, expert_N, x_NZD, (wg_, wu_, wd_) = _layout_operands(layout, x_TD, K, local_A, valid_A, rank_A,
                                                                 count_E, (wg, wu, wd))
  N, Z = x_NZD.shape[:2]
  dweight_TK = jnp.einsum('tkd,td->tk', o_AD.reshape(T, K, -1), dy_TD).astype(weight_TK.dtype)
  do_AD = (weight_TK.astype(dy_TD.dtype)[:, :, None] * dy_TD[:, None, :]).reshape(T * K, -1)
  do_NZD, g_NZF, u_NZF = (_take(a, a_R).reshape(N, Z, -1) for a in (do_AD, g_AF, u_AF))
  sg_NZF = jax.nn.silu(g_NZF)
  dwd = einsum('nzf,nzd->nfd', sg_NZF * u_NZF, do_NZD)
  dh_NZF = einsum('nzd,nfd->nzf', do_NZD, wd_)
  du_NZF = dh_NZF * sg_NZF
  sig_NZF = jax.nn.sigmoid(g_NZF)
  dg_NZF = dh_NZF * u_NZF * sig_NZF * (1 + g_NZF * (1 - sig_NZF))
  dwg = einsum('nzd,nzf->ndf', x_NZD, dg_NZF)
  dwu = einsum('nzd,nzf->ndf', x_NZD, du_NZF)
  dx_NZD = einsum('nzf,ndf->nzd', dg_NZF, wg_) + einsum('nzf,ndf->nzd', du_NZF, wu_)
  dx_TD = _take(dx_NZD.reshape(N * Z, -1), row_A).reshape(T, K, -1).sum(1).astype(x_TD.dtype)
  if expert_N is not None:   # each block's weight gradient back to its expert
    dwg, dwu, dwd = (jax.ops.segment_sum(d, expert_N, num_segments=E) for d in (dwg, dwu, dwd))
  return dx_TD, dweight_TK, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)


def _layout_ffn(layout, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd,
                einsum=jnp.einsum):
  """One dropless layout's forward: (y_TD, dropped = 0)."""
  y_TD, _ = _dropless_fwd_rows(layout, einsum, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                               wg, wu, wd)
  return y_TD, jnp.zeros((), jnp.float32)


# Dropless capacities, as multiples of the mean rows per expert; past the last, blocks take over.
# Up to 5x (MaxVio 4) an [E, C] layout is cheaper than blocks, which gather a weight copy per block.
DROPLESS_BUCKETS = (1.0, 1.125, 1.25, 1.375, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)


def dropless_layouts(num_tokens: int, top_k: int, num_experts: int, num_local: int) -> tuple:
  """Static layouts to choose from at run time: ('capacity', C) buckets, then ('blocks', S)."""
  mean = num_tokens * top_k / num_experts
  caps = sorted({min(num_tokens, 8 * math.ceil(f * mean / 8)) for f in DROPLESS_BUCKETS})
  block = int(2 ** max(3, math.floor(math.log2(max(1.0, mean)))))
  return tuple(('capacity', C) for C in caps) + (('blocks', block),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _switch_ffn(layouts, einsum, branch, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                w_gate_EDF, w_up_EDF, w_down_EFD):
  return _switch_fwd(layouts, einsum, branch, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                     w_gate_EDF, w_up_EDF, w_down_EFD)[0]


def _switch_fwd(layouts, einsum, branch, *args):
  # Each branch returns its residuals in assignment space (shapes common to all branches), so the
  # backward runs only the chosen branch's backward, with no forward recompute.
  branches = [functools.partial(_dropless_fwd_rows, layout, einsum) for layout in layouts]
  y_TD, res = jax.lax.switch(branch, branches, *args)
  return (y_TD, jnp.zeros((), jnp.float32)), (branch, args, res)


def _switch_bwd(layouts, einsum, saved, cotangent):
  branch, args, res = saved
  dy_TD = cotangent[0]
  if einsum is jnp.einsum:
    branches = [functools.partial(_dropless_bwd_rows, layout, einsum) for layout in layouts]
  else:   # a quantising einsum (fp8) has its own backward: recompute the branch and differentiate it
    branches = [functools.partial(_recompute_bwd, layout, einsum) for layout in layouts]
  dx, dweight, dwg, dwu, dwd = jax.lax.switch(branch, branches, *args, res, dy_TD)
  return None, dx, dweight, None, None, None, None, dwg, dwu, dwd


def _recompute_bwd(layout, einsum, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd,
                   res, dy_TD):
  del res
  fn = lambda x, w, g, u, d: _dropless_fwd_rows(layout, einsum, x, w, local_A, valid_A, rank_A, count_E,
                                                g, u, d)[0]
  return jax.vjp(fn, x_TD, weight_TK, wg, wu, wd)[1](dy_TD)


_switch_ffn.defvjp(_switch_fwd, _switch_bwd)


@dataclass(frozen=True)
class ExpertGroup:
  """Where a dispatch runs: one device of the expert group, inside `shard_map`. Every dispatch
  implementation takes (x_TD, expert_TK, weight_TK, w_gate, w_up, w_down, group) and returns
  (y_TD, dropped assignments); the local-expert kernels under the all-gather transport also take
  `offset`, the id of the device's first expert."""
  axis: str | None          # the expert mesh axis; None when every expert is local
  size: int                 # S, devices on that axis
  cfg: DispatchConfig
  einsum: Callable          # jnp.einsum, or the fp8 einsum (moejax.precision)


def dropless_experts(x_TD, expert_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, offset,
                     group: ExpertGroup):
  """Never drops: picks at run time the cheapest static layout that holds the busiest local expert.

  With balanced routing that is an [E, C] capacity layout of ~T*K*(1 + MaxVio) rows, whatever E;
  past 2x the mean load, the block layout bounds the rows at T*K + E*(Z-1). `lax.switch` runs
  only the chosen branch. The gathered rows of the group's devices count as one set of tokens."""
  T, K = expert_TK.shape
  E = w_gate_EDF.shape[0]
  local_A, valid_A, rank_A, count_E = _group_by_expert(expert_TK.reshape(-1), E, offset)
  layouts = dropless_layouts(T, K, group.cfg.num_experts, E)
  caps = jnp.asarray([size for kind, size in layouts if kind == 'capacity'])
  branch = jnp.searchsorted(caps, count_E.max())  # first capacity >= the max load, else blocks
  return _switch_ffn(layouts, group.einsum, branch, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                     w_gate_EDF, w_up_EDF, w_down_EFD)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert for one device's tokens: ceil(capacity_factor * T*K / E)."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_experts(x_TD, expert_TK, weight_TK, w_gate_JDF, w_up_JDF, w_down_JFD, offset,
                     group: ExpertGroup):
  """Each expert takes the first C assignments of each source device's tokens, in token order.

  The rows are the gathered tokens of the group's S devices (source-major). Slots are laid out
  [J, S, C] (J local experts), as `capacity_a2a` receives them, so both drop the same assignments."""
  S = group.size
  T, K = expert_TK.shape[0] // S, expert_TK.shape[1]
  J = w_gate_JDF.shape[0]
  C = capacity(T, K, group.cfg.num_experts, group.cfg.capacity_factor)
  local_SA, valid_SA, rank_SA, _ = jax.vmap(lambda e: _group_by_expert(e, J, offset))(
      expert_TK.reshape(S, T * K))
  kept_SA = valid_SA & (rank_SA < C)
  row_SA = jnp.where(kept_SA, local_SA * (S * C) + jnp.arange(S)[:, None] * C + rank_SA, J * S * C)
  row_A = row_SA.reshape(-1)
  x_JND = _gather_rows(x_TD, row_A, J * S * C, K).reshape(J, S * C, -1)
  out_JND = _swiglu(x_JND, w_gate_JDF, w_up_JDF, w_down_JFD, group.einsum)
  dropped = jnp.sum(valid_SA & ~kept_SA).astype(jnp.float32)
  return _combine(out_JND.reshape(J * S * C, -1), row_A, weight_TK), dropped


# ----------------------------------------------------------------------------- grouped matmuls

def _grouped_swiglu(x_RD, w_gate_LDF, w_up_LDF, w_down_LFD, group_sizes_L, matmul):
  """SwiGLU of rows sorted by expert (group l = the next group_sizes_L[l] rows); rows past the groups
  give zeros (gmm leaves them unwritten, so they are masked after every matmul)."""
  in_groups_R1 = (jnp.arange(x_RD.shape[0]) < group_sizes_L.sum())[:, None]
  mm = lambda x, w: jnp.where(in_groups_R1, matmul(x, w, group_sizes_L), 0)
  h_RF = jax.nn.silu(mm(x_RD, w_gate_LDF)) * mm(x_RD, w_up_LDF)
  return mm(h_RF, w_down_LFD)


def _round_up(n: int, m: int) -> int:
  return (n + m - 1) // m * m


def grouped_experts(matmul: str):
  """Dropless local experts with the grouped matmul `matmul` (moejax.grouped_matmul): local assignments
  sorted by expert, one grouped matmul per projection (fp8: qwix's, moejax.grouped_matmul)."""
  def experts(x_TD, expert_TK, weight_TK, w_gate_JDF, w_up_JDF, w_down_JFD, offset, group: ExpertGroup):
    T, K = expert_TK.shape
    J = w_gate_JDF.shape[0]
    local_A, valid_A, rank_A, count_J = _group_by_expert(expert_TK.reshape(-1), J, offset)
    R = _round_up(T * K, 8)
    row_A = jnp.where(valid_A, (jnp.cumsum(count_J) - count_J)[local_A] + rank_A, R)
    out_RD = _grouped_swiglu(_gather_rows(x_TD, row_A, R, K), w_gate_JDF, w_up_JDF, w_down_JFD, count_J,
                             grouped_matmul(matmul, group.cfg.fp8))
    return _combine(out_RD, row_A, weight_TK), jnp.zeros((), jnp.float32)
  return experts


# ----------------------------------------------------------------------------- transports

def gathered(experts_fn):
  """The transport for local-expert kernels: all-gather the expert group's tokens, run the local
  experts on them, `psum_scatter` the outputs back to their devices."""
  def dispatch(x_TD, expert_TK, weight_TK, wg, wu, wd, group: ExpertGroup):
    offset = 0
    if group.axis is not None:
      x_TD, expert_TK, weight_TK = (jax.lax.all_gather(a, group.axis, tiled=True)
                                    for a in (x_TD, expert_TK, weight_TK))
      offset = jax.lax.axis_index(group.axis) * wg.shape[0]
    y_TD, dropped = experts_fn(x_TD, expert_TK, weight_TK, wg, wu, wd, offset, group)
    if group.axis is not None:
      y_TD = jax.lax.psum_scatter(y_TD, group.axis, scatter_dimension=0, tiled=True)
    return y_TD, dropped
  return dispatch


def capacity_a2a(x_TD, expert_TK, weight_TK, wg, wu, wd, group: ExpertGroup):
  """Capacity slots [E, C] filled from this device's tokens, sent to the experts' owners with
  `all_to_all`: each device receives [S, J, C] rows, runs its J experts, and sends them back."""
  ep, S = group.axis, group.size
  T, K = expert_TK.shape
  J = wg.shape[0]
  E = S * J
  C = capacity(T, K, group.cfg.num_experts, group.cfg.capacity_factor)
  expert_A, valid_A, rank_A, _ = _group_by_expert(expert_TK.reshape(-1), E, 0)
  kept_A = valid_A & (rank_A < C)
  row_A = jnp.where(kept_A, expert_A * C + rank_A, E * C)
  x_SND = _gather_rows(x_TD, row_A, E * C, K).reshape(S, J * C, -1)   # by destination device
  if ep is not None:
    x_SND = jax.lax.all_to_all(x_SND, ep, 0, 0)         # by source device
  x_JND = x_SND.reshape(S, J, C, -1).swapaxes(0, 1).reshape(J, S * C, -1)
  out_JND = _swiglu(x_JND, wg, wu, wd, group.einsum)
  out_SND = out_JND.reshape(J, S, C, -1).swapaxes(0, 1).reshape(S, J * C, -1)
  if ep is not None:
    out_SND = jax.lax.all_to_all(out_SND, ep, 0, 0)
  dropped = jnp.sum(valid_A & ~kept_A).astype(jnp.float32)
  return _combine(out_SND.reshape(E * C, -1), row_A, weight_TK), dropped


def _ragged_exchange():
  platform = jax.devices()[0].platform
  return a2a.ragged_all_to_all_dense if platform == 'cpu' else jax.lax.ragged_all_to_all


def ragged_a2a(x_TD, expert_TK, weight_TK, wg, wu, wd, group: ExpertGroup):
  """Dropless: rows sorted by global expert go to their owners with `ragged_all_to_all`, are regrouped
  by local expert for a grouped matmul, and come back the same way.

  The receive buffer holds S*A rows, the most one device can get (every token of the group on its
  experts), so nothing is dropped whatever the imbalance."""
  matmul = 'gmm' if jax.devices()[0].platform == 'tpu' else 'ragged_dot'
  ep, S = group.axis, group.size
  if ep is None:
    return grouped_experts(matmul)(x_TD, expert_TK, weight_TK, wg, wu, wd, 0, group)
  T, K = expert_TK.shape
  A, J, D = T * K, wg.shape[0], x_TD.shape[1]
  expert_A, valid_A, rank_A, count_E = _group_by_expert(expert_TK.reshape(-1), S * J, 0)
  row_A = jnp.where(valid_A, (jnp.cumsum(count_E) - count_E)[expert_A] + rank_A, A)
  x_AD = _gather_rows(x_TD, row_A, A, K)
  counts_SJ = count_E.reshape(S, J).astype(jnp.int32)
  recv_counts_SJ = jax.lax.all_to_all(counts_SJ, ep, 0, 0)
  input_offsets, send_sizes = a2a.send_layout(counts_SJ)
  recv_offsets, recv_sizes = a2a.recv_layout(recv_counts_SJ)
  output_offsets = jax.lax.all_to_all(recv_offsets, ep, 0, 0, tiled=True)
  exchange = functools.partial(_ragged_exchange(), axis_name=ep)
  R = _round_up(S * A, 8)
  x_RD = exchange(x_AD, jnp.zeros((R, D), x_AD.dtype), input_offsets, send_sizes, output_offsets,
                  recv_sizes)
  order_R = jnp.argsort(a2a.received_row_experts(recv_counts_SJ, R), stable=True)
  out_RD = _grouped_swiglu(x_RD[order_R], wg, wu, wd, recv_counts_SJ.sum(0),
                           grouped_matmul(matmul, group.cfg.fp8))
  out_RD = jnp.zeros_like(out_RD).at[order_R].set(out_RD)
  back_offsets = jax.lax.all_to_all(input_offsets, ep, 0, 0, tiled=True)
  y_AD = exchange(out_RD, jnp.zeros((A, D), out_RD.dtype), recv_offsets, recv_sizes, back_offsets,
                  send_sizes)
  return _combine(y_AD, row_A, weight_TK), jnp.zeros((), jnp.float32)


DISPATCHES = {
    'dropless': gathered(dropless_experts),
    'capacity': gathered(capacity_experts),
    'capacity_a2a': capacity_a2a,
    'ragged_dot': gathered(grouped_experts('ragged_dot')),
    'gmm': gathered(grouped_experts('gmm')),
    'tokamax': gathered(grouped_experts('tokamax')),
    'ragged_a2a': ragged_a2a,
}
DISPATCH_NAMES = ('auto', *DISPATCHES)
GROUPED_DISPATCHES = ('ragged_dot', 'gmm', 'tokamax', 'ragged_a2a')   # the grouped-matmul dispatches


def resolve_dispatch(name: str, platform: str, expert_axis_size: int, fp8: bool = False) -> str:
  """'auto' -> the implementation for the backend (see the module docstring); other names as given.
  `fp8` no longer changes the choice (every dispatch has an fp8 path); kept for the callers."""
  del fp8
  if name != 'auto':
    return name
  if platform == 'cpu':
    return 'dropless'
  if platform == 'tpu':
    return 'gmm'
  if platform in ('gpu', 'cuda', 'rocm'):
    return 'ragged_a2a' if expert_axis_size > 1 else 'ragged_dot'
  return 'dropless'


def routed_experts(x_TD, routing, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: DispatchConfig, mesh,
                   batch_axes):
  """Runs the routed experts under shard_map: tokens sharded over `batch_axes`, experts over
  'expert' and their hidden units F over 'tensor' (when the mesh has those axes).

  Whatever the weights' storage sharding (e.g. 'embed' over fsdp), they enter the shard_map split
  only as [E / expert, D, F / tensor], so the compiler all-gathers the rest (ZeRO-3) first. With F
  split, each tensor rank's expert FFN yields a partial sum over its F slice and a psum over
  'tensor' completes it (Megatron-style; tokens are whole over 'tensor').
  Assignments to zero-computation experts (ids >= num_experts) are local to no device, so they are
  not dispatched; the caller adds their identity output. Returns (y_TD, dropped assignments over
  the global batch)."""
  ep_axis = 'expert' if 'expert' in mesh.axis_names else None
  S = mesh.shape['expert'] if ep_axis else 1
  name = resolve_dispatch(cfg.name, mesh.devices.flat[0].platform, S, cfg.fp8)
  tp = 'tensor' if 'tensor' in mesh.axis_names else None
  group = ExpertGroup(ep_axis if S > 1 else None, S, cfg, precision.einsum_for(cfg.fp8))
  args = (x_TD, routing.expert_TK, routing.weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
  if mesh.size == 1:   # no shard_map: its transpose would all-reduce the weight gradients over size-1 axes
    return DISPATCHES[name](*args, group)

  def local(*args):
    y_TD, dropped = DISPATCHES[name](*args, group)
    if tp is not None:   # sum the F slices' partial outputs
      y_TD = jax.lax.psum(y_TD, tp)
    # tensor ranks see the same assignments: count their drops once
    return y_TD, jax.lax.psum(dropped, tuple(a for a in mesh.axis_names if a != tp))

  tok = P(batch_axes)
  w_in, w_out = P(ep_axis, None, tp), P(ep_axis, tp, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                     out_specs=(tok, P()), check_vma=False)
  return fn(*args)
