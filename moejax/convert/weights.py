"""Which Hugging Face tensor each moejax parameter comes from, and how it is laid out.

A moejax block parameter (a leaf of `params['dense_blocks']` / `params['moe_blocks']`, stacked over
the blocks of that kind) maps, per layer i, to one HF tensor (`'model.layers.{i}.self_attn.q_proj.weight'`)
or, for expert weights, one per expert (`...experts.{e}.gate_proj.weight`). Layouts:
- 'in':   moejax [in, *out]  <-> HF nn.Linear [prod(out), in]   (q_proj -> wq [D, H, N])
- 'out':  moejax [*in, out]  <-> HF nn.Linear [out, prod(in)]   (o_proj -> wo [H, N, D])
- 'flat': moejax [...]       <-> HF [prod(...)]                  (norm scales, biases)
- 'same': the same array                                          (embed_tokens -> embed)
Every layout is a transpose and/or reshape, so import -> export returns every tensor bit for bit.
"""
import numpy as np

from moejax.convert.hf_config import ConvertError


def to_moejax(a: np.ndarray, layout: str, shape: tuple) -> np.ndarray:
  if layout == 'in':
    if a.ndim != 2 or a.shape[1] != shape[0] or a.shape[0] != int(np.prod(shape[1:])):
      raise ValueError(f'shape {a.shape}, expected [{int(np.prod(shape[1:]))}, {shape[0]}]')
    return a.T.reshape(shape)
  if layout == 'out':
    if a.ndim != 2 or a.shape[0] != shape[-1] or a.shape[1] != int(np.prod(shape[:-1])):
      raise ValueError(f'shape {a.shape}, expected [{shape[-1]}, {int(np.prod(shape[:-1]))}]')
    return a.T.reshape(shape)
  if a.size != int(np.prod(shape)) or (layout == 'same' and a.shape != tuple(shape)):
    raise ValueError(f'shape {a.shape}, expected {tuple(shape)}')
  return a.reshape(shape)


def to_hf(m: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'in':
    return np.ascontiguousarray(m.reshape(m.shape[0], -1).T)
  if layout == 'out':
    return np.ascontiguousarray(m.reshape(-1, m.shape[-1]).T)
  if layout == 'flat':
    return m.reshape(-1)
  return m


def top_level(cfg) -> dict:
  """moejax top-level leaf -> (HF name, layout)."""
  out = {('embed',): ('model.embed_tokens.weight', 'same'), ('final_norm',): ('model.norm.weight', 'flat')}
  if not cfg.tie_embeddings:
    out[('head',)] = ('lm_head.weight', 'in')
  return out


def _attention(hf_type: str, cfg) -> dict:
  a = 'model.layers.{i}.self_attn.'
  if cfg.attention == 'mla':
    out = {('attn', 'wkv_a'): (a + 'kv_a_proj_with_mqa.weight', 'in'),
           ('attn', 'kv_norm'): (a + 'kv_a_layernorm.weight', 'flat'),
           ('attn', 'wkv_b'): (a + 'kv_b_proj.weight', 'in'),
           ('attn', 'wo'): (a + 'o_proj.weight', 'out')}
    if cfg.attn.mla.q_lora_rank:
      out.update({('attn', 'wq_a'): (a + 'q_a_proj.weight', 'in'),
                  ('attn', 'q_norm'): (a + 'q_a_layernorm.weight', 'flat'),
                  ('attn', 'wq_b'): (a + 'q_b_proj.weight', 'in')})
    else:
      out[('attn', 'wq')] = (a + 'q_proj.weight', 'in')
    return out
  out = {('attn', f'w{x}'): (a + f'{x}_proj.weight', 'in') for x in 'qkv'}
  out[('attn', 'wo')] = (a + 'o_proj.weight', 'out')
  if cfg.attn.qk_norm:
    out.update({('attn', 'q_norm'): (a + 'q_norm.weight', 'flat'), ('attn', 'k_norm'): (a + 'k_norm.weight', 'flat')})
  if cfg.attn.qkv_bias:
    out.update({('attn', f'b{x}'): (a + f'{x}_proj.bias', 'flat') for x in 'qkv'})
  return out


def _ffn(hf_type: str, cfg, kind: str) -> tuple[dict, dict]:
  """(per-layer leaves, per-expert leaves) of a block's FFN."""
  if hf_type == 'mixtral':
    m = 'model.layers.{i}.block_sparse_moe.'
    return ({('ffn', 'router'): (m + 'gate.weight', 'in')},
            {('ffn', 'w_gate'): (m + 'experts.{e}.w1.weight', 'in'), ('ffn', 'w_up'): (m + 'experts.{e}.w3.weight', 'in'),
             ('ffn', 'w_down'): (m + 'experts.{e}.w2.weight', 'in')})
  m = 'model.layers.{i}.mlp.'
  if kind == 'dense':
    return {('ffn', f'w_{x}'): (m + f'{x}_proj.weight', 'in') for x in ('gate', 'up', 'down')}, {}
  layer = {('ffn', 'router'): (m + 'gate.weight', 'in')}
  if cfg.num_shared_experts:
    shared = 'shared_expert.' if hf_type == 'qwen2_moe' else 'shared_experts.'
    layer.update({('ffn', 'shared', f'w_{x}'): (m + shared + f'{x}_proj.weight', 'in') for x in ('gate', 'up', 'down')})
  if cfg.shared_expert_gate:
    layer[('ffn', 'shared_gate')] = (m + 'shared_expert_gate.weight', 'in')   # Linear(D, 1)
  experts = {('ffn', f'w_{x}'): (m + 'experts.{e}.' + f'{x}_proj.weight', 'in') for x in ('gate', 'up', 'down')}
  return layer, experts


def block_leaves(hf_type: str, cfg, kind: str) -> tuple[dict, dict]:
  """(per-layer, per-expert) maps of one block kind: moejax leaf path -> (HF name template, layout)."""
  layer = {('attn_norm',): ('model.layers.{i}.input_layernorm.weight', 'flat'),
           ('ffn_norm',): ('model.layers.{i}.post_attention_layernorm.weight', 'flat'),
           **_attention(hf_type, cfg)}
  ffn_layer, experts = _ffn(hf_type, cfg, kind)
  layer.update(ffn_layer)
  return layer, experts


def router_bias_name(hf_type: str) -> str | None:
  """Where DeepSeek-V3 keeps the selection bias moejax keeps in state['router_bias']."""
  return 'model.layers.{i}.mlp.gate.e_score_correction_bias' if hf_type in ('deepseek_v3', 'kimi_k2') else None


def fused_experts(path: tuple, name: str) -> tuple[str, slice | None] | None:
  """transformers' fused layout of the same experts: (tensor, slice of its dim 1) or None.
  gate_up_proj [E, 2F, D] holds gate then up; down_proj [E, D, F]."""
  prefix = name.split('experts.')[0] + 'experts.'
  if path[-1] in ('w_gate', 'w_up'):
    return prefix + 'gate_up_proj', path[-1]
  if path[-1] == 'w_down':
    return prefix + 'down_proj', None
  raise ConvertError(f'{name}: no fused form')
