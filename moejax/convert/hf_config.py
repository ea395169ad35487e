"""Hugging Face config.json <-> moejax `config.model`, per architecture family.

`to_moejax(hf)` returns the `model.*` settings that describe the HF model (a flat dict of dotted
keys, e.g. {'model.d_model': 2048, 'model.router.n_group': 8}) or raises ConvertError naming the
feature moejax cannot express. `to_hf(config, family, base)` writes the HF config back: the imported
model's own config.json (`base`, kept in the workdir) with the shapes moejax trained.
"""
from moejax.errors import ConfigError


class ConvertError(ValueError):
  """A model moejax cannot convert: one line naming the file, tensor or feature."""


FAMILIES = {   # model_type -> family (weight layout and routing of the same kind)
    'deepseek_v3': 'deepseek', 'deepseek_v2': 'deepseek', 'kimi_k2': 'deepseek',
    'qwen3_moe': 'qwen', 'qwen2_moe': 'qwen', 'olmoe': 'qwen', 'mixtral': 'mixtral',
}


def family(hf: dict) -> str:
  t = hf.get('model_type')
  if t not in FAMILIES:
    raise ConvertError(f'config.json: model_type {t!r} is not one moejax converts '
                       f'({", ".join(sorted(FAMILIES))})')
  return FAMILIES[t]


def _rope(hf: dict, out: dict):
  rp = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  out['model.attn.rope_theta'] = float(rp.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = rp.get('rope_type', rp.get('type', 'default'))
  if kind == 'yarn':
    out.update({'model.attn.yarn_factor': float(rp['factor']),
                'model.attn.yarn_original_max_len': int(rp.get('original_max_position_embeddings')
                                                        or hf['max_position_embeddings']),
                'model.attn.yarn_beta_fast': float(rp.get('beta_fast', 32.0)),
                'model.attn.yarn_beta_slow': float(rp.get('beta_slow', 1.0)),
                'model.attn.yarn_mscale': float(rp.get('mscale') or 1.0),
                'model.attn.yarn_mscale_all_dim': float(rp.get('mscale_all_dim') or 0.0),
                'model.attn.yarn_truncate': bool(rp.get('truncate', True))})
    if rp.get('attention_factor') is not None:
      raise ConvertError('config.json: rope_parameters.attention_factor set by hand is not supported')
  elif kind != 'default':
    raise ConvertError(f'config.json: RoPE scaling {kind!r} (moejax has default and yarn)')


def _refuse(hf: dict):
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConvertError(f"config.json: hidden_act {hf['hidden_act']!r} (moejax's FFNs are SwiGLU)")
  if hf.get('sliding_window') and hf.get('use_sliding_window', True) and hf.get('model_type') != 'qwen2_moe':
    raise ConvertError(f"config.json: sliding_window {hf['sliding_window']} (a per-model window is not mapped)")
  if hf.get('use_sliding_window'):
    raise ConvertError('config.json: use_sliding_window (a per-model window is not mapped)')
  if hf.get('clip_qkv'):
    raise ConvertError(f"config.json: clip_qkv {hf['clip_qkv']} (moejax does not clip q/k/v)")
  if hf.get('attention_bias') and hf.get('model_type') not in ('qwen2_moe',):
    raise ConvertError('config.json: attention_bias (biases on the attention projections)')
  if hf.get('mlp_bias'):
    raise ConvertError('config.json: mlp_bias (biases on the MLP projections)')


def _dense_first(hf: dict, num_layers: int) -> int:
  """Qwen-style dense layers (mlp_only_layers, decoder_sparse_step) as moejax's first-k dense."""
  step = hf.get('decoder_sparse_step', 1) or 1
  dense = set(hf.get('mlp_only_layers') or [])
  dense |= {i for i in range(num_layers) if (i + 1) % step != 0}
  k = len(dense)
  if dense != set(range(k)):
    raise ConvertError(f'config.json: dense layers {sorted(dense)} (mlp_only_layers / decoder_sparse_step); '
                       'moejax runs its dense layers first')
  return k


def to_moejax(hf: dict) -> dict:
  fam = family(hf)
  _refuse(hf)
  t = hf['model_type']
  L = hf['num_hidden_layers']
  out = {'model.vocab_size': hf['vocab_size'], 'model.d_model': hf['hidden_size'], 'model.num_layers': L,
         'model.norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
         'model.tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
         'model.attn.num_heads': hf['num_attention_heads'], 'model.bias_update_rate': 0.0,
         'model.router.norm_topk': bool(hf.get('norm_topk_prob', True)), 'model.router.routed_scaling': 1.0,
         'model.num_shared_experts': 0}
  _rope(hf, out)
  if fam == 'deepseek':
    if hf.get('moe_layer_freq', 1) != 1:
      raise ConvertError(f"config.json: moe_layer_freq {hf['moe_layer_freq']} (MoE every layer after the dense ones)")
    H = hf['num_attention_heads']
    out.update({
        'model.attention': 'mla', 'model.attn.num_kv_heads': H,
        'model.attn.rope_layout': 'pairs' if hf.get('rope_interleave', t == 'deepseek_v2') else 'halves',
        'model.mla.q_lora_rank': hf.get('q_lora_rank') or 0, 'model.mla.kv_lora_rank': hf['kv_lora_rank'],
        'model.mla.qk_nope_head_dim': hf['qk_nope_head_dim'], 'model.mla.qk_rope_head_dim': hf['qk_rope_head_dim'],
        'model.mla.v_head_dim': hf['v_head_dim'], 'model.attn.head_dim': hf['qk_rope_head_dim'],
        'model.num_dense_layers': min(hf.get('first_k_dense_replace', 0), L),
        'model.dense_ffn_dim': hf['intermediate_size'], 'model.expert_ffn_dim': hf['moe_intermediate_size'],
        'model.num_experts': hf['n_routed_experts'], 'model.top_k': hf['num_experts_per_tok'],
        'model.num_shared_experts': hf.get('n_shared_experts') or 0,
        'model.router.routed_scaling': float(hf.get('routed_scaling_factor', 1.0)),
        'model.router.n_group': hf.get('n_group') or 1, 'model.router.topk_group': hf.get('topk_group') or 1})
    if t == 'deepseek_v2':
      method = hf.get('topk_method', 'greedy')
      if method not in ('greedy', 'group_limited_greedy'):
        raise ConvertError(f'config.json: topk_method {method!r}')
      out.update({'model.router.score': 'softmax', 'model.router.group_score': 'max',
                  'model.router.norm_topk': False})   # transformers' V2 router never renormalises
      if method == 'greedy':
        out.update({'model.router.n_group': 1, 'model.router.topk_group': 1})
    else:
      if hf.get('scoring_func', 'sigmoid') != 'sigmoid' or hf.get('topk_method', 'noaux_tc') != 'noaux_tc':
        raise ConvertError(f"config.json: scoring_func {hf.get('scoring_func')!r} / topk_method "
                           f"{hf.get('topk_method')!r} (DeepSeek-V3 routing is sigmoid + noaux_tc)")
      out.update({'model.router.score': 'sigmoid', 'model.router.group_score': 'top2_sum',
                  'model.bias_update_rate': 1e-3})   # DeepSeek-V3's loss-free balancing rate
    return out
  # GQA families
  H = hf['num_attention_heads']
  out.update({'model.attention': 'gqa', 'model.attn.num_kv_heads': hf.get('num_key_value_heads') or H,
              'model.attn.head_dim': hf.get('head_dim') or hf['hidden_size'] // H,
              'model.attn.rope_layout': 'halves', 'model.router.score': 'softmax',
              'model.router.n_group': 1, 'model.router.topk_group': 1})
  if t == 'mixtral':
    out.update({'model.num_experts': hf['num_local_experts'], 'model.top_k': hf['num_experts_per_tok'],
                'model.expert_ffn_dim': hf['intermediate_size'], 'model.dense_ffn_dim': hf['intermediate_size'],
                'model.num_dense_layers': 0, 'model.router.norm_topk': True})
    return out
  out.update({'model.num_experts': hf.get('num_experts') or hf['num_local_experts'], 'model.top_k': hf['num_experts_per_tok'],
              'model.expert_ffn_dim': hf.get('moe_intermediate_size') or hf['intermediate_size'],
              'model.dense_ffn_dim': hf['intermediate_size'],
              'model.num_dense_layers': _dense_first(hf, L)})
  if t == 'olmoe':
    out.update({'model.attn.qk_norm': True, 'model.attn.qk_norm_scope': 'projection'})
  elif t == 'qwen3_moe':
    out.update({'model.attn.qk_norm': True, 'model.attn.qk_norm_scope': 'head'})
  elif t == 'qwen2_moe':
    out.update({'model.attn.qkv_bias': True, 'model.num_shared_experts': 1, 'model.shared_expert_gate': True,
                'model.shared_expert_ffn_dim': hf['shared_expert_intermediate_size']})
  return out


def apply(config, settings: dict):
  """Sets dotted `model.*` keys on a ConfigDict (ConfigError when moejax has no such key)."""
  for key, value in settings.items():
    node, *path, leaf = key.split('.')
    d = config[node]
    for p in path:
      d = d[p]
    if leaf not in d:
      raise ConfigError(f'{key}: this moejax has no such setting (needed to describe the model)')
    d[leaf] = value


def to_hf(config, base: dict) -> dict:
  """The HF config of a moejax run: the imported config.json with the trained shapes checked."""
  want = to_moejax(base)
  for key, value in want.items():
    node = config
    for p in key.split('.'):
      node = node[p]
    if node != value and not isinstance(value, float):
      raise ConvertError(f'{key}: the run has {node!r}, the imported config.json says {value!r}; '
                         'export writes the imported architecture only')
  return dict(base)
