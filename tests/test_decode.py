"""Tests for the decode paths (moejax.attention `init_cache` / `decode`, moejax.decode,
moejax.sample.generate): decoding token by token equals the training path at every position, per
attention type and for whole models; greedy generation equals argmax of repeated forward passes."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import make_test_mesh, numpy_init_params, tiny_model_config, tiny_model_dict, update_model
from reference import attention_problem

from moejax import decode, model, sample
from moejax.attention import ATTENTIONS
from moejax.model_config import ModelConfig

B = 2
TOL = dict(rtol=1e-5, atol=1e-5)

# (attention, T, config overrides over reference.SMALL_ATTENTION): T not a multiple of the window /
# blocks / chunk on purpose.
CASES = {
    'gqa': ('gqa', 9, dict(attn=dict(num_heads=4, num_kv_heads=2))),
    'gqa_qk_norm_sinks_softcap': ('gqa', 9, dict(attn=dict(num_heads=4, num_kv_heads=2, qk_norm=True,
                                                           sinks=True, softcap=2.0))),
    'mha': ('mha', 7, {}),
    'mla': ('mla', 9, dict(attn=dict(softcap=3.0))),
    'mla_q_lora': ('mla', 9, dict(mla=dict(q_lora_rank=8), variance_alignment=True)),
    'swa': ('swa', 13, {}),                                           # window 3 < T
    'swa_sinks_softcap': ('swa', 13, dict(attn=dict(sinks=True, softcap=2.0))),
    'nsa': ('nsa', 21, dict(attn=dict(num_heads=4, num_kv_heads=2))),  # 9 cmp blocks, 6 slc blocks
    'nsa_disjoint_blocks': ('nsa', 19, dict(nsa=dict(block=4, stride=4, select_block=2, num_selected=3),
                                            attn=dict(window=5))),
    'kda': ('kda', 11, {}),
    # the pieces Hugging Face models need (moejax.convert): YaRN, interleaved rope, OLMoE's q/k
    # norm over the whole projection, Qwen2's q/k/v biases
    'gqa_hf': ('gqa', 9, dict(attn=dict(num_heads=4, num_kv_heads=2, qk_norm=True, qk_norm_scope='projection',
                                        qkv_bias=True, rope_layout='pairs', yarn_factor=4.0,
                                        yarn_original_max_len=4))),
    'mla_yarn_pairs': ('mla', 9, dict(attn=dict(rope_layout='pairs', yarn_factor=4.0, yarn_original_max_len=4,
                                                yarn_mscale_all_dim=1.0))),
    'mha_bias_yarn_mscales': ('mha', 7, dict(attn=dict(qkv_bias=True, yarn_factor=8.0, yarn_original_max_len=6,
                                                       yarn_mscale=0.707, yarn_mscale_all_dim=1.0,
                                                       yarn_truncate=False))),
    'swa_hf': ('swa', 13, dict(attn=dict(qk_norm=True, qk_norm_scope='projection', qkv_bias=True,
                                         rope_layout='pairs', yarn_factor=4.0, yarn_original_max_len=4))),
    'mla_q_lora_pairs_yarn': ('mla', 9, dict(mla=dict(q_lora_rank=8), attn=dict(
        rope_layout='pairs', yarn_factor=8.0, yarn_original_max_len=6, yarn_mscale=0.707, yarn_mscale_all_dim=0.707))),
}


def decode_all(attention, p, x_BTD, a, max_len):
  """Runs `decode` over every position of x_BTD from an empty cache of max_len; y_BTD, cache."""
  att = ATTENTIONS[attention]

  def step(cache, x_pos):
    y_BD, cache = att.decode(p, x_pos[0], cache, x_pos[1], a)
    return cache, y_BD

  cache = att.init_cache(a, x_BTD.shape[0], max_len, x_BTD.dtype)
  T = x_BTD.shape[1]
  cache, y_TBD = jax.lax.scan(step, cache, (jnp.moveaxis(x_BTD, 1, 0), jnp.arange(T, dtype=jnp.int32)))
  return jnp.moveaxis(y_TBD, 0, 1), cache


def test_every_attention_type_has_a_decode_case():
  assert {attention for attention, _, _ in CASES.values()} == set(ATTENTIONS)


@pytest.mark.parametrize('case', list(CASES))
def test_decode_token_by_token_equals_training_path_at_every_position(case):
  attention, T, overrides = CASES[case]
  a, p, x, _ = attention_problem(attention, T, **overrides)
  if 'sinks' in p:
    p['sinks'] = p['sinks'] + jnp.linspace(-1.0, 1.0, p['sinks'].shape[0])
  y_train = jax.jit(lambda p, x: ATTENTIONS[attention].apply(p, x, a)[0])(p, x)
  y_dec, _ = jax.jit(lambda p, x: decode_all(attention, p, x, a, T + 3))(p, x)
  assert float(jnp.std(y_train)) > 1e-2
  chex.assert_trees_all_close(y_dec, y_train, **TOL)


def test_decode_caches_hold_what_each_type_needs():
  """SWA's ring and KDA's state do not grow with max_len; MLA caches only the latent and the RoPE
  key; NSA keeps one compressed key/value per block of max_len."""
  a = tiny_model_config(attn=dict(window=3), nsa=dict(block=4, stride=2, select_block=4), kda=dict(conv=3)).attn
  shapes = lambda n, L: jax.tree.map(lambda c: c.shape, ATTENTIONS[n].init_cache(a, B, L, jnp.float32))
  assert shapes('swa', 100) == shapes('swa', 1000) == {'k': (B, 3, 2, 8), 'v': (B, 3, 2, 8)}
  assert shapes('kda', 100) == shapes('kda', 1000)
  assert shapes('kda', 100)['state'] == (B, 4, 8, 8) and shapes('kda', 100)['conv_q'] == (B, 2, 4, 8)
  assert shapes('mla', 100) == {'latent': (B, 100, a.mla.kv_lora_rank),
                                'k_rope': (B, 100, a.mla.qk_rope_head_dim)}
  nsa = shapes('nsa', 21)
  assert nsa['cmp']['kc'] == (B, 9, 2, 8) and nsa['cmp']['k'] == (B, 4, 2, 8)
  assert nsa['slc']['k'] == (B, 24, 2, 8) and nsa['win']['k'] == (B, 3, 2, 8)


# ----------------------------------------------------------------------------- whole model

SHAPES = dict(attn=dict(window=3), nsa=dict(block=4, stride=2, select_block=4, num_selected=2),
              kda=dict(chunk=4, conv=3), init_std=0.1, dispatch='dropless')
MODELS = {
    'tiny': {},
    # dense [kda]; MoE [kda, mla, kda]: the unit (kda, mla) scanned once + one layer after the scan
    'kda_kda_mla_scmoe': dict(attention='kda,kda,mla', num_layers=4, num_dense_layers=1,
                              block='scmoe', tie_embeddings=True,
                              router=dict(num_zero_experts=2, target_active_experts=1.5)),
    # width transfer's output multiplier, group-limited routing, Qwen2-MoE's gated shared expert
    'base_width_groups_shared_gate': dict(base_width=8, router=dict(n_group=2, topk_group=1),
                                          shared_expert_gate=True, shared_expert_ffn_dim=24),
    # logits x 1/m (m = d_model / base_width = 4) on both paths, with the HF attention pieces
    'base_width_hf_attention': dict(base_width=8, attention='gqa,mla', num_layers=3, attn=dict(
        rope_layout='pairs', yarn_factor=4.0, yarn_original_max_len=4, yarn_mscale_all_dim=1.0)),
}


def model_problem(name, T, seed=0):
  """config.model (a ConfigDict), its ModelConfig, a mesh, params, router bias and tokens."""
  m = update_model(tiny_model_dict(**SHAPES), MODELS[name])
  cfg = ModelConfig.from_config(m)
  p = numpy_init_params(model.model_specs(cfg), seed)
  bias = 0.05 * jax.random.normal(jax.random.key(seed), (cfg.num_moe_layers, cfg.router.num_routed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (B, T), 0, cfg.vocab_size)
  return m, cfg, make_test_mesh({'data': 1, 'expert': 1}), p, bias, tokens


@pytest.mark.parametrize('name', list(MODELS))
def test_decode_step_logits_equal_forward_logits_at_every_position(name):
  T = 11
  _, cfg, mesh, p, bias, tokens = model_problem(name, T)
  logits, _ = jax.jit(lambda p, b, t: model.forward(p, b, t, cfg, mesh))(p, bias, tokens)
  caches = decode.init_caches(p, cfg, B, T + 2)
  dec, caches = jax.jit(lambda p, b, c, t: decode.prefill(p, b, c, t, cfg, mesh))(p, bias, caches, tokens)
  assert float(jnp.std(logits)) > 1e-2
  chex.assert_trees_all_close(dec, logits, **TOL)


def greedy_by_forward(cfg, mesh, p, bias, prompt, max_new, T):
  """Argmax of model.forward over the context generate() keeps: the growing prefix, restarted from
  its latest T // 2 tokens when it holds T."""
  fwd = jax.jit(lambda toks: model.forward(p, bias, toks, cfg, mesh)[0])
  ids, ctx = list(prompt), list(prompt[-T:])
  for _ in range(max_new):
    padded = jnp.zeros((1, T), jnp.int32).at[0, :len(ctx)].set(jnp.asarray(ctx))
    ids.append(int(jnp.argmax(fwd(padded)[0, len(ctx) - 1])))
    ctx = ids[-(T // 2):] if len(ctx) == T else ctx + ids[-1:]
  return ids


def test_greedy_generate_equals_argmax_of_forward_on_the_growing_prefix_and_restarts_when_full():
  T, prompt_len, max_new = 8, 6, 7   # the context fills after 3 new tokens and restarts
  m, cfg, mesh, p, bias, tokens = model_problem('tiny', prompt_len)
  config = ml_collections.ConfigDict({'model': m, 'train': {'seq_len': T}})
  prompt = [int(t) for t in tokens[0]]
  got = sample.generate(config, mesh, p, bias, prompt, max_new, temperature=0.0, top_k=5, seed=0)
  want = greedy_by_forward(cfg, mesh, p, bias, prompt, max_new, T)
  assert got[:prompt_len] == prompt and len(got) == prompt_len + max_new
  assert got == want
  assert len(set(got[prompt_len:])) > 1    # not a degenerate constant continuation
