"""KDA: Kimi Delta Attention, a gated delta rule with channel-wise decay.

    S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + b_t k_t v_t^T,    o_t = S_t^T q_t

q, k, v pass through short causal depthwise convolutions and SiLU; q and k are L2-normalised;
b_t = sigmoid(x W_b) per head; log a_t = -exp(A_log) softplus(f(x) + dt_bias) per channel, with
f a low-rank projection; the output is RMS-normalised per head and gated by sigmoid(x W_g).

Training uses the chunkwise-parallel form (`chunk_delta_rule`); `recurrent_delta_rule` is the
token-by-token form (decoding, reference). With segment ids (packed documents) the state restarts
from zero at each document's first position and the convolutions read no earlier document: each
document gives what it would give alone. Axis letters: B batch, T positions, D model, H heads,
K key dim, V value dim, C chunks, L chunk length, W conv width.
"""
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from moejax.attention.core import Attention
from moejax.layers import dense, rms_norm
from moejax.params import ParamSpec


def specs(cfg):
  D, H, N, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.kda.conv
  s, out = cfg.init_std, cfg.out_std
  proj = lambda: ParamSpec((D, H, N), ('embed', 'heads', 'head_dim'), scale=s)
  conv = lambda: ParamSpec((W, H, N), (None, 'heads', 'head_dim'), scale=W ** -0.5)
  return {
      'wq': proj(), 'wk': proj(), 'wv': proj(), 'w_gate': proj(),
      'conv_q': conv(), 'conv_k': conv(), 'conv_v': conv(),
      'w_beta': ParamSpec((D, H), ('embed', 'heads'), scale=s),
      'wa_down': ParamSpec((D, N), ('embed', None), scale=s),          # low-rank decay projection
      'wa_up': ParamSpec((N, H, N), (None, 'heads', 'head_dim'), scale=s),
      'dt_bias': ParamSpec((H, N), ('heads', 'head_dim'), init='zeros'),
      'a_log': ParamSpec((H,), ('heads',), init='zeros'),
      'o_norm': ParamSpec((N,), ('head_dim',), init='ones'),
      'wo': ParamSpec((H, N, D), ('heads', 'head_dim', 'embed'), scale=out),
  }


def short_conv(x_BTHN, w_WHN, segment_ids_BT=None):
  """Causal depthwise convolution: y_t = sum_i w[W-1-i] x_{t-i}, over the taps t - i of t's
  document when segment ids are given."""
  W, T = w_WHN.shape[0], x_BTHN.shape[1]
  xp = jnp.pad(x_BTHN, ((0, 0), (W - 1, 0), (0, 0), (0, 0)))
  if segment_ids_BT is None:
    return sum(xp[:, j:j + T] * w_WHN[j] for j in range(W))
  sp = jnp.pad(segment_ids_BT, ((0, 0), (W - 1, 0)), constant_values=-1)
  same = lambda j: (sp[:, j:j + T] == segment_ids_BT)[..., None, None]
  return sum(jnp.where(same(j), xp[:, j:j + T], 0.0) * w_WHN[j] for j in range(W))


def doc_starts(segment_ids_BT):
  """True at each document's first position (and at position 0), [B, T]."""
  first = jnp.ones_like(segment_ids_BT[:, :1], bool)
  return jnp.concatenate([first, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def l2_normalize(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def gates_and_inputs(p, x_BTD, cfg, segment_ids_BT=None):
  """q, k (normalised, q scaled by K^-1/2), v, beta_BTH and log decay g_BTHK, all float32."""
  N = cfg.head_dim
  conv = lambda w, c: short_conv(dense(x_BTD, p[w]), p[c], segment_ids_BT)
  q = l2_normalize(jax.nn.silu(conv('wq', 'conv_q'))) * N ** -0.5
  k = l2_normalize(jax.nn.silu(conv('wk', 'conv_k')))
  v = jax.nn.silu(conv('wv', 'conv_v')).astype(jnp.float32)
  beta = jax.nn.sigmoid(dense(x_BTD, p['w_beta']).astype(jnp.float32))
  f = dense(dense(x_BTD, p['wa_down']), p['wa_up']).astype(jnp.float32)
  g = -jnp.exp(p['a_log'].astype(jnp.float32))[:, None] * jax.nn.softplus(f + p['dt_bias'])
  return q, k, v, beta, g


def recurrent_delta_rule(q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK, state_BHKV=None, reset_BT=None):
  """Token-by-token gated delta rule; returns o_BTHV and the final state. Where `reset_BT` is
  True (a document's first position) the state is zeroed before that position's update."""
  B, T, H, K = q_BTHK.shape
  if state_BHKV is None:
    state_BHKV = jnp.zeros((B, H, K, v_BTHV.shape[-1]), jnp.float32)
  if reset_BT is None:
    reset_BT = jnp.zeros((B, T), bool)

  def step(S, inp):
    q, k, v, b, g, reset = inp                             # [B, H, ...] at one position
    S = jnp.where(reset[:, None, None, None], 0.0, S)
    S = jnp.exp(g)[..., None] * S
    S = S + b[..., None, None] * k[..., None] * (v - jnp.einsum('bhkv,bhk->bhv', S, k))[..., None, :]
    return S, jnp.einsum('bhkv,bhk->bhv', S, q)

  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK, reset_BT))
  state_BHKV, o_TBHV = jax.lax.scan(step, state_BHKV, xs)
  return jnp.moveaxis(o_TBHV, 0, 1), state_BHKV


def chunk_delta_rule(q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK, chunk: int, segment_ids_BT=None):
  """Chunkwise-parallel gated delta rule (WY form); equals `recurrent_delta_rule` exactly (with
  resets at document starts when segment ids are given).

  Within a chunk with cumulative log decay Gam_i, pseudo-values u_i = b_i (v_i - (Diag(a_i)
  S_{i-1})^T k_i) solve (I + A) U = diag(b) (V - (exp(Gam) * K) S_0), A_ij = b_i k_i^T
  Diag(exp(Gam_i - Gam_j)) k_j for j < i; then O = (exp(Gam) * Q) S_0 + P U and
  S_L = exp(Gam_L) * S_0 + (exp(Gam_L - Gam) * K)^T U. Only the state crosses chunks.
  With documents, A and P keep only pairs (i, j) of one document; S_0 reaches only the positions
  before the chunk's first document start (rows of exp(Gam) * Q and of the S_0 term of U); S_L
  keeps exp(Gam_L) * S_0 only if no document starts in the chunk, and sums only the last
  document's k u^T terms. Masks, not decays, cut the documents, so nothing loses precision."""
  B, T, H, K = q_BTHK.shape
  L = chunk
  C = -(-T // L)

  def blocks(x):   # [B, T, H, ...] -> [B, H, C, L, ...], zero-padded (b = 0, g = 0: no-op steps)
    x = jnp.pad(x, [(0, 0), (0, C * L - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, C, L, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, beta, g = map(blocks, (q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK))
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((B, T), jnp.int32)
  # padded positions continue the last document
  seg_BCL = jnp.pad(segment_ids_BT, ((0, 0), (0, C * L - T)), mode='edge').reshape(B, C, L)
  seg_prev_BC = jnp.concatenate([seg_BCL[:, :1, 0], seg_BCL[:, :-1, -1]], axis=1)
  same_BCLL = seg_BCL[..., :, None] == seg_BCL[..., None, :]
  carry_BCL = seg_BCL == seg_prev_BC[..., None]      # no document start from the chunk's start on
  last_BCL = seg_BCL == seg_BCL[..., -1:]            # in the chunk's last document
  same, carry, last = (jnp.expand_dims(m, 1) for m in (same_BCLL, carry_BCL, last_BCL))

  gam = jnp.cumsum(g, axis=3)                                           # [B, H, C, L, K]
  incl_LL = jnp.tril(jnp.ones((L, L), bool))
  strict_LL = jnp.tril(jnp.ones((L, L), bool), -1)
  diff = gam[..., :, None, :] - gam[..., None, :, :]                    # [B, H, C, L(i), L(j), K]
  decay = jnp.exp(jnp.where(incl_LL[..., None], diff, 0.0)) * incl_LL[..., None]
  A = beta[..., None] * jnp.einsum('...ik,...ijk,...jk->...ij', k, decay, k) * (strict_LL & same)
  P = jnp.einsum('...ik,...ijk,...jk->...ij', q, decay, k) * same
  eye = jnp.eye(L, dtype=A.dtype)
  solve = lambda rhs: solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
  w_v = solve(beta[..., None] * v)                                      # [B, H, C, L, V]
  w_k = solve(carry[..., None] * beta[..., None] * jnp.exp(gam) * k)    # [B, H, C, L, K]
  q_dec = carry[..., None] * jnp.exp(gam) * q
  k_dec = last[..., None] * jnp.exp(gam[..., -1:, :] - gam) * k
  a_last = carry[..., -1:] * jnp.exp(gam[..., -1, :])                   # [B, H, C, K]

  def step(S_BHKV, c):
    u = c['w_v'] - jnp.einsum('bhlk,bhkv->bhlv', c['w_k'], S_BHKV)
    o = jnp.einsum('bhlk,bhkv->bhlv', c['q_dec'], S_BHKV) + jnp.einsum('bhij,bhjv->bhiv', c['P'], u)
    S_BHKV = c['a_last'][..., None] * S_BHKV + jnp.einsum('bhlk,bhlv->bhkv', c['k_dec'], u)
    return S_BHKV, o

  xs = {'w_v': w_v, 'w_k': w_k, 'q_dec': q_dec, 'k_dec': k_dec, 'P': P, 'a_last': a_last}
  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 2, 0), xs)
  S0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
  _, o_CBHLV = jax.lax.scan(step, S0, xs)
  o_BTHV = jnp.moveaxis(o_CBHLV, (0, 1, 2), (1, 0, 3)).reshape(B, C * L, H, -1)
  return o_BTHV[:, :T]


def apply(p, x_BTD, cfg, segment_ids_BT=None):
  """Returns y_BTD and, for the attention interface, NaN per head: KDA has no softmax logits."""
  q, k, v, beta, g = gates_and_inputs(p, x_BTD, cfg, segment_ids_BT)
  o_BTHV = chunk_delta_rule(q, k, v, beta, g, cfg.kda.chunk, segment_ids_BT)
  o_BTHV = rms_norm(o_BTHV, p['o_norm'], cfg.norm_eps) * jax.nn.sigmoid(dense(x_BTD, p['w_gate']))
  return dense(o_BTHV.astype(x_BTD.dtype), p['wo'], n_in=2), jnp.full((cfg.num_heads,), jnp.nan)


def flops_per_token(cfg, seq_len):
  D, H, N, L = cfg.d_model, cfg.num_heads, cfg.head_dim, min(cfg.kda.chunk, seq_len)
  proj = 2 * D * H * N * 5 + 2 * D * (H + N) + 2 * N * H * N          # q k v gate out, beta, decay
  conv = 2 * 3 * cfg.kda.conv * H * N
  # per head: A and P (L x L x K each), two L x L solves, P U, and four K x V state products
  core = 2 * H * (2 * L * N + 2 * L * N + L * N + 4 * N * N)
  return proj + conv + core


# --- decoding: the recurrent form, one token per row ---

CONVS = ('q', 'k', 'v')


def init_cache(cfg, batch, max_len, dtype):
  """The state S [B, H, K, V] (float32) and the last kda_conv - 1 inputs of each short convolution;
  memory independent of max_len."""
  del max_len
  H, N, W = cfg.num_heads, cfg.head_dim, cfg.kda.conv
  cache = {f'conv_{c}': jnp.zeros((batch, W - 1, H, N), dtype) for c in CONVS}
  cache['state'] = jnp.zeros((batch, H, N, N), jnp.float32)
  return cache


def conv_step(buf_BWHN, x_BHN, w_WHN):
  """One output of `short_conv` from the previous W - 1 inputs and this one; returns the new buffer."""
  window = jnp.concatenate([buf_BWHN, x_BHN[:, None].astype(buf_BWHN.dtype)], axis=1)
  return sum(window[:, j] * w_WHN[j] for j in range(w_WHN.shape[0])), window[:, 1:]


def decode(p, x_BD, cache, pos, cfg):
  """As `gates_and_inputs` + `apply` at one position, with the convolutions fed from the cache and
  one step of `recurrent_delta_rule` on the cached state."""
  del pos
  N, x_B1D = cfg.head_dim, x_BD[:, None]
  cache, conv = dict(cache), {}
  for c in CONVS:
    conv[c], cache[f'conv_{c}'] = conv_step(cache[f'conv_{c}'], dense(x_BD, p[f'w{c}']), p[f'conv_{c}'])
  q = l2_normalize(jax.nn.silu(conv['q'])) * N ** -0.5
  k = l2_normalize(jax.nn.silu(conv['k']))
  v = jax.nn.silu(conv['v']).astype(jnp.float32)
  beta = jax.nn.sigmoid(dense(x_BD, p['w_beta']).astype(jnp.float32))
  f = dense(dense(x_BD, p['wa_down']), p['wa_up']).astype(jnp.float32)
  g = -jnp.exp(p['a_log'].astype(jnp.float32))[:, None] * jax.nn.softplus(f + p['dt_bias'])
  o_B1HV, cache['state'] = recurrent_delta_rule(
      *(a[:, None] for a in (q, k, v, beta, g)), state_BHKV=cache['state'])
  o_B1HV = rms_norm(o_B1HV, p['o_norm'], cfg.norm_eps) * jax.nn.sigmoid(dense(x_B1D, p['w_gate']))
  return dense(o_B1HV.astype(x_BD.dtype), p['wo'], n_in=2)[:, 0], cache


# No softmax logits (the logit max is NaN and never clips): QK-clip leaves KDA's params alone.
KDA = Attention(specs, apply, flops_per_token, init_cache, decode, qk_clip=lambda p, gamma_LH, cfg: p)
