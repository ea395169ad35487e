"""Token exchange over the `expert` mesh axis with `jax.lax.ragged_all_to_all`: the offset arithmetic.

Each device sorts its assignments by global expert, so the rows bound for device d (experts
d*L .. d*L+L-1, L local experts per device) form one contiguous chunk. From the per-device,
per-local-expert counts a device needs four arrays of length S (devices on the axis), with the
meaning `jax.lax.ragged_all_to_all` gives them:
  input_offsets[d], send_sizes[d]   where my chunk for device d starts in my buffer, and its rows;
  output_offsets[d]                 where that chunk lands in device d's receive buffer;
  recv_sizes[s]                     how many rows I receive from device s.
A receiver stores the chunks source by source (offsets = exclusive cumsum of recv_sizes), so
output_offsets is the receivers' offsets sent back with an all_to_all. Everything is a pure
function of the counts; `plan` runs them for every device at once (the all_to_alls become
transposes) so the arithmetic can be checked by hand.
"""
import jax
import jax.numpy as jnp


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def send_layout(counts_SL):
  """This device's rows per destination device s and its local expert l -> (input_offsets, send_sizes)."""
  send_S = counts_SL.sum(1)
  return _exclusive_cumsum(send_S), send_S


def recv_layout(recv_counts_SL):
  """Rows received from each source s for each of my local experts l -> (recv_offsets, recv_sizes).

  Chunks are stored source by source, each sorted by local expert (as the source sent it)."""
  recv_S = recv_counts_SL.sum(1)
  return _exclusive_cumsum(recv_S), recv_S


def received_row_experts(recv_counts_SL, num_rows: int):
  """Local expert of each row of the receive buffer; L (one past the last) for unused rows."""
  S, L = recv_counts_SL.shape
  ends = jnp.cumsum(recv_counts_SL.reshape(-1))
  segment_R = jnp.searchsorted(ends, jnp.arange(num_rows), side='right')   # (source, expert) pair
  return jnp.where(segment_R < S * L, segment_R % L, L).astype(jnp.int32)


def plan(counts_DE, num_devices: int) -> dict:
  """All four arrays for every device ([D, S] each) from every device's per-expert counts [D, E].

  What the devices compute with `send_layout`/`recv_layout` and two all_to_alls (of the counts,
  then of the receive offsets), with each all_to_all written as a transpose."""
  counts_DE = jnp.asarray(counts_DE, jnp.int32)
  D = num_devices
  counts_DSL = counts_DE.reshape(D, D, -1)             # [sender, destination, local expert]
  recv_DSL = jnp.swapaxes(counts_DSL, 0, 1)            # all_to_all: [receiver, source, local expert]
  input_offsets, send_sizes = jax.vmap(send_layout)(counts_DSL)
  recv_offsets, recv_sizes = jax.vmap(recv_layout)(recv_DSL)
  output_offsets = recv_offsets.T                      # all_to_all of the receivers' offsets
  return {'input_offsets': input_offsets, 'send_sizes': send_sizes, 'output_offsets': output_offsets,
          'recv_sizes': recv_sizes, 'recv_offsets': recv_offsets, 'recv_counts': recv_DSL}


def ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                            axis_name):
  """`jax.lax.ragged_all_to_all` built from a padded `all_to_all` (for backends without the op, XLA:CPU).

  Every chunk is padded to the operand's rows, so it moves S times the data: a stand-in for tests,
  not a transport."""
  N, M = operand.shape[0], output.shape[0]
  i_N = jnp.arange(N)
  src_SN = input_offsets[:, None] + i_N
  chunks_SND = jnp.where((i_N < send_sizes[:, None])[..., None], operand[jnp.clip(src_SN, 0, N - 1)], 0)
  recv_SND = jax.lax.all_to_all(chunks_SND, axis_name, 0, 0)                   # [source, row, ...]
  at_S = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)      # where each lands here
  dst_SN = jnp.where(i_N < recv_sizes[:, None], at_S[:, None] + i_N, M)
  return output.at[dst_SN.reshape(-1)].set(recv_SND.reshape(-1, *operand.shape[1:]), mode='drop')
