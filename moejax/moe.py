"""Expert dispatch: permute -> expert FFN -> unpermute, after routing (moejax/router.py).

Axis letters: T tokens (batch x sequence, flattened), D model, E experts, K top-k, F expert FFN,
A = T*K token-to-expert assignments, R dispatch rows, C capacity (rows) per expert.

Dispatch sorts assignments by expert into [E, C] slots and runs dense batched einsums, so its work
grows with T*K, not with E (XLA:CPU lowers `ragged_dot` to a dense matmul over every group, and
gathering per-block expert weights was measured 2-3x slower than this):
  - 'dropless': C is chosen at run time from a few static sizes as the smallest that holds the
    busiest expert (`lax.switch`), so no token is ever dropped and work is ~T*K*(1 + MaxVio); under
    heavy imbalance a block layout (rows padded per expert to blocks of S) bounds the work instead.
  - 'capacity': C = ceil(capacity_factor * A / E) slots; overflow is dropped and counted.
Expert parallelism: tokens are all-gathered over the `expert` mesh axis, each device runs its local
experts on the rows routed to them, and `psum_scatter` returns each device its tokens' outputs.
"""
import functools
import math
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import precision


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
  tok_R = _rows_to_tokens(row_A, E * C, K, T)
  x_TD = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)])
  out_ECD = _swiglu(x_TD[tok_R].reshape(E, C, -1), w_gate_EDF, w_up_EDF, w_down_EFD, einsum)
  dropped = jnp.sum(valid_A & ~kept_A).astype(jnp.float32)
  return _combine(out_ECD.reshape(E * C, -1), row_A, weight_TK), dropped


def _block_ffn(S: int, x_TD, weight_TK, local_A, valid_A, rank_A, count_E, w_gate_EDF, w_up_EDF,
               w_down_EFD, einsum=jnp.einsum):
  """Any load: each expert's rows padded to blocks of S rows, each block with its expert's weights.

  Rows are bounded by T*K + E*(S-1) whatever the imbalance, at the price of gathering one weight
  copy per block; the dropless fallback when the busiest expert outgrows every capacity bucket."""
  T, K = weight_TK.shape
  E = w_gate_EDF.shape[0]
  padded_E = (count_E + S - 1) // S * S
  end_E = jnp.cumsum(padded_E)
  R = (T * K + E * (S - 1) + S - 1) // S * S
  N = R // S
  row_A = jnp.where(valid_A, (end_E - padded_E)[local_A] + rank_A, R)
  block_expert_N = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(N) * S, side='right'), E - 1)
  tok_R = _rows_to_tokens(row_A, R, K, T)
  x_TD = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)])
  out_NSD = _swiglu(x_TD[tok_R].reshape(N, S, -1), w_gate_EDF[block_expert_N],
                    w_up_EDF[block_expert_N], w_down_EFD[block_expert_N], einsum)
  return _combine(out_NSD.reshape(R, -1), row_A, weight_TK), jnp.zeros((), jnp.float32)


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


def dropless_experts(x_TD, expert_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, offset,
                     capacity_factor: float, num_experts: int, einsum=jnp.einsum):
  """Never drops: picks at run time the cheapest static layout that holds the busiest local expert.

  With balanced routing that is an [E, C] capacity layout of ~T*K*(1 + MaxVio) rows, whatever E;
  past 2x the mean load, the block layout bounds the rows at T*K + E*(S-1). `lax.switch` runs
  only the chosen branch."""
  del capacity_factor
  T, K = expert_TK.shape
  E = w_gate_EDF.shape[0]
  local_A, valid_A, rank_A, count_E = _group_by_expert(expert_TK.reshape(-1), E, offset)
  layouts = dropless_layouts(T, K, num_experts, E)
  caps = jnp.asarray([size for kind, size in layouts if kind == 'capacity'])
  branch = jnp.searchsorted(caps, count_E.max())  # first capacity >= the max load, else blocks
  return _switch_ffn(layouts, einsum, branch, x_TD, weight_TK, local_A, valid_A, rank_A, count_E,
                     w_gate_EDF, w_up_EDF, w_down_EFD)


def capacity_experts(x_TD, expert_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, offset,
                     capacity_factor: float, num_experts: int, einsum=jnp.einsum):
  """C = ceil(capacity_factor * T*K / E) slots per expert; overflow assignments are dropped."""
  T, K = expert_TK.shape
  C = max(1, math.ceil(capacity_factor * T * K / num_experts))
  local_A, valid_A, rank_A, _ = _group_by_expert(expert_TK.reshape(-1), w_gate_EDF.shape[0], offset)
  return _capacity_ffn(C, x_TD, weight_TK, local_A, valid_A, rank_A, w_gate_EDF, w_up_EDF,
                       w_down_EFD, einsum)


DISPATCHES = {'dropless': dropless_experts, 'capacity': capacity_experts}


def routed_experts(x_TD, routing, w_gate_EDF, w_up_EDF, w_down_EFD, cfg, mesh, batch_axes):
  """Runs the routed experts under shard_map: tokens sharded over `batch_axes`, experts over
  'expert' and their hidden units F over 'tensor' (when the mesh has those axes).

  Whatever the weights' storage sharding (e.g. 'embed' over fsdp), they enter the shard_map split
  only as [E / expert, D, F / tensor], so the compiler all-gathers the rest (ZeRO-3) first. With F
  split, each tensor rank's expert FFN yields a partial sum over its F slice and a psum over
  'tensor' completes it (Megatron-style; tokens are whole over 'tensor').
  Assignments to zero-computation experts (ids >= num_experts) are local to no device, so they are
  not dispatched; the caller adds their identity output. Returns (y_TD, dropped assignments over
  the global batch)."""
  experts_fn = functools.partial(DISPATCHES[cfg.dispatch], capacity_factor=cfg.capacity_factor,
                                 num_experts=cfg.num_experts,
                                 einsum=precision.einsum_for(precision.fp8_mlp(cfg)))
  ep = 'expert' if 'expert' in mesh.axis_names else None
  tp = 'tensor' if 'tensor' in mesh.axis_names else None

  def local(x_TD, expert_TK, weight_TK, wg, wu, wd):
    if ep is not None:   # gather the expert group's tokens; each device runs its local experts
      x_TD = jax.lax.all_gather(x_TD, ep, tiled=True)
      expert_TK = jax.lax.all_gather(expert_TK, ep, tiled=True)
      weight_TK = jax.lax.all_gather(weight_TK, ep, tiled=True)
      offset = jax.lax.axis_index(ep) * wg.shape[0]
    else:
      offset = 0
    y_TD, dropped = experts_fn(x_TD, expert_TK, weight_TK, wg, wu, wd, offset=offset)
    if ep is not None:
      y_TD = jax.lax.psum_scatter(y_TD, ep, scatter_dimension=0, tiled=True)
    if tp is not None:   # sum the F slices' partial outputs
      y_TD = jax.lax.psum(y_TD, tp)
    # tensor ranks see the same assignments: count their drops once
    return y_TD, jax.lax.psum(dropped, tuple(a for a in mesh.axis_names if a != tp))

  tok = P(batch_axes)
  w_in, w_out = P(ep, None, tp), P(ep, tp, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                     out_specs=(tok, P()), check_vma=False)
  return fn(x_TD, routing.expert_TK, routing.weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
