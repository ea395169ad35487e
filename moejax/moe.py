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
  - 'ragged_a2a': dropless; each device sends every expert owner exactly its rows with
    `jax.lax.ragged_all_to_all` (offsets in moejax/a2a.py), then a grouped matmul. XLA:CPU lacks the
    op, so there the exchange is emulated with a padded `all_to_all` (tests only).
  - 'auto' (the default): cpu -> 'dropless'; gpu -> 'ragged_a2a' when the expert axis has more than
    one device, else 'ragged_dot'; tpu -> 'gmm'.
Expert parallelism for 'dropless', 'capacity', 'ragged_dot' and 'gmm': tokens are all-gathered over
the `expert` mesh axis, each device runs its local experts on the rows routed to them, and
`psum_scatter` returns each device its tokens' outputs. The `*_a2a` variants move only the rows.
The fp8 policy (moejax.precision) applies to the einsum dispatches; grouped matmuls run in the
compute dtype.
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import a2a, precision
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
    check(not (self.fp8 and self.name in GROUPED_DISPATCHES), 'model.dispatch',
          f'{self.name!r} has no fp8 path; use dropless, capacity or capacity_a2a with precision fp8')

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


def _capacity_ffn(C: int, x_TD, weight_TK, local_A, valid_A, rank_A, w_gate_EDF, w_up_EDF,
                  w_down_EFD, einsum=jnp.einsum):
  """Runs each local expert on its first C assignments; returns (y_TD, dropped assignments)."""
  T, K = weight_TK.shape
  E = w_gate_EDF.shape[0]
  kept_A = valid_A & (rank_A < C)
  row_A = jnp.where(kept_A, local_A * C + rank_A, E * C)
  x_ECD = _gather_rows(x_TD, row_A, E * C, K).reshape(E, C, -1)
  out_ECD = _swiglu(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, einsum)
  dropped = jnp.sum(valid_A & ~kept_A).astype(jnp.float32)
  return _combine(out_ECD.reshape(E * C, -1), row_A, weight_TK), dropped


def _block_ffn(Z: int, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, w_gate_EDF, w_up_EDF,
               w_down_EFD, einsum=jnp.einsum):
  """Any load: each expert's rows padded to blocks of Z rows, each block with its expert's weights.

  Rows are bounded by T*K + E*(Z-1) whatever the imbalance, at the price of gathering one weight
  copy per block; the dropless fallback when the busiest expert outgrows every capacity bucket."""
  T, K = weight_TK.shape
  E = w_gate_EDF.shape[0]
  padded_E = (count_E + Z - 1) // Z * Z
  end_E = jnp.cumsum(padded_E)
  R = (T * K + E * (Z - 1) + Z - 1) // Z * Z
  N = R // Z
  row_A = jnp.where(valid_A, (end_E - padded_E)[local_A] + rank_A, R)
  block_expert_N = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(N) * Z, side='right'), E - 1)
  x_NZD = _gather_rows(x_TD, row_A, R, K).reshape(N, Z, -1)
  out_NZD = _swiglu(x_NZD, w_gate_EDF[block_expert_N],
                    w_up_EDF[block_expert_N], w_down_EFD[block_expert_N], einsum)
  return _combine(out_NZD.reshape(R, -1), row_A, weight_TK), jnp.zeros((), jnp.float32)


def _layout_ffn(layout, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd,
                einsum=jnp.einsum):
  kind, size = layout
  if kind == 'capacity':
    return _capacity_ffn(size, x_TD, weight_TK, local_A, valid_A, rank_A, wg, wu, wd, einsum)
  return _block_ffn(size, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd, einsum)


# Dropless capacities, as multiples of the mean rows per expert; past the last, blocks take over.
DROPLESS_BUCKETS = (1.0, 1.25, 1.5, 2.0)   # past 2x, blocks were measured as cheap


def dropless_layouts(num_tokens: int, top_k: int, num_experts: int, num_local: int) -> tuple:
  """Static layouts to choose from at run time: ('capacity', C) buckets, then ('blocks', S)."""
  mean = num_tokens * top_k / num_experts
  caps = sorted({min(num_tokens, 8 * math.ceil(f * mean / 8)) for f in DROPLESS_BUCKETS})
  block = int(2 ** max(3, math.floor(math.log2(max(1.0, mean)))))
  return tuple(('capacity', C) for C in caps) + (('blocks', block),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _switch_ffn(layouts, einsum, branch, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                w_gate_EDF, w_up_EDF, w_down_EFD):
  branches = [functools.partial(_layout_ffn, layout, einsum=einsum) for layout in layouts]
  return jax.lax.switch(branch, branches, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                        w_gate_EDF, w_up_EDF, w_down_EFD)


def _switch_fwd(layouts, einsum, branch, *args):
  return _switch_ffn(layouts, einsum, branch, *args), (branch, args)


def _switch_bwd(layouts, einsum, res, cotangent):
  # Recompute the chosen branch in the backward pass: differentiating through `lax.switch` directly
  # would keep every branch's residuals alive (zero-filled), which costs more than the recompute.
  branch, (x_TD, weight_TK, local_A, valid_A, rank_A, count_E, wg, wu, wd) = res

  def branch_vjp(layout, x_TD, weight_TK, wg, wu, wd):
    fn = lambda x, w, g, u, d: _layout_ffn(layout, x, w, local_A, valid_A, rank_A, count_E, g, u, d,
                                           einsum)
    return jax.vjp(fn, x_TD, weight_TK, wg, wu, wd)[1](cotangent)

  grads = jax.lax.switch(branch, [functools.partial(branch_vjp, l) for l in layouts],
                         x_TD, weight_TK, wg, wu, wd)
  dx, dweight, dwg, dwu, dwd = grads
  return None, dx, dweight, None, None, None, None, dwg, dwu, dwd


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

def _ragged_dot(x_RD, w_LDF, group_sizes_L):
  return jax.lax.ragged_dot(x_RD, w_LDF, group_sizes_L)


def _tile(n: int) -> int:
  return math.gcd(n, 128)


def _megablox_gmm(x_RD, w_LDF, group_sizes_L):
  """Pallas megablox `gmm` (TPU kernel; run by the Pallas interpreter elsewhere)."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm
  R, D = x_RD.shape
  tiling = (_tile(R), _tile(D), _tile(w_LDF.shape[2]))
  return gmm(x_RD, w_LDF, group_sizes_L.astype(jnp.int32), x_RD.dtype, tiling,
             interpret=jax.devices()[0].platform != 'tpu')


GROUPED_MATMULS = {'ragged_dot': _ragged_dot, 'gmm': _megablox_gmm}


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
  """Dropless local experts with the grouped matmul `matmul` (GROUPED_MATMULS): local assignments
  sorted by expert, one grouped matmul per projection (no fp8 path: group.einsum is not used)."""
  def experts(x_TD, expert_TK, weight_TK, w_gate_JDF, w_up_JDF, w_down_JFD, offset, group: ExpertGroup):
    T, K = expert_TK.shape
    J = w_gate_JDF.shape[0]
    local_A, valid_A, rank_A, count_J = _group_by_expert(expert_TK.reshape(-1), J, offset)
    R = _round_up(T * K, 8)
    row_A = jnp.where(valid_A, (jnp.cumsum(count_J) - count_J)[local_A] + rank_A, R)
    out_RD = _grouped_swiglu(_gather_rows(x_TD, row_A, R, K), w_gate_JDF, w_up_JDF, w_down_JFD, count_J,
                             GROUPED_MATMULS[matmul])
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
  by local expert for a grouped matmul, and come back the same way (no fp8 path).

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
  out_RD = _grouped_swiglu(x_RD[order_R], wg, wu, wd, recv_counts_SJ.sum(0), GROUPED_MATMULS[matmul])
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
    'ragged_a2a': ragged_a2a,
}
DISPATCH_NAMES = ('auto', *DISPATCHES)
GROUPED_DISPATCHES = ('ragged_dot', 'gmm', 'ragged_a2a')   # grouped matmuls: no fp8 path


def resolve_dispatch(name: str, platform: str, expert_axis_size: int, fp8: bool = False) -> str:
  """'auto' -> the implementation for the backend (see the module docstring); other names as given.

  The grouped matmuls have no fp8 path, so under the fp8 policy 'auto' keeps the einsum 'dropless'."""
  if name != 'auto':
    return name
  if fp8 or platform == 'cpu':
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
  return fn(x_TD, routing.expert_TK, routing.weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
