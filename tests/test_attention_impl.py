"""The fused attention implementations (model.attn.implementation, moejax.attention.fused) against
the naive per-head reference and the XLA path: forward, gradient and max logit, with document masks,
the sliding window, GQA grouping and MLA's unequal head dims. On CPU jax.nn runs its XLA
implementation and tokamax falls back to its XLA one; the kernels are checked by
`python -m moejax.tools.device_check` on a GPU/TPU host."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from reference import DOC_SEGMENTS, TOL, assert_softmax_matches_reference, attention_problem, ref_softmax

from moejax.attention import ATTENTIONS, core, fused
from moejax.errors import ConfigError

# (attention, config.model overrides, with segments)
CASES = {
    'gqa_segments': ('gqa', {}, True),
    'mha': ('mha', {}, False),
    'swa_segments': ('swa', {'attn': dict(window=4)}, True),
    'mla_segments': ('mla', {}, True),
    'gqa_softcap': ('gqa', {'attn': dict(softcap=2.0)}, False),
}


# jax.nn.dot_product_attention has no soft cap (a ConfigError, tested below)
PAIRS = [(case, impl) for case in CASES for impl in fused.FUSED
         if not (impl == 'dot_product_attention' and 'softcap' in case)]


@pytest.mark.parametrize('case, impl', PAIRS)
def test_fused_implementation_matches_naive_reference_forward_grad_and_max_logit(case, impl):
  attention, overrides, with_segments = CASES[case]
  a, p, x, r = attention_problem(attention, 12, shapes={}, **overrides)
  assert_softmax_matches_reference(dataclasses.replace(a, implementation=impl), a, attention, p, x, r,
                                   DOC_SEGMENTS if with_segments else None)


@pytest.mark.parametrize('window', [None, 5])
def test_blocked_logit_max_equals_the_xla_paths_for_every_block_size(window):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 13, 2, 3, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 13, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 13, 2, 8)), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, 13)), axis=1), jnp.int32)
  ref = (core.causal_softmax_attention(q, k, v, seg) if window is None
         else core.sliding_window_attention(q, k, v, window, seg))[1]
  for block in (1, 4, 13, 64):
    np.testing.assert_allclose(fused.logit_max(q, k, seg, window, block), ref, rtol=1e-6)


def test_auto_picks_per_backend_and_keeps_xla_for_sinks_and_cpu():
  assert fused.resolve('auto', 'cpu') == 'xla'
  assert fused.resolve('auto', 'gpu') == 'dot_product_attention'
  assert fused.resolve('auto', 'gpu', softcap=30.0) == 'tokamax'
  assert fused.resolve('auto', 'tpu') == 'tokamax'
  assert fused.resolve('auto', 'gpu', sinks=True) == 'xla'
  assert fused.resolve('tokamax', 'cpu') == 'tokamax'


def test_auto_on_cpu_gives_bitwise_the_xla_output():
  a, p, x, _ = attention_problem('gqa', 12, shapes={})
  y_xla, _ = ATTENTIONS['gqa'].apply(p, x, a, DOC_SEGMENTS)
  y_auto, _ = ATTENTIONS['gqa'].apply(p, x, dataclasses.replace(a, implementation='auto'), DOC_SEGMENTS)
  np.testing.assert_array_equal(y_auto, y_xla)


@pytest.mark.parametrize('attn,text', [
    (dict(implementation='flash'), "'flash'"),
    (dict(implementation='tokamax', sinks=True), 'sinks'),
    (dict(implementation='dot_product_attention', softcap=5.0), 'soft cap')])
def test_unsupported_implementation_settings_are_one_line_config_errors(attn, text):
  with pytest.raises(ConfigError, match='model.attn.implementation') as info:
    tiny_model_config(attn=attn)
  assert text in str(info.value) and '\n' not in str(info.value)
