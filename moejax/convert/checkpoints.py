"""Import an HF model into a moejax workdir, export a workdir as an HF model, and a checkpoint's logits.

Import checks everything before it writes: config.json maps to a moejax config, every tensor the
model needs is there with the right shape, no tensor is left over. Then it writes the workdir
into a temporary sibling and renames it into place, so bad input leaves nothing in W. Each
parameter leaf (one array stacked over the blocks of its kind) is assembled from its HF tensors,
read one at a time, placed on its sharding and written to step 0 (an orbax partial save) before the
next leaf is read: peak host memory is a few copies of the largest leaf, not the model. Step 0
holds no optimizer state (its data state says checkpoint.PARAMS_ONLY); checkpoint.restore(...,
tx=) makes a fresh one.
"""
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checkpoint
from moejax.configs import base_config
from moejax.convert import hf_config, mtp as convert_mtp, weights
from moejax.convert.hf_config import ConvertError
from moejax.convert.safetensors_io import Tensors, write

HF_CONFIG = 'hf_config.json'   # the imported config.json, kept in the workdir for export
# tensors with no element that no parameter takes (transformers' zero-width shared experts when
# n_shared_experts is 0): {name: shape}, written back by export
HF_EMPTY = 'hf_empty_tensors.json'


def _moe_layers(cfg) -> list[int]:
  """The layer index of each MoE layer, in MoE-layer order (the rows of router_bias)."""
  return [i for i, k in enumerate(cfg.layer_kinds) if k == 'moe']


def _block_rows(cfg, path: tuple) -> tuple[str, tuple[int, ...], tuple]:
  """(FFN kind, the layer index of each stacked row, the path inside one block) of a block leaf.
  A kind's blocks are one stack, or a list of stacks (one per scan group) when its layers do not
  repeat one unit (e.g. dense layers in the middle: model.kind_stacks)."""
  from moejax import model
  kind = 'dense' if path[0] == 'dense_blocks' else 'moe'
  groups = model.kind_groups(cfg, kind)
  if len(groups) == 1:
    return kind, groups[0].layers, path[1:]
  return kind, groups[path[1]].layers, path[2:]


def _block_maps(hf_type: str, cfg, path: tuple) -> tuple[dict, dict, tuple, tuple]:
  """(per-layer map, per-expert map, the HF layer of each stacked row, the path inside one block)
  of a block leaf or an MTP module leaf."""
  if path[0] == 'mtp_blocks':
    return (*convert_mtp.maps(hf_type, cfg), path[1:])
  kind, layers, rest = _block_rows(cfg, path)
  return (*weights.block_leaves(hf_type, cfg, kind), layers, rest)


def _leaf_paths(abstract_params) -> list[tuple[tuple, object]]:
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  return [(tuple(k.key if hasattr(k, 'key') else k.idx for k in path), leaf) for path, leaf in flat]


def _assemble(hf_type: str, cfg, tensors: Tensors, path: tuple, shape: tuple, used: set) -> np.ndarray:
  """The moejax array of one leaf from its HF tensors (recording which were read)."""
  def read(name, layout, shape):
    used.add(name)
    try:
      return weights.to_moejax(tensors.get(name), layout, shape).astype(np.float32)
    except ConvertError:   # already names the tensor (a ValueError too)
      raise
    except ValueError as e:
      raise ConvertError(f'tensor {name}: {e}') from None

  if len(path) == 1:
    name, layout = weights.top_level(cfg)[path]
    return read(name, layout, shape)
  layer_map, expert_map, layers, rest = _block_maps(hf_type, cfg, path)
  out = np.empty(shape, np.float32)
  for j, i in enumerate(layers):
    if rest in layer_map:
      name, layout = layer_map[rest]
      out[j] = read(name.format(i=i), layout, shape[1:])
    elif rest in expert_map:
      template, layout = expert_map[rest]
      if template.format(i=i, e=0) in tensors:
        for e in range(shape[1]):
          out[j, e] = read(template.format(i=i, e=e), layout, shape[2:])
      else:   # transformers' fused layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        name, which = weights.fused_experts(rest, template.format(i=i, e=0))
        used.add(name)
        fused = tensors.get(name)
        E, D, F = (shape[1], shape[2], shape[3]) if which else (shape[1], shape[3], shape[2])
        want = (E, 2 * F, D) if which else (E, D, F)
        if fused.shape != want:
          raise ConvertError(f'tensor {name}: shape {fused.shape}, expected {list(want)}')
        part = fused[:, :F] if which == 'w_gate' else fused[:, F:] if which == 'w_up' else fused
        out[j] = np.swapaxes(part, 1, 2)
    else:
      raise ConvertError(f'moejax parameter {"/".join(path)}: no Hugging Face tensor maps to it')
  return out


def import_hf(hf_dir: str, workdir: str, devices=None) -> dict:
  from moejax.state import setup
  from moejax.model_config import ModelConfig
  d = Path(hf_dir)
  if not (d / 'config.json').is_file():
    raise ConvertError(f'{d}: no config.json (not a Hugging Face model directory)')
  if (Path(workdir) / 'checkpoints').exists() and any((Path(workdir) / 'checkpoints').iterdir()):
    raise ConvertError(f'{workdir}: already holds checkpoints; import into a new workdir')
  hf = json.loads((d / 'config.json').read_text())
  hf_config.family(hf)
  tensors = Tensors(str(d))
  settings = hf_config.to_moejax(hf, set(tensors.names()))
  settings.update(convert_mtp.settings(hf, tensors))   # the MTP modules the files hold
  config = base_config()
  hf_config.apply(config, settings)
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'expert': 1, 'tensor': 1})
  cfg = ModelConfig.from_config(config.model)
  s = setup(config, devices=devices or jax.devices()[:1])
  final = Path(workdir).absolute()
  tmp = final.parent / f'.{final.name}.importing'
  shutil.rmtree(tmp, ignore_errors=True)
  step_dir = tmp / 'checkpoints' / '0'
  try:
    count = _stream_params(hf, cfg, tensors, s, step_dir)
    if count['empty']:
      (tmp / HF_EMPTY).write_text(json.dumps(count['empty'], indent=2) + '\n')
    _write_workdir(tmp, final, config, settings, hf, str(d), step_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'model_type': hf['model_type'], 'params': count['params'], 'tensors': count['tensors']}


def _nest(path: tuple, leaf) -> dict:
  for k in reversed(path):
    leaf = {k: leaf}
  return leaf


def _in_list(path: tuple) -> bool:
  """Whether a block leaf belongs to one of a list of stacks (path: kind, stack index, ...)."""
  return len(path) > 2 and isinstance(path[1], int)


def _save_units(abstract_params) -> list[list[tuple[tuple, object]]]:
  """The leaves in the order they are saved, in units saved together: one leaf, or where a kind's
  blocks are a list of stacks, the same leaf of every stack (a partial save cannot add items to a
  list it has written)."""
  units = {}
  for path, leaf in _leaf_paths(abstract_params):
    units.setdefault((path[0],) + path[2:] if _in_list(path) else path, []).append((path, leaf))
  return list(units.values())


def _unit_tree(unit: list[tuple[tuple, object]]) -> dict:
  """The params subtree of one save unit, given as (path, array) pairs."""
  path = unit[0][0]
  if _in_list(path):
    return {path[0]: [_nest(p[2:], a) for p, a in sorted(unit, key=lambda item: item[0][1])]}
  (path, a), = unit
  return _nest(path, a)


def _stream_params(hf: dict, cfg, tensors: Tensors, s, step_dir: Path) -> dict:
  """Writes step 0 leaf by leaf: each parameter is assembled from its HF tensors, placed on its
  sharding and saved (an orbax partial save) before the next is read, so host memory holds about
  one leaf (a leaf stacked over the layers of its kind). No optimizer state is written: the data
  state says PARAMS_ONLY, and restoring with the optimizer (checkpoint.restore(..., tx=)) makes a
  fresh one."""
  from orbax.checkpoint.experimental.v1._src.partial import saving as partial
  used, params = set(), 0
  for unit in _save_units(s.abstract_state['params']):
    placed = []
    for path, leaf in unit:
      host = _assemble(hf['model_type'], cfg, tensors, path, leaf.shape, used)
      placed.append((path, jax.device_put(host, leaf.sharding)))
      del host
      params += int(np.prod(leaf.shape))
    partial.save(str(step_dir), {'params': _unit_tree(placed)})
    del placed
  L, E = cfg.num_moe_layers, cfg.router.num_routed
  bias = np.zeros((L, E), np.float32)
  bias_name = weights.router_bias_name(hf['model_type'])
  if bias_name and L:
    for j, i in enumerate(_moe_layers(cfg)):
      used.add(bias_name.format(i=i))
      bias[j] = tensors.get(bias_name.format(i=i)).astype(np.float32)
  mtp_state = convert_mtp.import_state(hf['model_type'], cfg, tensors, used)
  unused = sorted(set(tensors.names()) - used)
  empty = {n: list(tensors.shape(n)) for n in unused if not np.prod(tensors.shape(n))}
  extra = [n for n in unused if n not in empty]
  if extra:
    raise ConvertError(f'tensor {extra[0]} ({len(extra)} unused in all): no moejax parameter takes it')
  sh = s.state_shardings
  partial.save(str(step_dir), {
      **{k: jax.device_put(v, sh[k]) for k, v in mtp_state.items()},
      'step': jax.device_put(np.zeros((), np.int32), sh['step']),
      'router_bias': jax.device_put(bias, sh['router_bias']),
      'balance_coef': jax.device_put(np.full((L,), cfg.loss.balance_weight, np.float32), sh['balance_coef'])})
  partial.finalize(str(step_dir))
  return {'params': params, 'tensors': len(used) + len(empty), 'empty': empty}


def _experiment_py(settings: dict, hf: dict, hf_dir: str) -> str:
  lines = [f'"""{hf["model_type"]} imported from {hf_dir} by `python -m moejax.convert import`.',
           '', 'Train it on data tokenized with the model\'s own tokenizer: set data.dir (and data.raw) to a',
           'directory prepared with `python -m moejax.data.prepare --tokenizer=<its tokenizer.json>`.',
           '"""', 'from moejax.configs import base_config', '', '', 'def get_config():',
           '  c = base_config()']
  lines += [f'  c.{key} = {value!r}' for key, value in settings.items()]
  lines += ['  return c', '']
  return '\n'.join(lines)


def _write_workdir(tmp: Path, final: Path, config, settings: dict, hf: dict, hf_dir: str, step_dir: Path):
  import orbax.checkpoint as ocp
  from etils import epath
  (step_dir / 'data').mkdir()
  ocp.JsonCheckpointHandler().save(epath.Path(step_dir / 'data'), args=ocp.args.JsonSave(
      {'imported_from': hf_dir, checkpoint.PARAMS_ONLY: True}))
  (tmp / 'experiment.py').write_text(_experiment_py(settings, hf, hf_dir))
  (tmp / 'config.json').write_text(config.to_json_best_effort(indent=2))
  (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + '\n')
  if final.exists():   # an empty or checkpoint-less workdir: keep what else it holds
    for child in tmp.iterdir():
      target = final / child.name
      if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
      child.rename(target)
    tmp.rmdir()
  else:
    tmp.rename(final)


def _hf_dtype(hf: dict):
  name = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  if name == 'bfloat16':
    import ml_dtypes
    return ml_dtypes.bfloat16
  return {'float32': np.float32, 'float16': np.float16}[name]


def export_hf(workdir: str, hf_dir: str, step: int | None = None) -> dict:
  from moejax import sample
  from moejax.model_config import ModelConfig
  base_path = Path(workdir) / HF_CONFIG
  if not (Path(workdir) / 'config.json').is_file():
    raise ConvertError(f'{workdir}: no config.json (not a moejax workdir)')
  if base_path.is_file():   # imported: write its own config back
    base = json.loads(base_path.read_text())
  else:                     # trained from scratch: the architecture that expresses it
    base = hf_config.from_moejax(ml_collections.ConfigDict(json.loads((Path(workdir) / 'config.json').read_text())))
  config, _, state = sample.load(workdir, step)
  cfg = ModelConfig.from_config(config.model)
  hf = convert_mtp.hf_config(hf_config.to_hf(config, base), cfg)
  hf_type, dtype = base['model_type'], _hf_dtype(base)
  params = jax.device_get(state['params'])
  bias = np.asarray(jax.device_get(state['router_bias']))

  def tensors():
    for path, _ in _leaf_paths(params):
      leaf = params
      for k in path:
        leaf = leaf[k]
      leaf = np.asarray(leaf)
      if len(path) == 1:
        name, layout = weights.top_level(cfg)[path]
        yield name, weights.to_hf(leaf, layout).astype(dtype)
        continue
      layer_map, expert_map, layers, rest = _block_maps(hf_type, cfg, path)
      for j, i in enumerate(layers):
        if rest in layer_map:
          name, layout = layer_map[rest]
          yield name.format(i=i), weights.to_hf(leaf[j], layout).astype(dtype)
        else:
          template, layout = expert_map[rest]
          for e in range(leaf.shape[1]):
            yield template.format(i=i, e=e), weights.to_hf(leaf[j, e], layout).astype(dtype)
    empty_path = Path(workdir) / HF_EMPTY
    for name, shape in (json.loads(empty_path.read_text()) if empty_path.is_file() else {}).items():
      yield name, np.zeros(shape, dtype)
    name = weights.router_bias_name(hf_type)
    if name:
      for j, i in enumerate(_moe_layers(cfg)):
        yield name.format(i=i), bias[j].astype(dtype)
    yield from convert_mtp.export_tensors(hf_type, cfg, params, jax.device_get(state.get('mtp_router_bias')), dtype)

  out = Path(hf_dir)
  tmp = out.parent / f'.{out.name}.exporting'
  shutil.rmtree(tmp, ignore_errors=True)
  count = 0

  def counted():
    nonlocal count
    for item in tensors():
      count += 1
      yield item
  write(str(tmp), counted())
  (tmp / 'config.json').write_text(json.dumps(hf, indent=2) + '\n')
  if out.exists():
    shutil.rmtree(out)
  tmp.rename(out)
  return {'model_type': hf_type, 'tensors': count, 'step': int(state['step'])}


def logits(workdir: str, input_ids: str, out: str, step: int | None = None) -> tuple:
  from moejax import model, sample
  from moejax.model_config import ModelConfig
  config, mesh, state = sample.load(workdir, step)
  ids = np.load(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ConvertError(f'{input_ids}: need integer token ids [batch, positions], got {ids.dtype} {ids.shape}')
  if ids.min() < 0 or ids.max() >= config.model.vocab_size:
    raise ConvertError(f'{input_ids}: token ids must be in [0, {config.model.vocab_size})')
  cfg = ModelConfig.from_config(config.model)
  fwd = jax.jit(lambda p, b, x: model.forward(p, b, x, cfg, mesh)[0].astype(jnp.float32))
  result = np.asarray(fwd(state['params'], state['router_bias'], jnp.asarray(ids, jnp.int32)))
  np.save(out, result)
  return result.shape
