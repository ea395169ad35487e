"""NSA: DeepSeek native sparse attention (Yuan et al., 2025), training form.

Three branches, each with its own keys and values, mixed by per-head sigmoid gates:
  cmp  keys/values of blocks of l tokens (stride d), compressed by a learned MLP with an
       intra-block position embedding; a query reads the blocks that end at or before it;
  slc  the top-n blocks of l' tokens ranked by the cmp attention probabilities (summed over the
       overlap of cmp and slc blocks and over the query heads of a GQA group, so a group shares
       its blocks); the first block and the query's own block are always taken;
  win  a sliding window of the latest `window` tokens.
With segment ids (packed documents), a query reads only its own document: a cmp block only if the
whole block lies in it, slc keys token by token (the forced first block is the first block of the
query's document, and blocks wholly before the document are never selected), win keys by the
window's document mask.
The slc branch gathers n * l' keys per query, so every branch costs O(T) per query or less except
cmp (O(T / d)). Axis letters: B batch, T positions, D model, G kv heads, H query heads per kv
head, N head dim, J cmp blocks, K slc blocks, I selected blocks (n), S keys.
"""
import jax
import jax.numpy as jnp
import numpy as np

from moejax.attention.core import (Attention, cache_write, logit_max, masked_softmax, ring_attention,
                                   ring_cache, sliding_window_attention)
from moejax.layers import dense, rope
from moejax.params import ParamSpec

BRANCHES = ('cmp', 'slc', 'win')


def specs(cfg):
  D, H, G, N, l = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.nsa.block
  s, out = cfg.init_std, cfg.out_std
  kv = lambda: ParamSpec((D, G, N), ('embed', 'kv_heads', 'head_dim'), scale=s)
  sp = {'wq': ParamSpec((D, H, N), ('embed', 'heads', 'head_dim'), scale=s),
        'w_gate': ParamSpec((D, H, 3), ('embed', 'heads', None), scale=s),
        'wo': ParamSpec((H, N, D), ('heads', 'head_dim', 'embed'), scale=out),
        'cmp_pos': ParamSpec((l, N), (None, 'head_dim'), scale=s)}
  for b in BRANCHES:
    sp[f'wk_{b}'], sp[f'wv_{b}'] = kv(), kv()
  for kind in ('k', 'v'):   # compression MLP: l*N -> N (hidden N), shared by the kv heads
    sp[f'cmp_{kind}1'] = ParamSpec((l, N, N), (None, 'head_dim', None), scale=(l * N) ** -0.5)
    sp[f'cmp_{kind}2'] = ParamSpec((N, N), (None, 'head_dim'), scale=N ** -0.5)
  return sp


def num_cmp_blocks(T: int, l: int, d: int) -> int:
  return (T - l) // d + 1 if T >= l else 0


def compress(x_BTGN, pos_lN, w1_lNF, w2_FN, l: int, d: int):
  """Block j = positions [j d, j d + l) -> one vector per kv head: [B, J, G, N]."""
  J = num_cmp_blocks(x_BTGN.shape[1], l, d)
  idx_Jl = np.arange(J)[:, None] * d + np.arange(l)[None, :]
  blocks = x_BTGN[:, idx_Jl] + pos_lN[None, None, :, None, :]          # [B, J, l, G, N]
  h = jax.nn.silu(jnp.einsum('bjlgn,lnf->bjgf', blocks, w1_lNF))
  return jnp.einsum('bjgf,fn->bjgn', h, w2_FN)


def overlap_JK(T: int, l: int, d: int, l_sel: int) -> np.ndarray:
  """1 where cmp block j and slc block k share a position (maps cmp scores onto slc blocks)."""
  J, K = num_cmp_blocks(T, l, d), -(-T // l_sel)
  start_J, start_K = np.arange(J) * d, np.arange(K) * l_sel
  return ((start_J[:, None] < start_K[None, :] + l_sel) &
          (start_K[None, :] < start_J[:, None] + l)).astype(np.float32)


def doc_start(segment_ids_BT):
  """The first position of each position's document, [B, T] (0 everywhere without segment ids;
  documents are contiguous)."""
  if segment_ids_BT is None:
    return 0
  T = segment_ids_BT.shape[1]
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=1)


def branches(p, x_BTD, cfg, segment_ids_BT=None):
  """The three branch outputs o_BTGHN by name, before gating, and the largest logit per query
  head over the three branches. With segment ids, every branch stays within the query's document."""
  B, T, _ = x_BTD.shape
  G, N = cfg.num_kv_heads, cfg.head_dim
  l, d, l_sel, n = cfg.nsa.block, cfg.nsa.stride, cfg.nsa.select_block, cfg.nsa.num_selected
  q = rope(dense(x_BTD, p['wq']), cfg).reshape(B, T, G, -1, N)
  k = {b: rope(dense(x_BTD, p[f'wk_{b}']), cfg) for b in BRANCHES}
  v = {b: dense(x_BTD, p[f'wv_{b}']) for b in BRANCHES}
  t_T = jnp.arange(T)
  out, maxes = {}, []

  # compressed branch
  J = num_cmp_blocks(T, l, d)
  if J:
    kc_BJGN = compress(k['cmp'], p['cmp_pos'], p['cmp_k1'], p['cmp_k2'], l, d)
    vc_BJGN = compress(v['cmp'], p['cmp_pos'], p['cmp_v1'], p['cmp_v2'], l, d)
    s = jnp.einsum('btghn,bjgn->bghtj', q, kc_BJGN).astype(jnp.float32) * N ** -0.5
    ends_J = jnp.arange(J) * d + l - 1
    mask_BTJ = jnp.broadcast_to(ends_J[None, :] <= t_T[:, None], (B, T, J))
    if segment_ids_BT is not None:
      # a block that ends by t lies wholly in t's document iff its first position does (contiguity)
      seg_start_BJ = segment_ids_BT[:, np.arange(J) * d]
      mask_BTJ = mask_BTJ & (seg_start_BJ[:, None, :] == segment_ids_BT[:, :, None])
    mask_BGHTJ = mask_BTJ[:, None, None]
    p_cmp = masked_softmax(s, mask_BGHTJ)                               # [B, G, H, T, J]
    maxes.append(logit_max(s, mask_BGHTJ, (1, 2)))
    out['cmp'] = jnp.einsum('bghtj,bjgn->btghn', p_cmp.astype(vc_BJGN.dtype), vc_BJGN)
    score_BGTK = jnp.einsum('bghtj,jk->bgtk', p_cmp, jnp.asarray(overlap_JK(T, l, d, l_sel)))
  else:
    out['cmp'] = jnp.zeros_like(q)
    score_BGTK = jnp.zeros((B, G, T, -(-T // l_sel)), jnp.float32)

  # selected branch: top-n slc blocks per (query, kv group) among the blocks from the query's
  # document's first block to its own block; those two are always taken
  K = score_BGTK.shape[-1]
  blk_K = jnp.arange(K)
  first_BT1 = jnp.broadcast_to(doc_start(segment_ids_BT) // l_sel, (B, T))[..., None]
  own_TK = blk_K[None, :] == (t_T // l_sel)[:, None]
  allowed_BTK = (blk_K[None, :] * l_sel <= t_T[:, None]) & (blk_K >= first_BT1)
  forced_BTK = (blk_K == first_BT1) | own_TK
  score_BGTK = jnp.where(forced_BTK[:, None], jnp.inf,
                         jnp.where(allowed_BTK[:, None], jax.lax.stop_gradient(score_BGTK), -jnp.inf))
  top_BGTI, idx_BGTI = jax.lax.top_k(score_BGTK, min(n, K))
  ks_BGKlN = jnp.moveaxis(_pad_blocks(k['slc'], K, l_sel), 3, 1)       # [B, G, K, l', N]
  vs_BGKlN = jnp.moveaxis(_pad_blocks(v['slc'], K, l_sel), 3, 1)
  b_ix, g_ix = jnp.arange(B)[:, None, None, None], jnp.arange(G)[None, :, None, None]
  kg, vg = ks_BGKlN[b_ix, g_ix, idx_BGTI], vs_BGKlN[b_ix, g_ix, idx_BGTI]   # [B, G, T, I, l', N]
  s = jnp.einsum('btghn,bgtisn->bghtis', q, kg).astype(jnp.float32) * N ** -0.5
  pos_BGTIS = idx_BGTI[..., None] * l_sel + jnp.arange(l_sel)
  mask = (top_BGTI > -jnp.inf)[..., None] & (pos_BGTIS <= t_T[:, None, None])
  if segment_ids_BT is not None:   # token level: the first block may start in an earlier document
    seg_BKl = _pad_blocks(segment_ids_BT[..., None, None], K, l_sel)[..., 0, 0]
    mask = mask & (seg_BKl[b_ix, idx_BGTI] == segment_ids_BT[:, None, :, None, None])
  mask = mask[:, :, None]                                               # [B, G, 1, T, I, l']
  probs = masked_softmax(s.reshape(*s.shape[:4], -1), mask.reshape(*mask.shape[:4], -1)).reshape(s.shape)
  out['slc'] = jnp.einsum('bghtis,bgtisn->btghn', probs.astype(vg.dtype), vg)
  maxes.append(logit_max(s, mask, (1, 2)))

  out['win'], win_max = sliding_window_attention(q, k['win'], v['win'], cfg.window, segment_ids_BT)
  return out, jnp.max(jnp.stack(maxes + [win_max]), axis=0)


def _pad_blocks(x_BTGN, K: int, l_sel: int):
  x = jnp.pad(x_BTGN, ((0, 0), (0, K * l_sel - x_BTGN.shape[1]), (0, 0), (0, 0)))
  return x.reshape(x.shape[0], K, l_sel, *x.shape[2:])


def apply(p, x_BTD, cfg, segment_ids_BT=None):
  B, T, _ = x_BTD.shape
  o, logit_max_H = branches(p, x_BTD, cfg, segment_ids_BT)
  gate = jax.nn.sigmoid(dense(x_BTD, p['w_gate'])).reshape(B, T, cfg.num_kv_heads, -1, 3)
  o_BTGHN = sum(gate[..., i, None].astype(o[b].dtype) * o[b] for i, b in enumerate(BRANCHES))
  return dense(o_BTGHN.reshape(B, T, -1, cfg.head_dim), p['wo'], n_in=2), logit_max_H


def flops_per_token(cfg, seq_len):
  D, H, G, N = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  l, d = cfg.nsa.block, cfg.nsa.stride
  proj = 2 * D * N * (2 * H + 6 * G) + 2 * D * H * 3
  compress_ = 2 * 2 * G * (l * N * N + N * N) / d          # one k and one v block every d tokens
  keys = num_cmp_blocks(seq_len, l, d) / 2 + min(cfg.nsa.num_selected * cfg.nsa.select_block, seq_len) \
      + min(cfg.window, seq_len)
  return proj + compress_ + 4 * H * N * keys


# --- decoding: one token per row against a cache ---

def init_cache(cfg, batch, max_len, dtype):
  """Per branch: cmp  the latest l raw keys/values (a ring; a block is compressed when it
  completes) and the compressed keys/values of every block [B, J, G, N];  slc  the raw keys/values
  of every position, padded to whole selection blocks;  win  a ring of the latest `window`."""
  G, N, l, d, l_sel = cfg.num_kv_heads, cfg.head_dim, cfg.nsa.block, cfg.nsa.stride, cfg.nsa.select_block
  zeros = lambda S: jnp.zeros((batch, S, G, N), dtype)
  J, K = num_cmp_blocks(max_len, l, d), -(-max_len // l_sel)
  cache = {'slc': {'k': zeros(K * l_sel), 'v': zeros(K * l_sel)},
           'win': ring_cache(batch, cfg.window, max_len, G, N, dtype)}
  if J:
    cache['cmp'] = {'k': zeros(l), 'v': zeros(l), 'kc': zeros(J), 'vc': zeros(J)}
  return cache


def _compress_step(c, k_BGN, v_BGN, pos, p, cfg):
  """Writes this position into the cmp ring; when it ends block j (pos = j d + l - 1), stores the
  block's compressed key and value at j."""
  l, d = cfg.nsa.block, cfg.nsa.stride
  c = {**c, 'k': cache_write(c['k'], k_BGN, pos % l), 'v': cache_write(c['v'], v_BGN, pos % l)}
  start = pos - l + 1
  ring_l = (start + jnp.arange(l)) % l                               # block positions in order
  j = jnp.clip(start // d, 0, c['kc'].shape[1] - 1)
  complete = (start >= 0) & (start % d == 0)
  for kind in ('k', 'v'):
    new_BGN = compress(c[kind][:, ring_l], p['cmp_pos'], p[f'cmp_{kind}1'], p[f'cmp_{kind}2'], l, d)[:, 0]
    old_BGN = jax.lax.dynamic_index_in_dim(c[f'{kind}c'], j, 1, keepdims=False)
    c[f'{kind}c'] = cache_write(c[f'{kind}c'], jnp.where(complete, new_BGN, old_BGN), j)
  return c


def decode(p, x_BD, cache, pos, cfg):
  """The three branches for one query per row, as in `branches` at position pos."""
  B = x_BD.shape[0]
  G, N, l, d = cfg.num_kv_heads, cfg.head_dim, cfg.nsa.block, cfg.nsa.stride
  l_sel, n = cfg.nsa.select_block, cfg.nsa.num_selected
  x_B1D = x_BD[:, None]
  q = rope(dense(x_B1D, p['wq']), cfg, pos).reshape(B, G, -1, N)
  k = {b: rope(dense(x_B1D, p[f'wk_{b}']), cfg, pos)[:, 0] for b in BRANCHES}
  v = {b: dense(x_B1D, p[f'wv_{b}'])[:, 0] for b in BRANCHES}
  cache, out = dict(cache), {}
  K = cache['slc']['k'].shape[1] // l_sel

  # compressed branch: the blocks completed at or before pos
  if 'cmp' in cache:
    c = cache['cmp'] = _compress_step(cache['cmp'], k['cmp'], v['cmp'], pos, p, cfg)
    J = c['kc'].shape[1]
    s = jnp.einsum('bghn,bjgn->bghj', q, c['kc']).astype(jnp.float32) * N ** -0.5
    p_cmp = masked_softmax(s, jnp.arange(J) * d + l - 1 <= pos)          # [B, G, H, J]
    out['cmp'] = jnp.einsum('bghj,bjgn->bghn', p_cmp.astype(c['vc'].dtype), c['vc'])
    overlap = overlap_JK(K * l_sel, l, d, l_sel)[:J]   # row j depends on j alone
    score_BGK = jnp.einsum('bghj,jk->bgk', p_cmp, jnp.asarray(overlap))
  else:
    out['cmp'] = jnp.zeros_like(q)
    score_BGK = jnp.zeros((B, G, K), jnp.float32)

  # selected branch: the top-n slc blocks of this query's group
  slc = cache['slc'] = {kind: cache_write(cache['slc'][kind], x, pos) for kind, x in
                        (('k', k['slc']), ('v', v['slc']))}
  blk_K = jnp.arange(K)
  forced_K = (blk_K == 0) | (blk_K == pos // l_sel)
  score_BGK = jnp.where(forced_K, jnp.inf, jnp.where(blk_K * l_sel <= pos, score_BGK, -jnp.inf))
  top_BGI, idx_BGI = jax.lax.top_k(score_BGK, min(n, K))
  ks_BGKlN, vs_BGKlN = (jnp.moveaxis(slc[kind].reshape(B, K, l_sel, G, N), 3, 1) for kind in 'kv')
  b_ix, g_ix = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
  kg, vg = ks_BGKlN[b_ix, g_ix, idx_BGI], vs_BGKlN[b_ix, g_ix, idx_BGI]     # [B, G, I, l', N]
  s = jnp.einsum('bghn,bgisn->bghis', q, kg).astype(jnp.float32) * N ** -0.5
  mask = (top_BGI > -jnp.inf)[..., None] & (idx_BGI[..., None] * l_sel + jnp.arange(l_sel) <= pos)
  probs = masked_softmax(s.reshape(*s.shape[:3], -1), mask.reshape(B, G, 1, -1)).reshape(s.shape)
  out['slc'] = jnp.einsum('bghis,bgisn->bghn', probs.astype(vg.dtype), vg)

  out['win'], cache['win'] = ring_attention(q, k['win'], v['win'], cache['win'], pos)
  gate = jax.nn.sigmoid(dense(x_BD, p['w_gate'])).reshape(B, G, -1, 3)
  o_BGHN = sum(gate[..., i, None].astype(out[b].dtype) * out[b] for i, b in enumerate(BRANCHES))
  return dense(o_BGHN.reshape(B, -1, N), p['wo'], n_in=2), cache


# Its compressed keys pass through an MLP, so rescaling the key projections would not rescale its
# logits: no QK-clip.
NSA = Attention(specs, apply, flops_per_token, init_cache, decode)
