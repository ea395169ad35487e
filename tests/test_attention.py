"""Tests for moejax.attention: every type (GQA/MHA/MQA, SWA, MLA, NSA, KDA) against the naive
references in tests/reference.py, forward and gradient; causality; the softmax options (QK-norm,
q/k/v biases, sinks, soft-capping), which types honour them, and the per-head max logit; QK-clip
(moejax.qk_clip); KDA's chunk sizes and NSA's selected branch; hybrid per-layer patterns; document
masking (segment ids) for every type; every type (and GQA with the Hugging Face options of
tests/test_attention_hf.py) sharded over tensor x data x fsdp equals one device."""
import dataclasses
import functools
import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config, tiny_model_dict, update_model
from reference import (ATTENTION_REFERENCES, DOC_SEGMENTS, LOOSE_TOL, SMALL_ATTENTION, TOL,
                       assert_softmax_matches_reference, attention_problem, grad_and_output, ref_head,
                       ref_mask, ref_nsa, ref_rope, ref_softmax)

from moejax import configs, flops, model, params, qk_clip, sharding
from moejax.attention import ATTENTIONS, OPTIONS, kda, nsa, rope
from moejax.errors import ConfigError
from moejax.layers import rms_norm, swiglu
from moejax.model_config import ModelConfig

# TOL, LOOSE_TOL (tests/reference.py): longer recurrences and gradients summing O(10) terms reach a few
# 1e-6 of float32 rounding.
TINY = {}   # attention_problem shapes: conftest's tiny model as it is (4 heads, 2 kv heads, d 32)


def small_model_config(**overrides) -> ModelConfig:
  """The tiny model with the small attention shapes of tests/reference.py, then `overrides`."""
  return ModelConfig.from_config(update_model(update_model(tiny_model_dict(), SMALL_ATTENTION), overrides))


def with_kda_chunk(a, chunk):
  return dataclasses.replace(a, kda=dataclasses.replace(a.kda, chunk=chunk))


# ----------------------------------------------------------------------------- references

def test_rope_reference_matches_library_rope():
  x = jax.random.normal(jax.random.key(0), (1, 8, 1, 16))
  chex.assert_trees_all_close(rope(x, 10000.0)[0, :, 0], ref_rope(x[0, :, 0], 10000.0), **TOL)
  # RoPE is a rotation: it preserves norms, and position 0 is untouched.
  chex.assert_trees_all_close(jnp.linalg.norm(rope(x, 500.0), axis=-1),
                              jnp.linalg.norm(x, axis=-1), **TOL)
  chex.assert_trees_all_close(rope(x, 500.0)[:, 0], x[:, 0])


def test_every_attention_type_has_a_naive_reference():
  assert set(ATTENTION_REFERENCES) == set(ATTENTIONS)


# (attention, T, batch, shapes, overrides): T not a multiple of the window / chunk / blocks on purpose.
CASES = {
    'gqa': ('gqa', 8, 2, TINY, {}),                                     # 4 query heads, 2 kv heads
    'gqa_as_mha': ('gqa', 8, 2, TINY, {'attn': {'num_kv_heads': 4}}),   # num_kv_heads == num_heads
    'gqa_as_mqa': ('gqa', 8, 2, TINY, {'attn': {'num_kv_heads': 1}}),
    'mla_full_q': ('mla', 8, 2, TINY, {'mla': {'q_lora_rank': 0}}),
    'mla_lora_q': ('mla', 8, 2, TINY, {'mla': {'q_lora_rank': 12}}),
    'mla_lora_q_variance_aligned': ('mla', 8, 2, TINY, {'mla': {'q_lora_rank': 12}, 'variance_alignment': True}),
    'mha': ('mha', 6, 1, SMALL_ATTENTION, {}),   # num_kv_heads (1) is ignored: each query head has its kv
    'swa': ('swa', 11, 1, SMALL_ATTENTION, {}),
    'swa_wide_window': ('swa', 7, 1, SMALL_ATTENTION, {'attn': {'window': 16}}),
    'kda': ('kda', 10, 1, SMALL_ATTENTION, {}),
    'nsa': ('nsa', 11, 1, SMALL_ATTENTION, {}),
}


@pytest.mark.parametrize('case', list(CASES))
def test_attention_forward_and_grad_match_naive_reference(case):
  attention, T, batch, shapes, overrides = CASES[case]
  a, p, x, r = attention_problem(attention, T, batch, shapes=shapes, **overrides)
  g_lib, y_lib = grad_and_output(lambda p, x: ATTENTIONS[attention].apply(p, x, a)[0], p, x, r)
  g_ref, y_ref = grad_and_output(lambda p, x: ATTENTION_REFERENCES[attention](p, x, a), p, x, r)
  assert float(jnp.std(y_ref)) > 1e-2   # not a degenerate near-zero output
  chex.assert_trees_all_close(y_lib, y_ref, **TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **LOOSE_TOL)   # gradients: float32 summation order varies by CPU


@pytest.mark.parametrize('case', list(CASES))
def test_attention_output_at_t_has_exactly_zero_gradient_wrt_inputs_after_t(case):
  attention, T, _, shapes, overrides = CASES[case]
  a, p, x, _ = attention_problem(attention, T, 2, seed=3, shapes=shapes, **overrides)
  jac = np.asarray(jax.jit(jax.jacrev(lambda x: ATTENTIONS[attention].apply(p, x, a)[0]))(x))
  for b in range(2):                      # jac [B, T, D, B, S, D]
    for t in range(T):
      assert np.all(jac[b, t, :, b, t + 1:, :] == 0.0), (b, t)   # future positions
      assert np.all(jac[b, t, :, 1 - b] == 0.0), (b, t)          # other sequences
      assert np.any(jac[b, t, :, b, :t + 1, :] != 0.0), (b, t)   # the past does matter


# ----------------------------------------------------------------------------- softmax options

# DOC_SEGMENTS: row 0 documents of 5, 4 and 3 tokens; row 1 a single document.
OPTION_CASES = {
    'gqa_segments': ('gqa', {}, True),
    'gqa_qknorm_sinks_softcap': ('gqa', {'attn': dict(qk_norm=True, sinks=True, softcap=2.0)}, True),
    'mha_sinks_no_segments': ('mha', {'attn': dict(sinks=True)}, False),
    'swa_segments_sinks_softcap': ('swa', {'attn': dict(window=4, sinks=True, softcap=3.0)}, True),
    'mla_segments_softcap': ('mla', {'attn': dict(softcap=2.0)}, True),
    'mla_lora_segments': ('mla', {'mla': dict(q_lora_rank=12)}, True),
}


@pytest.mark.parametrize('case', list(OPTION_CASES))
def test_softmax_attention_options_match_naive_reference_forward_grad_and_max_logit(case):
  attention, overrides, with_segments = OPTION_CASES[case]
  a, p, x, r = attention_problem(attention, 12, shapes=TINY, **overrides)
  assert_softmax_matches_reference(a, a, attention, p, x, r, DOC_SEGMENTS if with_segments else None)


def test_document_mask_changes_the_output_only_after_the_first_document():
  a, p, x, _ = attention_problem('gqa', 12, shapes=TINY)
  y_doc, _ = ATTENTIONS['gqa'].apply(p, x, a, jnp.asarray(DOC_SEGMENTS))
  y_all, _ = ATTENTIONS['gqa'].apply(p, x, a)
  np.testing.assert_allclose(y_doc[0, :5], y_all[0, :5], rtol=1e-5, atol=1e-6)  # first document
  assert float(jnp.max(jnp.abs(y_doc[0, 5:] - y_all[0, 5:]))) > 1e-3
  np.testing.assert_allclose(y_doc[1], y_all[1], rtol=1e-5, atol=1e-6)          # one document


OPTION_VALUES = {'qk_norm': True, 'sinks': True, 'softcap': 0.5, 'qkv_bias': True}


@pytest.mark.parametrize('attention', list(ATTENTIONS))
def test_options_a_type_supports_change_its_output_and_the_others_are_config_errors(attention):
  """`ATTENTIONS[name].supports` is honest: each option it lists is applied (the output changes);
  each one it does not list is refused by the config check, naming the option's field and the type."""
  assert set(OPTION_VALUES) == set(OPTIONS)
  a_off, p_off, x, _ = attention_problem(attention, 6, batch=1)
  y_off = jax.jit(lambda p: ATTENTIONS[attention].apply(p, x, a_off)[0])(p_off)
  for option, value in OPTION_VALUES.items():
    if option in ATTENTIONS[attention].supports:
      a, p, _, _ = attention_problem(attention, 6, batch=1, attn={option: value})
      p = {**p, **p_off}                        # only the option's own params differ (perturbed)
      y = jax.jit(lambda p: ATTENTIONS[attention].apply(p, x, a)[0])(p)
      assert float(jnp.max(jnp.abs(y - y_off))) > 1e-3, option
    else:
      with pytest.raises(ConfigError, match=rf'^model\.attn\.{option}: not supported by attention {attention} '):
        small_model_config(attention=attention, attn={option: value})
      with pytest.raises(ConfigError, match=rf'^model\.attn\.{option}: .*{attention}'):   # in a pattern too
        small_model_config(attention=f'gqa,{attention}', attn={option: value})


# ----------------------------------------------------------------------------- QK-clip

def _stack(p):   # one layer -> a stack of L = 1, as qk_clip sees scanned params
  return jax.tree.map(lambda w: w[None], p)


@pytest.mark.parametrize('attention,overrides', [
    ('gqa', {}), ('mha', {}), ('swa', {'attn': {'window': 4}}), ('mla', {}), ('mla', {'mla': {'q_lora_rank': 12}})])
def test_qk_clip_brings_over_threshold_heads_to_tau_and_leaves_the_others(attention, overrides):
  a, p, x, _ = attention_problem(attention, 12, shapes=TINY, **overrides)
  _, before = ATTENTIONS[attention].apply(p, x, a)
  tau = float(jnp.sort(before)[1]) * 0.999 + float(jnp.sort(before)[2]) * 0.001   # 2 heads clip
  clipped = jax.tree.map(lambda w: w[0], ATTENTIONS[attention].qk_clip(
      _stack(p), qk_clip.clip_factors(before, tau)[None], a))
  _, after = ATTENTIONS[attention].apply(clipped, x, a)
  over = np.asarray(before > tau)
  assert 0 < over.sum() < a.num_heads
  np.testing.assert_allclose(np.asarray(after)[over], tau, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(after)[~over], np.asarray(before)[~over], rtol=1e-5)
  if attention == 'mla':   # the RoPE key is shared by every head: never rescaled
    np.testing.assert_array_equal(clipped['wkv_a'], p['wkv_a'])


def test_qk_clip_factors_ignore_nan_and_heads_under_tau():
  f = qk_clip.clip_factors(jnp.array([jnp.nan, 5.0, 20.0, 10.0]), 10.0)
  np.testing.assert_allclose(f, [1.0, 1.0, 0.5, 1.0])


def test_qk_clip_on_a_pattern_model_scales_the_right_layer_stacks():
  """'gqa,mla' over 4 layers (1 dense): each stack of each group gets its own layers' factors."""
  cfg = tiny_model_config(attention='gqa,mla', num_layers=4, num_dense_layers=1)
  p = numpy_init_params(model.model_specs(cfg), seed=0)
  logit_LH = jnp.array([[1.0] * 4, [50.0, 1.0, 1.0, 1.0], [1.0] * 4, [1.0, 1.0, 1.0, 25.0]])
  out = qk_clip.qk_clip(p, logit_LH, cfg, 10.0)
  # layer 1 = MoE layer 0 (mla, stack 1 of the unit ['mla', 'gqa']), head 0 gets gamma = 0.2
  mla_in, mla_out = p['moe_blocks'][0]['attn']['wq'], out['moe_blocks'][0]['attn']['wq']
  Nn = cfg.attn.mla.qk_nope_head_dim
  np.testing.assert_allclose(mla_out[0, :, 0, Nn:], 0.2 * mla_in[0, :, 0, Nn:], rtol=1e-6)
  np.testing.assert_allclose(mla_out[0, :, 1:], mla_in[0, :, 1:])
  # layer 3 = MoE layer 2 (mla again, second entry of that stack), head 3 gets gamma = 0.4
  np.testing.assert_allclose(mla_out[1, :, 3, Nn:], 0.4 * mla_in[1, :, 3, Nn:], rtol=1e-6)
  # every gqa layer and the dense block stayed under tau: untouched
  chex.assert_trees_all_equal(out['moe_blocks'][1], p['moe_blocks'][1])
  chex.assert_trees_all_equal(out['dense_blocks'], p['dense_blocks'])


def smoke_config():
  """experiments/smoke.py's config (state.setup does not read its data)."""
  path = Path(__file__).resolve().parents[1] / 'experiments' / 'smoke.py'
  spec = importlib.util.spec_from_file_location('smoke_experiment', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.slow   # two train-step compiles of the smoke model: ~50 s on 2 cores
def test_train_step_with_qk_clip_equals_the_unclipped_step_then_qk_clip():
  """The train step applies QK-clip after the optimizer update, from that step's own logits."""
  from moejax.state import init_state, setup
  from moejax.train import make_train_step
  c = smoke_config()
  c.mesh.data, c.mesh.expert = 1, 1
  c.train.batch_size, c.train.seq_len = 2, 16
  s = setup(c, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.model.vocab_size, (2, 17))
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32), 'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
           'loss_mask': jnp.ones((2, 16), jnp.float32),
           'segment_ids': jnp.ones((2, 16), jnp.int32), 'positions': jnp.tile(jnp.arange(16), (2, 1))}
  plain, out = make_train_step(s, diagnostics=False)(init_state(s), batch)
  logit_LH = out['attn_logit_max']
  tau = float(jnp.median(logit_LH))                  # about half the heads clip
  c.optim.qk_clip = tau
  clipped, _ = make_train_step(setup(c, devices=jax.devices()[:1]), diagnostics=False)(init_state(s), batch)
  expected = qk_clip.qk_clip(plain['params'], logit_LH, s.model, tau)
  chex.assert_trees_all_close(clipped['params'], expected, rtol=1e-6, atol=1e-9)
  assert not np.allclose(clipped['params']['moe_blocks']['attn']['wq'], plain['params']['moe_blocks']['attn']['wq'])


# ----------------------------------------------------------------------------- KDA and NSA forms

def test_kda_chunk_size_does_not_change_output_or_gradient():
  a, p, x, r = attention_problem('kda', 7, batch=1)
  outs = []
  for chunk in (1, 3, 16):
    c = with_kda_chunk(a, chunk)
    f = lambda p: jnp.sum(ATTENTIONS['kda'].apply(p, x, c)[0] * r)
    outs.append(jax.jit(jax.value_and_grad(f))(p))
  for o in outs[1:]:
    chex.assert_trees_all_close(o, outs[0], **LOOSE_TOL)


def test_kda_chunkwise_form_equals_library_recurrent_form():
  a, p, x, _ = attention_problem('kda', 7)
  q, k, v, beta, g = kda.gates_and_inputs(p, x, a)
  o_rec, _ = kda.recurrent_delta_rule(q, k, v, beta, g)
  chex.assert_trees_all_close(kda.chunk_delta_rule(q, k, v, beta, g, 5), o_rec, **TOL)


def test_nsa_selected_branch_covering_every_block_equals_full_causal_attention():
  T = 16
  a, p, x, _ = attention_problem('nsa', T, nsa={'select_block': 4, 'num_selected': 4})   # 4 blocks of 4 = T
  o = nsa.branches(p, x, a)[0]['slc']                                                  # [B, T, G, H/G, N]
  H, G = a.num_heads, a.num_kv_heads
  for b in range(2):
    for h in range(H):
      g = h // (H // G)
      q = ref_rope(x[b] @ p['wq'][:, h], a.rope_theta)
      k = ref_rope(x[b] @ p['wk_slc'][:, g], a.rope_theta)
      ref, _ = ref_head(q, k, x[b] @ p['wv_slc'][:, g], ref_mask(T))
      chex.assert_trees_all_close(o[b, :, g, h % (H // G)], ref, **TOL)


def test_nsa_selected_branch_reads_only_n_blocks_when_the_sequence_is_longer():
  T = 12
  a, p, x, _ = attention_problem('nsa', T, nsa={'select_block': 2, 'num_selected': 3})
  full = ref_nsa(p, x, dataclasses.replace(a, nsa=dataclasses.replace(a.nsa, num_selected=8)), branch='slc')
  sparse = ref_nsa(p, x, a, branch='slc')
  lib = nsa.branches(p, x, a)[0]['slc'].reshape(2, T, a.num_heads, -1)
  assert float(jnp.max(jnp.abs(full - sparse))) > 1e-3       # the sparsity is real
  y_lib = jnp.einsum('bthn,hnd->btd', lib, p['wo'])
  chex.assert_trees_all_close(y_lib, sparse, **LOOSE_TOL)


# ----------------------------------------------------------------------------- per-layer patterns

def test_hybrid_pattern_model_equals_layer_by_layer_loop():
  """5 layers, 2 dense: 'swa,mla' gives dense [swa, mla] (one unit) and MoE [swa, mla, swa]
  (one unit scanned + one layer after the scan), all matching a plain loop over layers."""
  cfg = small_model_config(attention='swa,mla', num_layers=5, num_dense_layers=2, init_std=0.3,
                           dispatch='dropless')
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  assert isinstance(p['dense_blocks'], list) and len(p['moe_blocks']) == 2
  assert p['moe_blocks'][0]['attn']['wq'].shape[0] == 2 and p['moe_blocks'][1]['attn']['wq'].shape[0] == 1
  bias = jax.random.normal(jax.random.key(0), (3, cfg.num_experts)) * 0.1
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  logits, (moe_aux, _) = jax.jit(lambda p: model.forward(p, bias, tokens, cfg, mesh))(p)

  def loop(p):
    x = p['embed'][tokens]
    layers = [('dense', p['dense_blocks'][0], 0), ('dense', p['dense_blocks'][1], 0),
              ('moe', p['moe_blocks'][0], 0), ('moe', p['moe_blocks'][1], 0), ('moe', p['moe_blocks'][0], 1)]
    loads = []
    for i, (kind, stack, j) in enumerate(layers):
      lp = jax.tree.map(lambda a: a[j], stack)
      h = rms_norm(x, lp['attn_norm'], cfg.norm_eps)
      x = x + ATTENTIONS[['swa', 'mla'][i % 2]].apply(lp['attn'], h, cfg.attn)[0]
      h = rms_norm(x, lp['ffn_norm'], cfg.norm_eps)
      if kind == 'dense':
        x = x + swiglu(lp['ffn'], h)
      else:
        y, aux = model.moe_ffn(lp['ffn'], bias[i - 2], h, cfg, mesh, ())
        x = x + y
        loads.append(aux.load_E)
    x = rms_norm(x, p['final_norm'], cfg.norm_eps)
    return jnp.einsum('btd,dv->btv', x, p['head']), jnp.stack(loads)

  ref_logits, ref_loads = jax.jit(loop)(p)
  chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(moe_aux.load_E, ref_loads)


def test_hybrid_pattern_params_get_shardings_from_logical_axes():
  cfg = small_model_config(attention='kda,mla', num_layers=5, num_dense_layers=2)
  mesh = make_test_mesh({'data': 2, 'expert': 1})
  sh = sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(cfg)), {'heads': 'data'})
  assert sh['moe_blocks'][1]['attn']['wkv_b'].spec == jax.sharding.PartitionSpec(None, None, 'data', None)
  assert sh['dense_blocks'][0]['attn']['wq'].spec == jax.sharding.PartitionSpec(None, None, 'data', None)


def test_unknown_name_in_attention_pattern_is_a_config_error_naming_the_field():
  with pytest.raises(ConfigError, match=r'^model\.attention: .*bogus'):
    tiny_model_config(attention='kda,kda,bogus,mla')
  cfg = tiny_model_config(attention='kda, swa,nsa,mla,mha,gqa', num_layers=7, num_dense_layers=1)
  assert cfg.layer_attentions == ('kda', 'swa', 'nsa', 'mla', 'mha', 'gqa', 'kda')


def test_flops_per_token_of_a_pattern_sums_its_layers_and_local_types_grow_linearly():
  cfg = small_model_config(attention='kda,mla', num_layers=4)
  per = {a: ATTENTIONS[a].flops_per_token(cfg.attn, 4096) for a in ATTENTIONS}
  assert all(v > 0 for v in per.values())
  base = flops.forward_flops_per_token(small_model_config(attention='kda', num_layers=4), 4096)
  assert flops.forward_flops_per_token(cfg, 4096) == pytest.approx(base + 2 * (per['mla'] - per['kda']))
  for a in ('swa', 'kda'):   # per-token cost does not grow with the context
    assert ATTENTIONS[a].flops_per_token(cfg.attn, 8192) == ATTENTIONS[a].flops_per_token(cfg.attn, 4096)
  assert ATTENTIONS['gqa'].flops_per_token(cfg.attn, 8192) > ATTENTIONS['gqa'].flops_per_token(cfg.attn, 4096)


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
# SWA's window (3) reaches back over the documents' starts.
DOC_OVERRIDES = {'nsa': {'nsa': {'select_block': 2, 'num_selected': 3}}}


@pytest.mark.parametrize('attention', list(ATTENTIONS))
def test_document_masked_attention_forward_and_grad_match_naive_reference(attention):
  seg = segment_ids((3, 2, 7, 2))
  a, p, x, r = attention_problem(attention, seg.shape[1], batch=1, **DOC_OVERRIDES.get(attention, {}))
  g_lib, y_lib = grad_and_output(lambda p, x: ATTENTIONS[attention].apply(p, x, a, seg)[0], p, x, r)
  g_ref, y_ref = grad_and_output(lambda p, x: ATTENTION_REFERENCES[attention](p, x, a, seg), p, x, r)
  y_whole = jax.jit(lambda p, x: ATTENTIONS[attention].apply(p, x, a)[0])(p, x)
  assert float(jnp.max(jnp.abs(y_ref - y_whole))) > 1e-2      # the documents do change the output
  chex.assert_trees_all_close(y_lib, y_ref, **LOOSE_TOL)
  chex.assert_trees_all_close(g_lib, g_ref, **LOOSE_TOL)


@pytest.mark.parametrize('attention', list(ATTENTIONS))
def test_document_masked_row_equals_each_document_run_alone(attention):
  """Needs no reference: each document's output equals (1) the same row with every other document
  replaced by fresh random inputs (a change that the jacobian cannot see through NSA's top-k), and
  (2) the document run alone, from position 0 of its own row without segment ids (the filler after
  it is unseen by causality). (2) holds for every document of the shift-invariant types (RoPE is
  relative; KDA has no positions); NSA compresses RoPE'd keys on a block grid fixed to the row, so
  there (2) is checked for first documents only. A row of one document equals no segment ids."""
  seg = segment_ids((5, 5, 4), (4, 10))     # KDA chunk 4: starts inside chunks (5, 10), at an edge (4)
  T = seg.shape[1]
  a, p, x, _ = attention_problem(attention, T, seed=5)
  apply = jax.jit(lambda x, seg: ATTENTIONS[attention].apply(p, x, a, seg)[0])
  y = apply(x, seg)
  noise = jax.random.normal(jax.random.key(11), x.shape)
  for i in range(3):   # the i-th document of each row in place, the others replaced
    keep = np.stack([seg[b] == i + 1 for b in range(2)])[..., None]
    y_kept = apply(jnp.where(keep, x, noise), seg)
    chex.assert_trees_all_close(jnp.where(keep, y_kept, 0.0), jnp.where(keep, y, 0.0), **LOOSE_TOL)
  docs = [(b, s, e) for b in range(2) for s, e in documents(seg[b]) if s == 0 or attention != 'nsa']
  rows = [jnp.concatenate([x[b, s:e], noise[b, :T - (e - s)]]) for b, s, e in docs]
  y_alone = apply(jnp.stack(rows + list(x)), None)     # + the whole rows, for the one-document case
  for row, (b, s, e) in enumerate(docs):
    chex.assert_trees_all_close(y_alone[row, :e - s], y[b, s:e], **LOOSE_TOL)
  chex.assert_trees_all_close(apply(x, np.ones_like(seg)), y_alone[len(docs):], **LOOSE_TOL)


@pytest.mark.parametrize('attention', list(ATTENTIONS))
def test_document_masked_output_has_exactly_zero_gradient_wrt_other_documents(attention):
  seg = segment_ids((3, 4, 3), (4, 6))
  T = seg.shape[1]
  a, p, x, _ = attention_problem(attention, T, seed=3)
  jac = np.asarray(jax.jit(jax.jacrev(lambda x: ATTENTIONS[attention].apply(p, x, a, seg)[0]))(x))
  for b in range(2):
    for t in range(T):
      other = seg[b] != seg[b, t]
      assert np.all(jac[b, t, :, b, other | (np.arange(T) > t), :] == 0.0), (b, t)
      assert np.all(jac[b, t, :, 1 - b] == 0.0), (b, t)
      assert np.any(jac[b, t, :, b, ~other & (np.arange(T) <= t), :] != 0.0), (b, t)


def test_kda_with_documents_chunk_size_does_not_change_output_or_gradient_and_equals_recurrence():
  seg = segment_ids((5, 2, 1, 6), (8, 6))
  a, p, x, r = attention_problem('kda', seg.shape[1])
  outs = []
  for chunk in (3, 16):   # 3: starts at a chunk's last position (5, 8) and inside (7); 16: one chunk
    c = with_kda_chunk(a, chunk)
    f = lambda p: jnp.sum(ATTENTIONS['kda'].apply(p, x, c, seg)[0] * r)
    outs.append(jax.jit(jax.value_and_grad(f))(p))
  for o in outs[1:]:   # summed over every position, a_log's gradient (~0.04) cancels to ~1e-5 in float32
    chex.assert_trees_all_close(o, outs[0], rtol=5e-5, atol=2e-5)

  def forms(p, x):   # the library's recurrent form with resets (the decode form) and chunk form
    q, k, v, beta, g = kda.gates_and_inputs(p, x, a, seg)
    o_rec, _ = kda.recurrent_delta_rule(q, k, v, beta, g, reset_BT=kda.doc_starts(seg))
    return o_rec, kda.chunk_delta_rule(q, k, v, beta, g, 4, seg)

  o_rec, o_chunk = jax.jit(forms)(p, x)
  chex.assert_trees_all_close(o_chunk, o_rec, **LOOSE_TOL)


def test_model_loss_with_document_mask_equals_loss_of_each_document_alone():
  """Rows packing several documents: with model.attn.document_mask the loss equals the mean over
  the same tokens with each document alone at the start of its own row (causality keeps it from
  the filler after it). MoE routing is per token; the per-row balance loss is off. Rows 0-1 pack
  the documents, rows 2-5 hold one each; the loss mask picks the rows a loss reads, so one compiled
  function serves every case."""
  cfg = small_model_config(attention='kda,mla', num_layers=2, num_dense_layers=1, init_std=0.3,
                           dispatch='dropless', loss=dict(balance_weight=0.0), attn=dict(document_mask=True))
  assert cfg.document_mask
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  bias = jnp.zeros((cfg.num_moe_layers, cfg.num_experts))
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


# ----------------------------------------------------------------------------- whole-model causality

@pytest.mark.parametrize('attention', ['gqa', 'mla'])
def test_model_logits_at_t_do_not_depend_on_tokens_after_t(attention):
  T = 8
  cfg = tiny_model_config(attention=attention, init_std=0.3, dispatch='dropless')
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 0)
  bias = jnp.zeros((cfg.num_moe_layers, cfg.num_experts))
  fwd = jax.jit(lambda tok: model.forward(p, bias, tok, cfg, mesh)[0])
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
  logits = fwd(tokens)
  for t in (0, 3, T - 2):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 17) % cfg.vocab_size)
    new = fwd(changed)
    chex.assert_trees_all_close(new[:, :t + 1], logits[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(new[:, t + 1:] - logits[:, t + 1:]))) > 1e-3


@pytest.mark.parametrize('attention', ['gqa', 'mla'])
def test_model_logits_at_t_have_zero_gradient_wrt_embeddings_of_later_tokens(attention):
  """d logits[t] / d (embedding of input position s) == 0 for s > t, via an additive perturbation."""
  T, t = 8, 3
  cfg = tiny_model_config(attention=attention, init_std=0.3, dispatch='dropless', num_layers=2)
  mesh = make_test_mesh({'data': 1, 'expert': 1})
  p = numpy_init_params(model.model_specs(cfg), 2)
  bias = jnp.zeros((cfg.num_moe_layers, cfg.num_experts))
  tokens = jnp.arange(T)[None] * 5 % cfg.vocab_size   # distinct tokens at every position

  def logits_t(delta_TD):
    # Giving each position its own token id makes params['embed'][tokens] position-specific, so a
    # perturbation of row tokens[s] perturbs input position s only.
    q = dict(p, embed=p['embed'].at[tokens[0]].add(delta_TD))
    return model.forward(q, bias, tokens, cfg, mesh)[0][0, t]

  jac = np.asarray(jax.jit(jax.jacrev(logits_t))(jnp.zeros((T, cfg.d_model))))   # [V, T, D]
  assert np.all(jac[:, t + 1:] == 0.0)
  assert np.any(jac[:, :t + 1] != 0.0)


# ----------------------------------------------------------------------------- sharded

SHARDED_MESH = {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
ONE_DEVICE = {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def sharded_problem(attention, **attn):
  """A 2-layer tiny model with documents masked (and `attn` options); 4 rows of 16 tokens, two of
  them packed."""
  cfg = tiny_model_config(attention=attention, num_layers=2, num_dense_layers=1, init_std=0.1,
                          attn=dict(window=4, document_mask=True, **attn), kda=dict(chunk=4),
                          nsa=dict(block=4, stride=2, select_block=4, num_selected=2))
  p = numpy_init_params(model.model_specs(cfg), seed=0)
  B, T = 4, 16
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
  segments = np.array([[1] * 6 + [2] * 10, [1] * 16, [1] * 3 + [2] * 5 + [3] * 8, [1] * 16])
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((B, T), np.float32),
           'segment_ids': segments.astype(np.int32)}
  bias = np.zeros((cfg.num_moe_layers, cfg.num_experts), np.float32)
  return cfg, p, bias, batch


def loss_and_grads(cfg, p, bias, batch, mesh_sizes):
  n = int(np.prod(list(mesh_sizes.values())))
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:n])
  rules = dict(configs.base_config().sharding)
  p = jax.device_put(p, sharding.tree_shardings(mesh, params.logical_axes(model.model_specs(cfg)), rules))
  batch = jax.device_put(batch, sharding.named(mesh, ('batch', None), rules))
  fn = functools.partial(model.loss_fn, cfg=cfg, mesh=mesh)
  grad = jax.jit(jax.value_and_grad(lambda p, b, x: fn(p, b, x)[0]))
  loss, g = grad.lower(p, bias, batch).compile(compiler_options=FAST_COMPILE)(p, bias, batch)
  return float(loss), jax.device_get(g), p


# the Hugging Face pieces whose params are flat per-head vectors split over 'tensor' (bq, q_norm, ...)
HF_OPTIONS = dict(qkv_bias=True, qk_norm=True, qk_norm_scope='projection', rope_layout='pairs',
                  yarn_factor=4.0, yarn_original_max_len=4)


# gqa and mla in the fast run (~10 s each); the other types' sharded cases in the slow run (each is
# also checked against its naive reference, with documents, on one device)
FAST_SHARDED = ('gqa', 'mla')


@pytest.mark.parametrize('attention,attn', [pytest.param(name, {}, marks=() if name in FAST_SHARDED else pytest.mark.slow)
                                            for name in ATTENTIONS] + [pytest.param('gqa', HF_OPTIONS, marks=pytest.mark.slow)],
                         ids=list(ATTENTIONS) + ['gqa_hf_options'])
def test_attention_type_sharded_over_tensor_data_fsdp_equals_one_device_with_documents_masked(attention, attn):
  cfg, p, bias, batch = sharded_problem(attention, **attn)
  if attn:   # biases and norm scales away from their zeros / ones init, so a misplaced shard shows
    p = jax.tree_util.tree_map_with_path(
        lambda path, w: w + 0.3 * np.random.default_rng(5).standard_normal(w.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith(("['bq']", "['bk']", "['bv']", "_norm']")) else w, p)
  loss1, g1, _ = loss_and_grads(cfg, p, bias, batch, ONE_DEVICE)
  loss8, g8, placed = loss_and_grads(cfg, p, bias, batch, SHARDED_MESH)
  # the heads really are split over 'tensor'
  wq = placed['dense_blocks']['attn']['wq']
  assert {s.data.shape[2] for s in wq.addressable_shards} == {cfg.attn.num_heads // 2}
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  chex.assert_trees_all_close(g8, g1, rtol=1e-4, atol=1e-6)
