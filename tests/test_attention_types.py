"""Tests for the MHA, SWA, NSA and KDA attention types against naive references written here
(full T x T masked softmax per head and per query; token-by-token recurrence for KDA), forward and
gradient; causality; KDA chunk-size invariance; NSA's selected branch with full coverage; hybrid
per-layer patterns; document masking (segment ids) for every type."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config
from test_attention import ref_causal_attention, ref_gqa, ref_rms_norm, ref_rope

from moejax import model, params
from moejax.attention import ATTENTIONS, nsa
from moejax.layers import swiglu, rms_norm

B = 2
TOL = dict(rtol=5e-5, atol=5e-6)
SHAPES = dict(d_model=16, num_heads=2, num_kv_heads=1, window=3, nsa_block=4, nsa_stride=2, nsa_select_block=4, nsa_num_selected=2,
              kda_chunk=4, kda_conv=3)


def setup(attention, T, seed=0, batch=B, **overrides):
  cfg = tiny_model_config(attention=attention, init_std=0.3, **{**SHAPES, **overrides})
  p = numpy_init_params(ATTENTIONS[attention].specs(cfg), seed)
  # Perturb the ones/zeros initialisations (norm scales, biases) so that the test sees them used.
  p = jax.tree_util.tree_map_with_path(
      lambda path, w: w + 0.2 * jax.random.normal(jax.random.key(9), w.shape)
      if any(n in jax.tree_util.keystr(path) for n in ('norm', 'bias', 'a_log')) else w, p)
  kx, kr = jax.random.split(jax.random.key(seed + 1))
  return cfg, p, jax.random.normal(kx, (batch, T, cfg.d_model)), jax.random.normal(kr, (batch, T, cfg.d_model))


# ----------------------------------------------------------------------------- naive references

def ref_masked_attention(q_TN, k_SN, v_SM, mask_TS):
  s = jnp.where(mask_TS, (q_TN @ k_SN.T) / np.sqrt(q_TN.shape[-1]), -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.where(mask_TS.any(-1, keepdims=True), p, 0.0) @ v_SM


def ref_swa(p, x_BTD, cfg):
  T = x_BTD.shape[1]
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  mask = (s <= t) & (s > t - cfg.window)
  H, G = cfg.num_heads, cfg.num_kv_heads
  out = []
  for b in range(x_BTD.shape[0]):
    x, y = x_BTD[b], 0.0
    for h in range(H):
      g = h // (H // G)
      q = ref_rope(x @ p['wq'][:, h], cfg.rope_theta)
      k = ref_rope(x @ p['wk'][:, g], cfg.rope_theta)
      y = y + ref_masked_attention(q, k, x @ p['wv'][:, g], mask) @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def ref_segments(segment_ids_BT, b, T):
  """Row b's segment ids as numpy (one document when there are none)."""
  return np.zeros(T, int) if segment_ids_BT is None else np.asarray(segment_ids_BT)[b]


def ref_causal_conv(x_TN, w_WN, seg_T=None):
  """Taps only within t's document."""
  W, T = w_WN.shape[0], x_TN.shape[0]
  seg = np.zeros(T, int) if seg_T is None else seg_T
  return jnp.stack([sum(w_WN[W - 1 - i] * x_TN[t - i] for i in range(W) if t - i >= 0 and seg[t - i] == seg[t])
                    for t in range(T)])


def ref_kda(p, x_BTD, cfg, segment_ids_BT=None):
  """Token-by-token: S_t = (I - b k k^T) Diag(a) S_{t-1} + b k v^T, o_t = S_t^T q_t; S_{t-1} = 0
  at a document's first position."""
  H, N, T = cfg.num_heads, cfg.head_dim, x_BTD.shape[1]
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
      alpha = jnp.exp(-jnp.exp(p['a_log'][h]) * jax.nn.softplus((x @ p['wa_down']) @ p['wa_up'][:, h] + p['dt_bias'][h]))
      def step(S, qkvbar):   # one token
        q_t, k_t, v_t, b_t, a_t, r_t = qkvbar
        S = jnp.where(r_t, 0.0, S)
        S = (jnp.eye(N) - b_t * jnp.outer(k_t, k_t)) @ jnp.diag(a_t) @ S + b_t * jnp.outer(k_t, v_t)
        return S, S.T @ q_t
      _, o = jax.lax.scan(step, jnp.zeros((N, N)), (q, k, v, beta, alpha, reset))
      o = ref_rms_norm(o, p['o_norm'], cfg.norm_eps) * jax.nn.sigmoid(x @ p['w_gate'][:, h])
      y = y + o @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def ref_nsa(p, x_BTD, cfg, branch=None, segment_ids_BT=None):
  """Per query: cmp blocks ending at or before t; slc = first + own block + best-scored blocks
  (cmp probabilities summed over overlapping cmp blocks and the group's heads); a window.
  With documents: cmp blocks wholly in t's document; slc blocks from the one holding the
  document's first position (forced) to t's own, keys of t's document only; window likewise."""
  H, G, N, T = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, x_BTD.shape[1]
  l, d, ls, n, w = cfg.nsa_block, cfg.nsa_stride, cfg.nsa_select_block, cfg.nsa_num_selected, cfg.window
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
      q = {h: ref_rope(x @ p['wq'][:, h], cfg.rope_theta) for h in heads}
      k = {br: ref_rope(x @ p[f'wk_{br}'][:, g], cfg.rope_theta) for br in nsa.BRANCHES}
      v = {br: x @ p[f'wv_{br}'][:, g] for br in nsa.BRANCHES}
      mlp = lambda blk, kind: jax.nn.silu(jnp.einsum('ln,lnf->f', blk + p['cmp_pos'], p[f'cmp_{kind}1'])) @ p[f'cmp_{kind}2']
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
                'slc': ref_masked_attention(q[h][t:t + 1], k['slc'], v['slc'], slc_mask[None])[0],
                'win': ref_masked_attention(q[h][t:t + 1], k['win'], v['win'], win_mask[None])[0]}
          if branch:
            o[h].append(br[branch])
          else:
            gate = jax.nn.sigmoid(x[t] @ p['w_gate'][:, h])
            o[h].append(sum(gate[i] * br[name] for i, name in enumerate(nsa.BRANCHES)))
      for h in heads:
        y = y + jnp.stack(o[h]) @ p['wo'][h]
    out.append(y)
  return jnp.stack(out)


def ref_mha(p, x_BTD, cfg):
  return ref_gqa(p, x_BTD, tiny_model_config(**{**cfg, 'num_kv_heads': cfg.num_heads}))


# (attention, T, config overrides, reference): T is not a multiple of the window/chunk on purpose.
CASES = {
    'mha': ('mha', 6, {}, ref_mha),   # num_kv_heads (1) is ignored: every query head has its own kv
    'swa': ('swa', 11, {}, ref_swa),
    'swa_wide_window': ('swa', 7, {'window': 16}, ref_swa),
    'kda': ('kda', 10, {}, ref_kda),
    'nsa': ('nsa', 11, {}, ref_nsa),
}


@pytest.mark.parametrize('case', list(CASES))
def test_attention_type_forward_and_grad_match_naive_reference(case):
  attention, T, overrides, ref_fn = CASES[case]
  cfg, p, x, r = setup(attention, T, batch=1, **overrides)

  def lib(p, x):
    y = ATTENTIONS[attention].apply(p, x, cfg)[0]
    return jnp.sum(y * r), y

  def ref(p, x):
    y = ref_fn(p, x, cfg)
    return jnp.sum(y * r), y

  g_lib, y_lib = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(p, x)
  g_ref, y_ref = jax.jit(jax.grad(ref, (0, 1), has_aux=True))(p, x)
  assert float(jnp.std(y_ref)) > 1e-2
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


@pytest.mark.parametrize('attention', ['mha', 'swa', 'nsa', 'kda'])
def test_attention_type_output_at_t_has_exactly_zero_gradient_wrt_inputs_after_t(attention):
  T = 9
  cfg, p, x, _ = setup(attention, T, seed=3)
  jac = np.asarray(jax.jit(jax.jacrev(lambda x: ATTENTIONS[attention].apply(p, x, cfg)[0]))(x))
  for b in range(B):
    for t in range(T):
      assert np.all(jac[b, t, :, b, t + 1:, :] == 0.0), (b, t)
      assert np.all(jac[b, t, :, 1 - b] == 0.0), (b, t)
      assert np.any(jac[b, t, :, b, :t + 1, :] != 0.0), (b, t)


def test_kda_chunk_size_does_not_change_output_or_gradient():
  cfg, p, x, r = setup('kda', 7, batch=1)
  outs = []
  for chunk in (1, 3, 16):
    c = tiny_model_config(**{**cfg, 'kda_chunk': chunk})
    f = lambda p: jnp.sum(ATTENTIONS['kda'].apply(p, x, c)[0] * r)
    outs.append(jax.jit(jax.value_and_grad(f))(p))
  for o in outs[1:]:
    chex.assert_trees_all_close(o, outs[0], **TOL)


def test_kda_chunkwise_form_equals_library_recurrent_form():
  from moejax.attention import kda
  cfg, p, x, _ = setup('kda', 7)
  q, k, v, beta, g = kda.gates_and_inputs(p, x, cfg)
  o_rec, _ = kda.recurrent_delta_rule(q, k, v, beta, g)
  chex.assert_trees_all_close(kda.chunk_delta_rule(q, k, v, beta, g, 5), o_rec, **TOL)


def test_nsa_selected_branch_covering_every_block_equals_full_causal_attention():
  T = 16
  cfg, p, x, _ = setup('nsa', T, nsa_select_block=4, nsa_num_selected=4)   # 4 blocks of 4 = T
  o = nsa.branches(p, x, cfg)[0]['slc']                                        # [B, T, G, H/G, N]
  H, G = cfg.num_heads, cfg.num_kv_heads
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      q = ref_rope(x[b] @ p['wq'][:, h], cfg.rope_theta)
      k = ref_rope(x[b] @ p['wk_slc'][:, g], cfg.rope_theta)
      ref = ref_causal_attention(q, k, x[b] @ p['wv_slc'][:, g])
      chex.assert_trees_all_close(o[b, :, g, h % (H // G)], ref, **TOL)


def test_nsa_selected_branch_reads_only_n_blocks_when_the_sequence_is_longer():
  T = 12
  cfg, p, x, _ = setup('nsa', T, nsa_select_block=2, nsa_num_selected=3)
  full = ref_nsa(p, x, tiny_model_config(**{**cfg, 'nsa_num_selected': 8}), branch='slc')
  sparse = ref_nsa(p, x, cfg, branch='slc')
  lib = nsa.branches(p, x, cfg)[0]['slc'].reshape(B, T, cfg.num_heads, -1)
  assert float(jnp.max(jnp.abs(full - sparse))) > 1e-3       # the sparsity is real
  y_lib = jnp.einsum('bthn,hnd->btd', lib, p['wo'])
  chex.assert_trees_all_close(y_lib, sparse, **TOL)


def test_hybrid_pattern_model_equals_layer_by_layer_loop():
  """5 layers, 2 dense: 'swa,mla' gives dense [swa, mla] (one unit) and MoE [swa, mla, swa]
  (one unit scanned + one layer after the scan), all matching a plain loop over layers."""
  cfg = tiny_model_config(attention='swa,mla', num_layers=5, num_dense_layers=2, init_std=0.3,
                          dispatch='dropless', **SHAPES)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  assert isinstance(p['dense_blocks'], list) and len(p['moe_blocks']) == 2
  assert p['moe_blocks'][0]['attn']['wq'].shape[0] == 2 and p['moe_blocks'][1]['attn']['wq'].shape[0] == 1
  bias = jax.random.normal(jax.random.key(0), (3, cfg.num_experts)) * 0.1
  tokens = jax.random.randint(jax.random.key(1), (B, 8), 0, cfg.vocab_size)
  logits, aux = jax.jit(lambda p: model.forward(p, bias, tokens, cfg, mesh))(p)

  def loop(p):
    x = p['embed'][tokens]
    layers = [('dense', p['dense_blocks'][0], 0), ('dense', p['dense_blocks'][1], 0),
              ('moe', p['moe_blocks'][0], 0), ('moe', p['moe_blocks'][1], 0), ('moe', p['moe_blocks'][0], 1)]
    loads = []
    for i, (kind, stack, j) in enumerate(layers):
      lp = jax.tree.map(lambda a: a[j], stack)
      x = x + ATTENTIONS[['swa', 'mla'][i % 2]].apply(lp['attn'], rms_norm(x, lp['attn_norm'], cfg.norm_eps), cfg)[0]
      h = rms_norm(x, lp['ffn_norm'], cfg.norm_eps)
      if kind == 'dense':
        x = x + swiglu(lp['ffn'], h)
      else:
        y, a = model.moe_ffn(lp['ffn'], bias[i - 2], h, cfg, mesh, ())
        x, _ = x + y, loads.append(a['load_E'])
    x = rms_norm(x, p['final_norm'], cfg.norm_eps)
    return jnp.einsum('btd,dv->btv', x, p['head']), jnp.stack(loads)

  ref_logits, ref_loads = jax.jit(loop)(p)
  chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux['load_E'], ref_loads)


def test_hybrid_pattern_params_get_shardings_from_logical_axes():
  from moejax import sharding
  cfg = tiny_model_config(attention='kda,mla', num_layers=5, num_dense_layers=2, **SHAPES)
  mesh = make_test_mesh({'data': 2, 'expert': 1})
  sh = sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(cfg)), {'heads': 'data'})
  assert sh['moe_blocks'][1]['attn']['wkv_b'].spec == jax.sharding.PartitionSpec(None, None, 'data', None)
  assert sh['dense_blocks'][0]['attn']['wq'].spec == jax.sharding.PartitionSpec(None, None, 'data', None)


def test_unknown_name_in_attention_pattern_is_a_config_error_naming_the_field():
  from moejax import validate
  cfg = tiny_model_config(attention='kda,kda,bogus,mla')
  with pytest.raises(validate.ConfigError, match=r'^model\.attention: .*bogus'):
    validate.validate_model(cfg)
  validate.validate_model(tiny_model_config(attention='kda, swa,nsa,mla,mha,gqa'))


def test_flops_per_token_of_a_pattern_sums_its_layers_and_local_types_grow_linearly():
  from moejax import flops
  cfg = tiny_model_config(attention='kda,mla', num_layers=4, **SHAPES)
  per = {a: ATTENTIONS[a].flops_per_token(cfg, 4096) for a in ATTENTIONS}
  assert all(v > 0 for v in per.values())
  base = flops.forward_flops_per_token(tiny_model_config(attention='kda', num_layers=4, **SHAPES), 4096)
  assert flops.forward_flops_per_token(cfg, 4096) == pytest.approx(base + 2 * (per['mla'] - per['kda']))
  for a in ('swa', 'kda'):   # per-token cost does not grow with the context
    assert ATTENTIONS[a].flops_per_token(cfg, 8192) == ATTENTIONS[a].flops_per_token(cfg, 4096)
  assert ATTENTIONS['gqa'].flops_per_token(cfg, 8192) > ATTENTIONS['gqa'].flops_per_token(cfg, 4096)


# ----------------------------------------------------------------------------- document masking

def segment_ids(*rows):
  """Document lengths per row -> int32 [B, T] segment ids numbered from 1 within each row."""
  return np.asarray([np.repeat(np.arange(1, len(r) + 1), r) for r in rows], np.int32)


def documents(seg_T):
  """[(start, end)] of each document of one row."""
  seg = np.asarray(seg_T)
  starts = [0] + [t for t in range(1, len(seg)) if seg[t] != seg[t - 1]]
  return list(zip(starts, starts[1:] + [len(seg)]))


# One row of 4 documents (3, 2, 7, 2). KDA's chunk is 4: documents start at a chunk's last
# position (3), inside one (5) and at an edge (12). NSA's l' = 2, d = 2, l = 4: the documents at 3
# and 5 begin inside a slc block of the previous one; the third one's cmp blocks exclude the block
# starting at 4 (in the second document), and its last query ranks blocks 3 and 4 for one slot.
DOC_CASES = {
    'kda': ('kda', {}, ref_kda),
    'nsa': ('nsa', {'nsa_select_block': 2, 'nsa_num_selected': 3}, ref_nsa),
}


@pytest.mark.parametrize('case', list(DOC_CASES))
def test_document_masked_attention_forward_and_grad_match_naive_reference(case):
  attention, overrides, ref_fn = DOC_CASES[case]
  seg = segment_ids((3, 2, 7, 2))
  cfg, p, x, r = setup(attention, seg.shape[1], batch=1, **overrides)

  def lib(p, x):
    y = ATTENTIONS[attention].apply(p, x, cfg, seg)[0]
    return jnp.sum(y * r), y

  def ref(p, x):
    y = ref_fn(p, x, cfg, segment_ids_BT=seg)
    return jnp.sum(y * r), y

  g_lib, y_lib = jax.jit(jax.grad(lib, (0, 1), has_aux=True))(p, x)
  g_ref, y_ref = jax.jit(jax.grad(ref, (0, 1), has_aux=True))(p, x)
  y_whole = jax.jit(lambda p, x: ATTENTIONS[attention].apply(p, x, cfg)[0])(p, x)
  assert float(jnp.max(jnp.abs(y_ref - y_whole))) > 1e-2      # the documents do change the output
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **TOL)


@pytest.mark.parametrize('attention', ['gqa', 'mha', 'swa', 'mla', 'nsa', 'kda'])
def test_document_masked_row_equals_each_document_run_alone(attention):
  """Needs no reference: each document's output equals (1) the same row with every other document
  replaced by fresh random inputs (a change that the jacobian cannot see through NSA's top-k), and
  (2) the document run alone, from position 0 of its own row without segment ids (the filler after
  it is unseen by causality). (2) holds for every document of the shift-invariant types (RoPE is
  relative; KDA has no positions); NSA compresses RoPE'd keys on a block grid fixed to the row, so
  there (2) is checked for first documents only. A row of one document equals no segment ids."""
  seg = segment_ids((5, 5, 4), (4, 10))     # KDA chunk 4: starts inside chunks (5, 10), at an edge (4)
  T = seg.shape[1]
  cfg, p, x, _ = setup(attention, T, seed=5)
  apply = jax.jit(lambda x, seg: ATTENTIONS[attention].apply(p, x, cfg, seg)[0])
  y = apply(x, seg)
  noise = jax.random.normal(jax.random.key(11), x.shape)
  for i in range(3):   # the i-th document of each row in place, the others replaced
    keep = np.stack([seg[b] == i + 1 for b in range(B)])[..., None]
    y_kept = apply(jnp.where(keep, x, noise), seg)
    chex.assert_trees_all_close(jnp.where(keep, y_kept, 0.0), jnp.where(keep, y, 0.0), **TOL)
  docs = [(b, s, e) for b in range(B) for s, e in documents(seg[b]) if s == 0 or attention != 'nsa']
  rows = [jnp.concatenate([x[b, s:e], noise[b, :T - (e - s)]]) for b, s, e in docs]
  y_alone = apply(jnp.stack(rows + list(x)), None)     # + the whole rows, for the one-document case
  for row, (b, s, e) in enumerate(docs):
    chex.assert_trees_all_close(y_alone[row, :e - s], y[b, s:e], **TOL)
  chex.assert_trees_all_close(apply(x, np.ones_like(seg)), y_alone[len(docs):], **TOL)


@pytest.mark.parametrize('attention', ['gqa', 'mha', 'swa', 'mla', 'nsa', 'kda'])
def test_document_masked_output_has_exactly_zero_gradient_wrt_other_documents(attention):
  seg = segment_ids((3, 4, 3), (4, 6))
  T = seg.shape[1]
  cfg, p, x, _ = setup(attention, T, seed=3)
  jac = np.asarray(jax.jit(jax.jacrev(lambda x: ATTENTIONS[attention].apply(p, x, cfg, seg)[0]))(x))
  for b in range(B):
    for t in range(T):
      other = seg[b] != seg[b, t]
      assert np.all(jac[b, t, :, b, other | (np.arange(T) > t), :] == 0.0), (b, t)
      assert np.all(jac[b, t, :, 1 - b] == 0.0), (b, t)
      assert np.any(jac[b, t, :, b, ~other & (np.arange(T) <= t), :] != 0.0), (b, t)


def test_kda_with_documents_chunk_size_does_not_change_output_or_gradient_and_equals_recurrence():
  from moejax.attention import kda
  seg = segment_ids((5, 2, 1, 6), (8, 6))
  cfg, p, x, r = setup('kda', seg.shape[1])
  outs = []
  for chunk in (3, 16):   # 3: starts at a chunk's last position (5, 8) and inside (7); 16: one chunk
    c = tiny_model_config(**{**cfg, 'kda_chunk': chunk})
    f = lambda p: jnp.sum(ATTENTIONS['kda'].apply(p, x, c, seg)[0] * r)
    outs.append(jax.jit(jax.value_and_grad(f))(p))
  for o in outs[1:]:   # summed over every position, a_log's gradient (~0.04) cancels to ~1e-5 in float32
    chex.assert_trees_all_close(o, outs[0], rtol=5e-5, atol=2e-5)

  def forms(p, x):   # the library's recurrent form with resets (the decode form) and chunk form
    q, k, v, beta, g = kda.gates_and_inputs(p, x, cfg, seg)
    o_rec, _ = kda.recurrent_delta_rule(q, k, v, beta, g, reset_BT=kda.doc_starts(seg))
    return o_rec, kda.chunk_delta_rule(q, k, v, beta, g, 4, seg)

  o_rec, o_chunk = jax.jit(forms)(p, x)
  chex.assert_trees_all_close(o_chunk, o_rec, **TOL)


def test_model_loss_with_document_mask_equals_loss_of_each_document_alone():
  """Rows packing several documents: with model.document_mask the loss equals the mean over the
  same tokens with each document alone at the start of its own row (causality keeps it from the
  filler after it). MoE routing is per token; the per-row balance loss is off. Rows 0-1 pack the
  documents, rows 2-5 hold one each; the loss mask picks the rows a loss reads, so one compiled
  function serves every case."""
  cfg = tiny_model_config(attention='kda,mla', num_layers=2, num_dense_layers=1, init_std=0.3,
                          dispatch='dropless', balance_loss_weight=0.0, document_mask=True, **SHAPES)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  bias = jnp.zeros((model.num_moe_layers(cfg), cfg.num_experts))
  loss = jax.jit(lambda batch: model.loss_fn(p, bias, batch, cfg, mesh)[0])
  packed = segment_ids((5, 9), (9, 5))
  T = packed.shape[1]
  inputs, targets = np.array(jax.random.randint(jax.random.key(2), (2, 6, T), 0, cfg.vocab_size))
  seg = np.concatenate([packed, np.ones((4, T), np.int32)])
  alone = np.zeros((6, T), np.float32)
  for row, (b, s, e) in enumerate([(b, s, e) for b in range(2) for s, e in documents(packed[b])], 2):
    inputs[row, :e - s], targets[row, :e - s], alone[row, :e - s] = inputs[b, s:e], targets[b, s:e], 1.0
  on_packed = np.concatenate([np.ones((2, T), np.float32), np.zeros((4, T), np.float32)])
  batch = lambda seg, mask: {'inputs': inputs, 'targets': targets, 'loss_mask': mask, 'segment_ids': seg}
  loss_packed = loss(batch(seg, on_packed))
  chex.assert_trees_all_close(loss_packed, loss(batch(seg, alone)), rtol=1e-5, atol=1e-6)
  assert abs(float(loss(batch(np.ones_like(seg), on_packed)) - loss_packed)) > 1e-4   # the mask matters
