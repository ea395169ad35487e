"""DeepSeek-V3's multi-token prediction modules (moejax.mtp) in Hugging Face checkpoints.

The hub layout numbers the D modules after the decoder: module k (from 0) is `model.layers.{L+k}`,
holding `enorm`, `hnorm`, `eh_proj` (nn.Linear [D, 2D] over cat(enorm(emb), hnorm(h))),
`shared_head.norm`, the usual weights of one block of the last layer's kind (attention, norms,
router, `e_score_correction_bias`, experts), and copies of the shared `embed_tokens` and
`shared_head.head` (the LM head). transformers' DeepseekV3 leaves these tensors out when it saves:
such a checkpoint imports with MTP off (`model.mtp.depth` = 0, whatever `num_nextn_predict_layers`
says) and exports without them, so it returns bit for bit. With them, depth =
num_nextn_predict_layers; the copies must equal the model's own embedding and head (moejax shares
them), and export writes them back from those.
"""
import numpy as np

from moejax.convert import weights
from moejax.convert.hf_config import ConvertError, family

LAYER = 'model.layers.{i}.'
OWN = {('enorm',): ('enorm.weight', 'flat'), ('hnorm',): ('hnorm.weight', 'flat'),
       ('eh_proj',): ('eh_proj.weight', 'in'), ('final_norm',): ('shared_head.norm.weight', 'flat')}


def layers(cfg) -> range:
  return range(cfg.num_layers, cfg.num_layers + cfg.mtp.depth)


def settings(hf: dict, tensors) -> dict:
  """{'model.mtp.depth': D} when the files hold the D modules config.json announces, else {}."""
  n = hf.get('num_nextn_predict_layers') or 0
  if not n or family(hf) != 'deepseek':
    return {}
  names = [LAYER.format(i=hf['num_hidden_layers'] + k) + 'eh_proj.weight' for k in range(n)]
  present = [name in tensors for name in names]
  if not any(present):   # transformers' layout: the modules were left out
    return {}
  if not all(present):
    raise ConvertError(f'tensor {names[present.index(False)]}: missing (config.json: num_nextn_predict_layers {n})')
  return {'model.mtp.depth': n}


def maps(hf_type: str, cfg) -> tuple[dict, dict, range]:
  """Like weights.block_leaves for the leaves of params['mtp_blocks'], and the HF layers they fill."""
  layer, experts = weights.block_leaves(hf_type, cfg, cfg.layer_kinds[-1])
  layer_map = {('block', *p): v for p, v in layer.items()}
  layer_map.update({p: (LAYER + name, layout) for p, (name, layout) in OWN.items()})
  return layer_map, {('block', *p): v for p, v in experts.items()}, layers(cfg)


def _copies(cfg) -> dict:
  """Per module: the HF copy -> (the model's own tensor, the moejax leaf, its layout)."""
  head = ('model.embed_tokens.weight', 'embed', 'same') if cfg.tie_embeddings else ('lm_head.weight', 'head', 'in')
  return {'embed_tokens.weight': ('model.embed_tokens.weight', 'embed', 'same'), 'shared_head.head.weight': head}


def import_state(hf_type: str, cfg, tensors, used: set) -> dict:
  """Checks the modules' copies of the embedding and head against the model's own (marking them
  read) and returns the modules' state entries: {'mtp_router_bias': [D, E]} for MoE blocks."""
  for i in layers(cfg):
    for copy, (own, _, _) in _copies(cfg).items():
      name = LAYER.format(i=i) + copy
      used.add(name)
      if not np.array_equal(tensors.get(name), tensors.get(own)):
        raise ConvertError(f'tensor {name}: differs from {own} (moejax\'s MTP modules share it)')
  bias_name = weights.router_bias_name(hf_type)
  if not cfg.mtp_moe_layers:
    return {}
  bias = np.zeros((cfg.mtp_moe_layers, cfg.router.num_routed), np.float32)
  if bias_name:
    for k, i in enumerate(layers(cfg)):
      used.add(bias_name.format(i=i))
      bias[k] = tensors.get(bias_name.format(i=i)).astype(np.float32)
  return {'mtp_router_bias': bias}


def export_tensors(hf_type: str, cfg, params, bias_KE, dtype):
  """(name, array) of what the modules hold outside params['mtp_blocks']: the copies of the
  embedding and head, and the MoE blocks' selection bias `bias_KE` (state['mtp_router_bias'])."""
  bias_name = weights.router_bias_name(hf_type)
  for k, i in enumerate(layers(cfg)):
    for copy, (_, leaf, layout) in _copies(cfg).items():
      yield LAYER.format(i=i) + copy, weights.to_hf(np.asarray(params[leaf]), layout).astype(dtype)
    if bias_name and cfg.mtp_moe_layers:
      yield bias_name.format(i=i), np.asarray(bias_KE[k]).astype(dtype)


def hf_config(hf: dict, cfg) -> dict:
  """The exported config.json: num_nextn_predict_layers = depth when the run has MTP modules."""
  if not cfg.mtp.depth:
    return hf
  if family(hf) != 'deepseek':
    raise ConvertError(f'model.mtp.depth: {hf["model_type"]} has no multi-token prediction layers in its layout')
  return {**hf, 'num_nextn_predict_layers': cfg.mtp.depth}
