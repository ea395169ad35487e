"""KDA: Kimi Delta Attention, a gated delta rule with channel-wise decay.

    S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + b_t k_t v_t^T,    o_t = S_t^T q_t

q, k, v pass through short causal depthwise convolutions and SiLU; q and k are L2-normalised;
b_t = sigmoid(x W_b) per head; log a_t = -exp(A_log) softplus(f(x) + dt_bias) per channel, with
f a low-rank projection; the output is RMS-normalised per head and gated by sigmoid(x W_g).

Training uses the chunkwise-parallel form (`chunk_delta_rule`); `recurrent_delta_rule` is the
token-by-token form (decoding, reference). Axis letters: B batch, T positions, D model, H heads,
K key dim, V value dim, C chunks, L chunk length, W conv width.
"""
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from moejax.attention.core import Attention
from moejax.layers import dense, rms_norm
from moejax.params import ParamSpec


def specs(cfg):
  D, H, N, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.kda_conv
  s, out = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
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


def short_conv(x_BTHN, w_WHN):
  """Causal depthwise convolution: y_t = sum_i w[W-1-i] x_{t-i}."""
  W, T = w_WHN.shape[0], x_BTHN.shape[1]
  xp = jnp.pad(x_BTHN, ((0, 0), (W - 1, 0), (0, 0), (0, 0)))
  return sum(xp[:, j:j + T] * w_WHN[j] for j in range(W))


def l2_normalize(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def gates_and_inputs(p, x_BTD, cfg):
  """q, k (normalised, q scaled by K^-1/2), v, beta_BTH and log decay g_BTHK, all float32."""
  N = cfg.head_dim
  q = l2_normalize(jax.nn.silu(short_conv(dense(x_BTD, p['wq']), p['conv_q']))) * N ** -0.5
  k = l2_normalize(jax.nn.silu(short_conv(dense(x_BTD, p['wk']), p['conv_k'])))
  v = jax.nn.silu(short_conv(dense(x_BTD, p['wv']), p['conv_v'])).astype(jnp.float32)
  beta = jax.nn.sigmoid(dense(x_BTD, p['w_beta']).astype(jnp.float32))
  f = dense(dense(x_BTD, p['wa_down']), p['wa_up']).astype(jnp.float32)
  g = -jnp.exp(p['a_log'].astype(jnp.float32))[:, None] * jax.nn.softplus(f + p['dt_bias'])
  return q, k, v, beta, g


def recurrent_delta_rule(q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK, state_BHKV=None):
  """Token-by-token gated delta rule; returns o_BTHV and the final state."""
  B, _, H, K = q_BTHK.shape
  if state_BHKV is None:
    state_BHKV = jnp.zeros((B, H, K, v_BTHV.shape[-1]), jnp.float32)

  def step(S, inp):
    q, k, v, b, g = inp                                    # [B, H, ...] at one position
    S = jnp.exp(g)[..., None] * S
    S = S + b[..., None, None] * k[..., None] * (v - jnp.einsum('bhkv,bhk->bhv', S, k))[..., None, :]
    return S, jnp.einsum('bhkv,bhk->bhv', S, q)

  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK))
  state_BHKV, o_TBHV = jax.lax.scan(step, state_BHKV, xs)
  return jnp.moveaxis(o_TBHV, 0, 1), state_BHKV


def chunk_delta_rule(q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK, chunk: int):
  """Chunkwise-parallel gated delta rule (WY form); equals `recurrent_delta_rule` exactly.

  Within a chunk with cumulative log decay Gam_i, pseudo-values u_i = b_i (v_i - (Diag(a_i)
  S_{i-1})^T k_i) solve (I + A) U = diag(b) (V - (exp(Gam) * K) S_0), A_ij = b_i k_i^T
  Diag(exp(Gam_i - Gam_j)) k_j for j < i; then O = (exp(Gam) * Q) S_0 + P U and
  S_L = exp(Gam_L) * S_0 + (exp(Gam_L - Gam) * K)^T U. Only the state crosses chunks."""
  B, T, H, K = q_BTHK.shape
  L = chunk
  C = -(-T // L)

  def blocks(x):   # [B, T, H, ...] -> [B, H, C, L, ...], zero-padded (b = 0, g = 0: no-op steps)
    x = jnp.pad(x, [(0, 0), (0, C * L - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, C, L, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, beta, g = map(blocks, (q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTHK))
  gam = jnp.cumsum(g, axis=3)                                           # [B, H, C, L, K]
  incl_LL = jnp.tril(jnp.ones((L, L), bool))
  strict_LL = jnp.tril(jnp.ones((L, L), bool), -1)
  diff = gam[..., :, None, :] - gam[..., None, :, :]                    # [B, H, C, L(i), L(j), K]
  decay = jnp.exp(jnp.where(incl_LL[..., None], diff, 0.0)) * incl_LL[..., None]
  A = beta[..., None] * jnp.einsum('...ik,...ijk,...jk->...ij', k, decay, k) * strict_LL
  P = jnp.einsum('...ik,...ijk,...jk->...ij', q, decay, k)
  eye = jnp.eye(L, dtype=A.dtype)
  solve = lambda rhs: solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
  w_v = solve(beta[..., None] * v)                                      # [B, H, C, L, V]
  w_k = solve(beta[..., None] * jnp.exp(gam) * k)                       # [B, H, C, L, K]
  q_dec = jnp.exp(gam) * q
  k_dec = jnp.exp(gam[..., -1:, :] - gam) * k
  a_last = jnp.exp(gam[..., -1, :])                                     # [B, H, C, K]

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
  if segment_ids_BT is not None:
    raise NotImplementedError('kda: document masking (model.document_mask) is not supported yet')
  q, k, v, beta, g = gates_and_inputs(p, x_BTD, cfg)
  o_BTHV = chunk_delta_rule(q, k, v, beta, g, cfg.kda_chunk)
  o_BTHV = rms_norm(o_BTHV, p['o_norm'], cfg.norm_eps) * jax.nn.sigmoid(dense(x_BTD, p['w_gate']))
  return dense(o_BTHV.astype(x_BTD.dtype), p['wo'], n_in=2), jnp.full((cfg.num_heads,), jnp.nan)


def flops_per_token(cfg, seq_len):
  D, H, N, L = cfg.d_model, cfg.num_heads, cfg.head_dim, min(cfg.kda_chunk, seq_len)
  proj = 2 * D * H * N * 5 + 2 * D * (H + N) + 2 * N * H * N          # q k v gate out, beta, decay
  conv = 2 * 3 * cfg.kda_conv * H * N
  # per head: A and P (L x L x K each), two L x L solves, P U, and four K x V state products
  core = 2 * H * (2 * L * N + 2 * L * N + L * N + 4 * N * N)
  return proj + conv + core


# --- decoding: the recurrent form, one token per row ---

CONVS = ('q', 'k', 'v')


def init_cache(cfg, batch, max_len, dtype):
  """The state S [B, H, K, V] (float32) and the last kda_conv - 1 inputs of each short convolution;
  memory independent of max_len."""
  del max_len
  H, N, W = cfg.num_heads, cfg.head_dim, cfg.kda_conv
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


KDA = Attention(specs, apply, flops_per_token, init_cache, decode)
