"""Naive references the tests check moejax against: written to be obviously right (one head, one
query, one token at a time; Python loops and full masks), never for speed, and sharing no code with
the library beyond parameter names. Test files import them from here, never from each other.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from conftest import numpy_init_params, tiny_model_dict, update_model

from moejax import moe
from moejax import router as router_lib
from moejax.attention import ATTENTIONS
from moejax.model_config import ModelConfig

# --- moe ---

T_SEQ, T_BATCH = 8, 2          # tokens are T_BATCH sequences of T_SEQ
T = T_SEQ * T_BATCH            # 16 tokens: divisible by 8 shards
TOL = dict(rtol=2e-5, atol=2e-6)
LOOSE_TOL = dict(rtol=5e-5, atol=5e-6)   # gradients: reductions in another order on some CPUs


def ref_scores(x_TD, router_DE, rcfg):
  """Router scores in float64; `rcfg` is a RouterConfig."""
  logits = np.asarray(x_TD, np.float64) @ np.asarray(router_DE, np.float64)
  if rcfg.score == 'sigmoid':
    return 1.0 / (1.0 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_choose(x_TD, router_DE, bias_E, rcfg):
  """Top-k experts per token (a python list of lists), chosen on scores + bias."""
  s = ref_scores(x_TD, router_DE, rcfg) + np.asarray(bias_E, np.float64)
  return [list(np.argsort(-s[t], kind='stable')[:rcfg.top_k]) for t in range(s.shape[0])]


def ref_moe(x_TD, router_DE, wg, wu, wd, chosen, rcfg, keep=None):
  """Per-token loop: y_t = sum_{e in chosen_t} w_te * SwiGLU_e(x_t). `keep[t][k]` False drops one."""
  ys = []
  for t in range(x_TD.shape[0]):
    xt = x_TD[t].astype(jnp.float32)
    logits = xt @ router_DE.astype(jnp.float32)
    s = jax.nn.sigmoid(logits) if rcfg.score == 'sigmoid' else jax.nn.softmax(logits)
    w = jnp.stack([s[e] for e in chosen[t]])
    if rcfg.norm_topk:
      w = w / jnp.sum(w)
    w = w * rcfg.routed_scaling
    y = jnp.zeros_like(xt)
    for k, e in enumerate(chosen[t]):
      if keep is not None and not keep[t][k]:
        continue
      h = jax.nn.silu(xt @ wg[e]) * (xt @ wu[e])
      y = y + w[k] * (h @ wd[e])
    ys.append(y)
  return jnp.stack(ys)


def ref_swiglu(x_TD, p):
  return jnp.stack([(jax.nn.silu(x @ p['w_gate']) * (x @ p['w_up'])) @ p['w_down'] for x in x_TD])


def ref_capacity_keep(chosen, C, num_experts):
  """Hand count: walk assignments token-major (k-minor); each expert keeps its first C."""
  seen = [0] * num_experts
  keep = []
  for t in range(len(chosen)):
    row = []
    for e in chosen[t]:
      row.append(seen[e] < C)
      seen[e] += 1
    keep.append(row)
  dropped = sum(max(0, c - C) for c in seen)
  return keep, dropped


def ref_capacity_keep_per_shard(chosen, C, num_experts, num_shards):
  """Capacity applies to each batch shard's tokens (GShard): the hand count run shard by shard."""
  n = len(chosen) // num_shards
  keep, dropped = [], 0
  for s in range(num_shards):
    k, d = ref_capacity_keep(chosen[s * n:(s + 1) * n], C, num_experts)
    keep += k
    dropped += d
  return keep, dropped


def make_moe_inputs(cfg, seed=0, scale=0.5):
  """(x_TD, router, wg, wu, wd), bias_E, r_TD for the ModelConfig `cfg`."""
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  ks = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(ks[0], (T, D))
  router = jax.random.normal(ks[1], (D, E)) * D ** -0.5
  wg = jax.random.normal(ks[2], (E, D, F)) * scale * D ** -0.5
  wu = jax.random.normal(ks[3], (E, D, F)) * scale * D ** -0.5
  wd = jax.random.normal(ks[4], (E, F, D)) * scale * F ** -0.5
  bias = jax.random.normal(ks[5], (E,)) * 0.1
  r = jax.random.normal(ks[6], (T, D))
  return (x, router, wg, wu, wd), bias, r


def batch_axes_of(mesh):
  return tuple(a for a in ('data', 'expert') if a in mesh.axis_names)


def lib_value_and_grad(cfg, mesh, bias, r):
  """jit: args -> (grads wrt (x, router, wg, wu, wd), (y, dropped, expert_TK, weight_TK))."""
  def f(args):
    x, router, wg, wu, wd = args
    routing = router_lib.route(x, router, bias, cfg.router, seq_len=T_SEQ)
    y, dropped = moe.routed_experts(x, routing, wg, wu, wd, cfg.dispatch, mesh, batch_axes_of(mesh))
    return jnp.sum(y * r), (y, dropped, routing.expert_TK, routing.weight_TK)
  return jax.jit(jax.grad(f, has_aux=True))


def ref_value_and_grad(chosen, rcfg, r, keep=None):
  def f(args):
    y = ref_moe(*args, chosen, rcfg, keep=keep)
    return jnp.sum(y * r), y
  return jax.grad(f, has_aux=True)



def simulate_ragged_all_to_all(rows_per_device: list, p: dict, num_rows: int) -> list:
  """numpy `ragged_all_to_all` following its documented pseudocode (for tests of `a2a.plan`):
  device src's rows [input_offsets[src, dst], + send_sizes[src, dst]) land in device dst's buffer at
  output_offsets[src, dst]; unwritten rows stay -1."""
  D = len(rows_per_device)
  out = [np.full(num_rows, -1, np.int64) for _ in range(D)]
  for src in range(D):
    for dst in range(D):
      start, size, at = (int(p[k][src, dst]) for k in ('input_offsets', 'send_sizes', 'output_offsets'))
      assert size == int(p['recv_sizes'][dst, src])
      out[dst][at:at + size] = rows_per_device[src][start:start + size]
  return out

# --- attention ---
# Every attention reference takes (p, x_BTD, a: AttentionConfig, segment_ids_BT=None) and returns
# y_BTD; with segment ids (packed documents), a position attends only within its own document.


def ref_rope(x_TN, theta):
  """Rotate-half RoPE at positions 0..T-1, frequencies theta^(-2i/N), i = 0..N/2-1."""
  n_pos, N = x_TN.shape
  freqs = np.array([theta ** (-2.0 * i / N) for i in range(N // 2)], np.float32)
  angle = np.arange(n_pos, dtype=np.float32)[:, None] * freqs[None, :]
  cos = jnp.asarray(np.concatenate([np.cos(angle)] * 2, -1))
  sin = jnp.asarray(np.concatenate([np.sin(angle)] * 2, -1))
  rotate_half = jnp.concatenate([-x_TN[:, N // 2:], x_TN[:, :N // 2]], -1)
  return x_TN * cos + rotate_half * sin


def ref_rms_norm(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def ref_segments(segment_ids_BT, b, T):
  """Row b's segment ids as numpy (one document when there are none)."""
  return np.zeros(T, int) if segment_ids_BT is None else np.asarray(segment_ids_BT)[b]


def ref_mask(T, window=None, seg_T=None):
  """[T, T] bool: key s is visible from query t (s <= t, within the window, same document)."""
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  mask = s <= t
  if window is not None:
    mask &= s > t - window
  if seg_T is not None:
    mask &= seg_T[:, None] == seg_T[None, :]
  return mask


def ref_head(q_TN, k_SN, v_SM, mask_TS, softcap=0.0, sink=None):
  """One head: softmax over the T x S scores (scaled by 1/sqrt(N), then soft-capped) where
  `mask_TS`, plus an optional sink logit that takes probability but gives no value; a row with no
  visible key gives zeros. Returns the output and the head's largest visible logit (before the cap)."""
  s = (q_TN @ k_SN.T) / np.sqrt(q_TN.shape[-1])
  s_max = jnp.max(jnp.where(mask_TS, s, -jnp.inf))
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask_TS, s, -jnp.inf)
  if sink is not None:
    s = jnp.concatenate([s, jnp.full((s.shape[0], 1), sink)], axis=1)
  probs = jax.nn.softmax(s, axis=-1)[:, :k_SN.shape[0]]
  probs = jnp.where(jnp.any(mask_TS, -1, keepdims=True), probs, 0.0)
  return probs @ v_SM, s_max


def ref_softmax(p, x_BTD, a, attention, segment_ids_BT=None):
  """GQA / MHA / SWA / MLA one head at a time, with QK-norm, sinks and soft-capping as `a` sets
  them; returns y_BTD and the largest logit per query head over the batch [H]. The kv head count
  is read from the params (MHA's is num_heads)."""
  H, T = a.num_heads, x_BTD.shape[1]
  window = a.window if attention == 'swa' else None
  ys, maxes = [], []
  for b in range(x_BTD.shape[0]):
    x, y, m = x_BTD[b], 0.0, []
    mask = ref_mask(T, window, None if segment_ids_BT is None else ref_segments(segment_ids_BT, b, T))
    if attention == 'mla':
      Nn, C, Q = a.mla.qk_nope_head_dim, a.mla.kv_lora_rank, a.mla.q_lora_rank
      align = lambda rank: np.sqrt(a.d_model / rank) if a.variance_alignment else 1.0
      kv_a = x @ p['wkv_a']
      latent = ref_rms_norm(kv_a[:, :C], p['kv_norm'], a.norm_eps) * align(C)
      k_rope = ref_rope(kv_a[:, C:], a.rope_theta)                      # shared by every head
      q_in = ref_rms_norm(x @ p['wq_a'], p['q_norm'], a.norm_eps) * align(Q) if Q else x
    for h in range(H):
      if attention == 'mla':
        q = q_in @ (p['wq_b'] if Q else p['wq'])[:, h]
        q = jnp.concatenate([q[:, :Nn], ref_rope(q[:, Nn:], a.rope_theta)], -1)
        kv = latent @ p['wkv_b'][:, h]
        k, v, sink = jnp.concatenate([kv[:, :Nn], k_rope], -1), kv[:, Nn:], None
      else:
        g = h // (H // p['wk'].shape[1])   # query heads [g*H/G, (g+1)*H/G) read kv head g
        q, k, v = x @ p['wq'][:, h], x @ p['wk'][:, g], x @ p['wv'][:, g]
        if a.qk_norm:
          q, k = ref_rms_norm(q, p['q_norm'], a.norm_eps), ref_rms_norm(k, p['k_norm'], a.norm_eps)
        q, k = ref_rope(q, a.rope_theta), ref_rope(k, a.rope_theta)
        sink = p['sinks'][h] if a.sinks else None
      o, s_max = ref_head(q, k, v, mask, a.softcap, sink)
      y = y + o @ p['wo'][h]
      m.append(s_max)
    ys.append(y)
    maxes.append(jnp.stack(m))
  return jnp.stack(ys), jnp.max(jnp.stack(maxes), axis=0)


def ref_causal_conv(x_TN, w_WN, seg_T=None):
  """y_t = sum_i w[W-1-i] x_{t-i}, over the taps within t's document."""
  W, T = w_WN.shape[0], x_TN.shape[0]
  seg = np.zeros(T, int) if seg_T is None else seg_T
  return jnp.stack([sum(w_WN[W - 1 - i] * x_TN[t - i] for i in range(W) if t - i >= 0 and seg[t - i] == seg[t])
                    for t in range(T)])


def ref_kda(p, x_BTD, a, segment_ids_BT=None):
  """Token by token: S_t = (I - b k k^T) Diag(alpha) S_{t-1} + b k v^T, o_t = S_t^T q_t, with
  S_{t-1} = 0 at a document's first position."""
  H, N, T = a.num_heads, a.head_dim, x_BTD.shape[1]
  unit = lambda z: z / jnp.sqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6)
  out = []
  for b in range(x_BTD.shape[0]):
    x, y = x_BTD[b], 0.0
    seg = ref_segments(segment_ids_BT, b, T)
    reset = np.concatenate([[True], seg[1:] != seg[:-1]])
    for h in range(H):
      q = unit(jax.nn.silu(ref_causal_conv(x @ p['wq'][:, h], p['conv_q'][:, h], seg))) / np.sqrt(N)
      k = unit(jax.nn.silu(ref_causal_conv(x @ p['wk'][:, h], p['conv_k'][:, h], seg)))
      v = jax.nn.silu(ref_causal_conv(x @ p['wv'][:, h], p['conv_v'][:, h], seg))
      beta = jax.nn.sigmoid(x @ p['w_beta'][:, h])
      decay_in = (x @ p['wa_down']) @ p['wa_up'][:, h] + p['dt_bias'][h]
      alpha = jnp.exp(-jnp.exp(p['a_log'][h]) * jax.nn.softplus(decay_in))

      def step(S, token):
        q_t, k_t, v_t, b_t, a_t, r_t = token
        S = jnp.where(r_t, 0.0, S)
        S = (jnp.eye(N) - b_t * jnp.outer(k_t, k_t)) @ jnp.diag(a_t) @ S + b_t * jnp.outer(k_t, v_t)
        return S, S.T @ q_t

      _, o = jax.lax.scan(step, jnp.zeros((N, N)), (q, k, v, beta, alpha, reset))
      o = ref_rms_norm(o, p['o_norm'], a.norm_eps) * jax.nn.sigmoid(x @ p['w_gate'][:, h])
      y = y + o @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


NSA_BRANCHES = ('cmp', 'slc', 'win')   # the order of NSA's gate outputs


def ref_nsa(p, x_BTD, a, segment_ids_BT=None, branch=None):
  """Per query: cmp blocks ending at or before t; slc = first + own block + best-scored blocks
  (cmp probabilities summed over overlapping cmp blocks and the group's heads); a window; the
  gated sum (or one branch's output per head, before `wo`, summed through `wo`).
  With documents: cmp blocks wholly in t's document; slc blocks from the one holding the
  document's first position (forced) to t's own, keys of t's document only; window likewise."""
  H, G, N, T = a.num_heads, a.num_kv_heads, a.head_dim, x_BTD.shape[1]
  l, d, ls, n, w = a.nsa.block, a.nsa.stride, a.nsa.select_block, a.nsa.num_selected, a.window
  J, K = (T - l) // d + 1, -(-T // ls)
  overlap = np.array([[len(set(range(j * d, j * d + l)) & set(range(k * ls, (k + 1) * ls))) > 0
                       for k in range(K)] for j in range(J)], np.float32)
  pos = np.arange(T)
  out = []
  for b in range(x_BTD.shape[0]):
    x, y = x_BTD[b], 0.0
    seg = ref_segments(segment_ids_BT, b, T)
    for g in range(G):
      heads = range(g * (H // G), (g + 1) * (H // G))
      q = {h: ref_rope(x @ p['wq'][:, h], a.rope_theta) for h in heads}
      k = {br: ref_rope(x @ p[f'wk_{br}'][:, g], a.rope_theta) for br in NSA_BRANCHES}
      v = {br: x @ p[f'wv_{br}'][:, g] for br in NSA_BRANCHES}
      mlp = lambda blk, kind: (jax.nn.silu(jnp.einsum('ln,lnf->f', blk + p['cmp_pos'], p[f'cmp_{kind}1']))
                               @ p[f'cmp_{kind}2'])
      kc = jnp.stack([mlp(k['cmp'][j * d:j * d + l], 'k') for j in range(J)])
      vc = jnp.stack([mlp(v['cmp'][j * d:j * d + l], 'v') for j in range(J)])
      o = {h: [] for h in heads}
      for t in range(T):
        doc = seg == seg[t]
        start = int(np.argmax(doc))                             # the document's first position
        valid_j = (np.arange(J) * d + l - 1 <= t) & np.array([doc[j * d:j * d + l].all() for j in range(J)])
        score = 0.0
        o_cmp = {}
        for h in heads:
          if valid_j.any():
            pc = jax.nn.softmax(jnp.where(valid_j, kc @ q[h][t] / np.sqrt(N), -jnp.inf))
            pc = jnp.where(valid_j, pc, 0.0)
          else:
            pc = jnp.zeros(J)
          o_cmp[h] = pc @ vc
          score = score + pc @ overlap
        causal_k = (np.arange(K) * ls <= t) & (np.arange(K) >= start // ls)
        forced = (np.arange(K) == start // ls) | (np.arange(K) == t // ls)
        score = jnp.where(forced, jnp.inf, jnp.where(causal_k, score, -jnp.inf))
        chosen = jnp.argsort(-score)[:n]
        selected_K = jnp.zeros(K, bool).at[chosen].set(True) & causal_k
        slc_mask = selected_K[pos // ls] & (pos <= t) & doc
        win_mask = (pos <= t) & (pos > t - w) & doc
        for h in heads:
          br = {'cmp': o_cmp[h],
                'slc': ref_head(q[h][t:t + 1], k['slc'], v['slc'], slc_mask[None])[0][0],
                'win': ref_head(q[h][t:t + 1], k['win'], v['win'], win_mask[None])[0][0]}
          if branch:
            o[h].append(br[branch])
          else:
            gate = jax.nn.sigmoid(x[t] @ p['w_gate'][:, h])
            o[h].append(sum(gate[i] * br[name] for i, name in enumerate(NSA_BRANCHES)))
      for h in heads:
        y = y + jnp.stack(o[h]) @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def _softmax_reference(attention):
  return lambda p, x_BTD, a, segment_ids_BT=None: ref_softmax(p, x_BTD, a, attention, segment_ids_BT)[0]


# attention type -> its naive reference (p, x_BTD, a, segment_ids_BT=None) -> y_BTD
ATTENTION_REFERENCES = {**{n: _softmax_reference(n) for n in ('gqa', 'mha', 'swa', 'mla')},
                        'kda': ref_kda, 'nsa': ref_nsa}

# Small shapes (config.model overrides) the attention references run on quickly; T is per test.
SMALL_ATTENTION = dict(d_model=16, attn=dict(num_heads=2, num_kv_heads=1, window=3),
                       nsa=dict(block=4, stride=2, select_block=4, num_selected=2),
                       kda=dict(chunk=4, conv=3))


PERTURBED = ('norm', 'sinks', 'bias', 'a_log', "['bq']", "['bk']", "['bv']")   # zeros/ones inits


def attention_problem(attention, T, batch=2, seed=0, shapes=SMALL_ATTENTION, **overrides):
  """One attention layer to check: the AttentionConfig of the tiny model with `shapes`, then
  `overrides` (config.model overrides; a dict updates its group) and init_std 0.3; its params, with
  the ones/zeros inits (norm scales, sinks, biases, decay logs) perturbed so that a test sees them
  used; inputs x_BTD and a cotangent r_BTD (for gradients of sum(y * r))."""
  m = update_model(tiny_model_dict(attention=attention, init_std=0.3), shapes)
  a = ModelConfig.from_config(update_model(m, overrides)).attn
  p = numpy_init_params(ATTENTIONS[attention].specs(a), seed)
  p = jax.tree_util.tree_map_with_path(
      lambda path, w: w + 0.3 * jax.random.normal(jax.random.key(9), w.shape)
      if any(n in jax.tree_util.keystr(path) for n in PERTURBED) else w, p)
  kx, kr = jax.random.split(jax.random.key(seed + 1))
  return (a, p, jax.random.normal(kx, (batch, T, a.d_model)),
          jax.random.normal(kr, (batch, T, a.d_model)))


# --- softmax attention against the naive reference ---

DOC_SEGMENTS = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 12], np.int32)   # 3 documents, and 1 (T = 12)


def grad_and_output(fn, p, x, r):
  """jit: the gradients of sum(y * r) w.r.t. (p, x), and fn(p, x) (y, or a tuple starting with y)."""
  def f(p, x):
    out = fn(p, x)
    return jnp.sum((out[0] if isinstance(out, tuple) else out) * r), out
  return jax.jit(jax.grad(f, (0, 1), has_aux=True))(p, x)


def assert_softmax_matches_reference(a_lib, a_ref, attention, p, x, r, segments=None):
  """ATTENTIONS[attention] with config a_lib against ref_softmax with a_ref: output, gradient, max logit."""
  g_lib, (y_lib, m_lib) = grad_and_output(lambda p, x: ATTENTIONS[attention].apply(p, x, a_lib, segments), p, x, r)
  g_ref, (y_ref, m_ref) = grad_and_output(lambda p, x: ref_softmax(p, x, a_ref, attention, segments), p, x, r)
  assert float(jnp.std(y_ref)) > 1e-2
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **LOOSE_TOL)
  assert m_lib.shape == (a_lib.num_heads,)
  chex.assert_trees_all_close(m_lib, m_ref, **TOL)
