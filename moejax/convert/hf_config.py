"""Hugging Face config.json <-> moejax `config.model`, per architecture family.

`to_moejax(hf)` returns the `model.*` settings that describe the HF model (a flat dict of dotted
keys, e.g. {'model.d_model': 2048, 'model.router.n_group': 8}; its dense layers, in any pattern,
as model.num_dense_layers + model.dense_layers) or raises ConvertError naming the feature moejax
cannot express. `to_hf(config, base)` writes the HF config back: `base`, the imported model's own
config.json (kept in the workdir), or for a run trained from scratch `from_moejax(config)`, once
the run is checked to be that architecture.
"""
from moejax.configs import base_config
from moejax.errors import ConfigError


class ConvertError(ValueError):
  """A model moejax cannot convert: one line naming the file, tensor or feature."""


FAMILIES = {   # model_type -> family (weight layout and routing of the same kind)
    'deepseek_v3': 'deepseek', 'deepseek_v2': 'deepseek', 'kimi_k2': 'deepseek',
    'qwen3_moe': 'qwen', 'qwen2_moe': 'qwen', 'olmoe': 'qwen', 'mixtral': 'mixtral',
}


def _first(hf: dict, *keys, default=None):
  """The value of the first of `keys` the config has (transformers saves some fields under an
  alias: Qwen3-MoE's num_experts as num_local_experts)."""
  return next((hf[k] for k in keys if hf.get(k) is not None), default)


def num_experts(hf: dict) -> int:
  return _first(hf, 'n_routed_experts', 'num_experts', 'num_local_experts', default=0)


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
  window = hf.get('sliding_window') if hf.get('use_sliding_window', True) else None
  if window and window < hf.get('max_position_embeddings', window + 1):   # a wider window never applies
    raise ConvertError(f'config.json: sliding_window {window} (a per-model window is not mapped)')
  if hf.get('clip_qkv'):
    raise ConvertError(f"config.json: clip_qkv {hf['clip_qkv']} (moejax does not clip q/k/v)")
  if hf.get('attention_bias') and hf.get('model_type') not in ('qwen2_moe',):
    raise ConvertError('config.json: attention_bias (biases on the attention projections)')
  if hf.get('mlp_bias'):
    raise ConvertError('config.json: mlp_bias (biases on the MLP projections)')


def _qwen_dense(hf: dict, L: int) -> list[int]:
  """transformers' Qwen2/3-MoE rule: layer i is sparse iff it is not in mlp_only_layers, the model
  has experts and (i + 1) % decoder_sparse_step == 0."""
  step = hf.get('decoder_sparse_step', 1)
  if not isinstance(step, int) or step < 1:
    raise ConvertError(f'config.json: decoder_sparse_step {step!r} (need an integer >= 1)')
  only = hf.get('mlp_only_layers') or []
  if any(not isinstance(i, int) or not 0 <= i < L for i in only):
    raise ConvertError(f'config.json: mlp_only_layers {only!r} (need layer indices in [0, {L}))')
  return [i for i in range(L) if i in only or not num_experts(hf) or (i + 1) % step != 0]


def _deepseek_dense(hf: dict, L: int, names) -> list[int]:
  """The first first_k_dense_replace layers (transformers). DeepSeek's own code (and vLLM) also
  keep layer i dense unless i % moe_layer_freq == 0; transformers ignores moe_layer_freq, so with
  a frequency above 1 the tensors tell which of the two the checkpoint follows."""
  k = hf.get('first_k_dense_replace', 3 if hf['model_type'] != 'deepseek_v2' else 0)
  if not isinstance(k, int) or k < 0:
    raise ConvertError(f'config.json: first_k_dense_replace {k!r} (need an integer >= 0)')
  first_k = list(range(min(k, L)))
  freq = hf.get('moe_layer_freq', 1)
  if freq == 1:
    return first_k
  if not isinstance(freq, int) or freq < 1:
    raise ConvertError(f'config.json: moe_layer_freq {freq!r} (need an integer >= 1)')
  routed = names is not None and {i for i in range(L) if f'model.layers.{i}.mlp.gate.weight' in names}
  if routed == set(range(len(first_k), L)):
    return first_k
  return sorted(set(first_k) | {i for i in range(L) if i % freq})


def dense_layers(hf: dict, names=None) -> list[int]:
  """The indices of the layers with a dense FFN (the others are MoE), as transformers builds them."""
  t, L = hf['model_type'], hf['num_hidden_layers']
  if family(hf) == 'deepseek':
    return _deepseek_dense(hf, L, names)
  if t in ('qwen2_moe', 'qwen3_moe'):
    return _qwen_dense(hf, L)
  return []   # Mixtral, OLMoE: every layer is MoE


def layer_pattern(dense: list[int], L: int) -> dict:
  """moejax's leading dense run (num_dense_layers) and the dense layers after it (dense_layers)."""
  k = next((i for i in range(L) if i not in dense), L)
  return {'model.num_dense_layers': k, 'model.dense_layers': ','.join(str(i) for i in dense if i >= k)}


def _deepseek(hf: dict, out: dict):
  t, H = hf['model_type'], hf['num_attention_heads']
  out.update({
      'model.attention': 'mla', 'model.attn.num_kv_heads': H,
      # transformers' DeepSeek-V2 always rotates interleaved pairs (complex form); V3 by rope_interleave
      'model.attn.rope_layout': 'pairs' if t == 'deepseek_v2' or hf.get('rope_interleave', True) else 'halves',
      'model.mla.q_lora_rank': hf.get('q_lora_rank') or 0, 'model.mla.kv_lora_rank': hf['kv_lora_rank'],
      'model.mla.qk_nope_head_dim': hf['qk_nope_head_dim'], 'model.mla.qk_rope_head_dim': hf['qk_rope_head_dim'],
      'model.mla.v_head_dim': hf['v_head_dim'], 'model.attn.head_dim': hf['qk_rope_head_dim'],
      'model.dense_ffn_dim': hf['intermediate_size'], 'model.expert_ffn_dim': hf['moe_intermediate_size'],
      'model.num_experts': num_experts(hf), 'model.top_k': hf['num_experts_per_tok'],
      'model.num_shared_experts': hf.get('n_shared_experts') or 0,
      'model.router.routed_scaling': float(hf.get('routed_scaling_factor', 1.0)),
      'model.router.n_group': hf.get('n_group') or 1, 'model.router.topk_group': hf.get('topk_group') or 1})
  if t == 'deepseek_v2':
    method = hf.get('topk_method', 'greedy')
    if method not in ('greedy', 'group_limited_greedy'):
      raise ConvertError(f'config.json: topk_method {method!r} (DeepSeek-V2 routing is greedy or group_limited_greedy)')
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


def _gqa(hf: dict, out: dict):
  t, H = hf['model_type'], hf['num_attention_heads']
  out.update({'model.attention': 'gqa', 'model.attn.num_kv_heads': hf.get('num_key_value_heads') or H,
              'model.attn.head_dim': hf.get('head_dim') or hf['hidden_size'] // H,
              'model.attn.rope_layout': 'halves', 'model.router.score': 'softmax',
              'model.router.n_group': 1, 'model.router.topk_group': 1,
              'model.dense_ffn_dim': hf['intermediate_size'],
              'model.num_experts': num_experts(hf), 'model.top_k': hf['num_experts_per_tok'],
              'model.expert_ffn_dim': hf.get('moe_intermediate_size') or hf['intermediate_size']})
  if t == 'mixtral':
    out['model.router.norm_topk'] = True   # Mixtral always renormalises its top-k
  if t == 'olmoe':
    out.update({'model.attn.qk_norm': True, 'model.attn.qk_norm_scope': 'projection'})
  elif t == 'qwen3_moe':
    out.update({'model.attn.qk_norm': True, 'model.attn.qk_norm_scope': 'head'})
  if t == 'qwen2_moe':
    out.update({'model.attn.qkv_bias': bool(hf.get('qkv_bias', True))})
    if hf.get('shared_expert_intermediate_size'):
      out.update({'model.num_shared_experts': 1, 'model.shared_expert_gate': True,
                  'model.shared_expert_ffn_dim': hf['shared_expert_intermediate_size']})


def to_moejax(hf: dict, names=None) -> dict:
  """The `model.*` settings of an HF config (`names`: its tensor names, where the layer pattern
  needs them)."""
  family(hf)
  _refuse(hf)
  L = hf['num_hidden_layers']
  out = {'model.vocab_size': hf['vocab_size'], 'model.d_model': hf['hidden_size'], 'model.num_layers': L,
         'model.norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
         'model.tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
         'model.attn.num_heads': hf['num_attention_heads'], 'model.bias_update_rate': 0.0,
         'model.router.norm_topk': bool(hf.get('norm_topk_prob', hf['model_type'] in ('deepseek_v3', 'kimi_k2'))),
         'model.router.routed_scaling': 1.0,
         'model.num_shared_experts': 0}
  _rope(hf, out)
  (_deepseek if family(hf) == 'deepseek' else _gqa)(hf, out)
  dense = dense_layers(hf, names)
  if len(dense) == L:   # orbax cannot save the router state of zero MoE layers (a [0, E] array)
    raise ConvertError(f'config.json: no MoE layer (dense layers {dense}); moejax checkpoints need at least one')
  out.update(layer_pattern(dense, L))
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


def _get(config, key: str):
  node = config
  for p in key.split('.'):
    node = node[p]
  return node


PATTERN = ('model.num_dense_layers', 'model.dense_layers')   # checked as the kind of each layer
TRAINING_ONLY = ('model.bias_update_rate',)   # set by import, free to change while training
MLA_UNUSED = ('model.attn.num_kv_heads', 'model.attn.head_dim', 'model.attn.qk_norm', 'model.attn.qk_norm_scope',
              'model.attn.qkv_bias')
# settings that change the forward pass besides those to_moejax sets: the run must have the value
# the architecture implies (base_config's, where to_moejax leaves it); moejax-only features among them
FORWARD = ('model.attention', 'model.attn.qk_norm', 'model.attn.qk_norm_scope', 'model.attn.qkv_bias',
           'model.attn.softcap', 'model.attn.sinks', 'model.attn.yarn_factor', 'model.num_shared_experts',
           'model.shared_expert_ffn_dim', 'model.shared_expert_gate', 'model.block', 'model.base_width',
           'model.variance_alignment', 'model.router.num_zero_experts', 'model.router.routing')


def _checked_keys(config, want: dict) -> list[str]:
  skip = set(PATTERN + TRAINING_ONLY) | (set(MLA_UNUSED) if want['model.attention'] == 'mla' else set())
  if not _get(config, 'model.attn.qk_norm') and not want.get('model.attn.qk_norm'):
    skip.add('model.attn.qk_norm_scope')
  return [k for k in dict.fromkeys(list(want) + list(FORWARD)) if k not in skip]


def _layer_kinds(config) -> tuple[str, ...]:
  from moejax.model_config import ModelConfig
  return ModelConfig.from_config(config.model).layer_kinds


def to_hf(config, base: dict) -> dict:
  """The HF config of a moejax run: `base` (the imported config.json, or from_moejax's), once the
  run is checked to be the architecture it describes: every setting it maps to and every other
  one that changes the forward pass, and the kind of each layer."""
  kinds = _layer_kinds(config)
  routers = {f'model.layers.{i}.mlp.gate.weight' for i, k in enumerate(kinds) if k == 'moe'}
  want = to_moejax(base, routers)
  dense = [i for i, k in enumerate(kinds) if k == 'dense']
  if dense != dense_layers(base, routers):
    raise ConvertError(f'model.num_dense_layers / model.dense_layers: the run has dense layers {dense}, '
                       f'{base["model_type"]} {dense_layers(base, routers)}; export writes that architecture only')
  defaults = base_config()
  for key in _checked_keys(config, want):
    value = want[key] if key in want else _get(defaults, key)
    if _get(config, key) != value:
      raise ConvertError(f'{key}: the run has {_get(config, key)!r}, the Hugging Face {base["model_type"]} '
                         f'architecture {value!r}; export writes that architecture only')
  return dict(base)


def from_moejax(config) -> dict:
  """The HF config of a run trained from scratch: DeepSeek-V3's, the architecture of moejax's MLA
  with sigmoid routing and its selection bias (to_hf then checks the rest of the run against it)."""
  m = config.model
  if m.attention != 'mla' or m.router.score != 'sigmoid':
    raise ConvertError(f'model.attention {m.attention!r} / model.router.score {m.router.score!r}: a run trained '
                       "from scratch exports as DeepSeek-V3, which needs attention 'mla' and score 'sigmoid'")
  a, mla, r = m.attn, m.mla, m.router
  rope = {'rope_type': 'default', 'rope_theta': a.rope_theta}
  max_len = config.train.seq_len
  if a.yarn_factor:
    rope = {**rope, 'rope_type': 'yarn', 'factor': a.yarn_factor, 'original_max_position_embeddings':
            a.yarn_original_max_len, 'beta_fast': a.yarn_beta_fast, 'beta_slow': a.yarn_beta_slow,
            'mscale': a.yarn_mscale, 'mscale_all_dim': a.yarn_mscale_all_dim, 'truncate': a.yarn_truncate}
    max_len = int(a.yarn_original_max_len * a.yarn_factor)
  dense = [i for i, k in enumerate(_layer_kinds(config)) if k == 'dense']
  return {
      'architectures': ['DeepseekV3ForCausalLM'], 'model_type': 'deepseek_v3', 'dtype': 'float32',
      'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'num_hidden_layers': m.num_layers,
      'intermediate_size': m.dense_ffn_dim, 'moe_intermediate_size': m.expert_ffn_dim,
      'num_attention_heads': a.num_heads, 'num_key_value_heads': a.num_heads, 'hidden_act': 'silu',
      'q_lora_rank': mla.q_lora_rank or None, 'kv_lora_rank': mla.kv_lora_rank,
      'qk_nope_head_dim': mla.qk_nope_head_dim, 'qk_rope_head_dim': mla.qk_rope_head_dim,
      'v_head_dim': mla.v_head_dim, 'head_dim': mla.qk_rope_head_dim,
      'n_routed_experts': m.num_experts, 'num_experts_per_tok': m.top_k, 'n_shared_experts': m.num_shared_experts,
      'routed_scaling_factor': r.routed_scaling, 'norm_topk_prob': r.norm_topk, 'n_group': r.n_group,
      'topk_group': r.topk_group, 'scoring_func': 'sigmoid', 'topk_method': 'noaux_tc',
      'first_k_dense_replace': len(dense), 'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings,
      'rope_interleave': a.rope_layout == 'pairs', 'rope_parameters': rope, 'max_position_embeddings': max_len,
      'attention_bias': False, 'num_nextn_predict_layers': 0}
