"""Generates text from the latest checkpoint: `python -m moejax.sample --workdir=runs/X --prompt="..."`."""
import json
import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from moejax import checkpoint, decode
from moejax.data import shards
from moejax.model_config import ModelConfig
from moejax.state import setup




def load(workdir: str, step: int | None = None, all_devices: bool = False):
  """Config, mesh and state of the latest checkpoint (or `step`): on one device, or with
  `all_devices` on every device with the batch split over them (mesh data = all, state replicated
  or sharded as the run's sharding rules say)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if all_devices:
    config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'expert': 1, 'tensor': 1})
    s = setup(config)
  else:
    config.mesh = ml_collections.ConfigDict({'data': 1, 'expert': 1})
    s = setup(config, devices=jax.devices()[:1])
  mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f'workdir: no checkpoint in {workdir}/checkpoints')
  if step is not None and step not in mngr.all_steps():
    raise FileNotFoundError(f'--step {step}: no such checkpoint in {workdir}/checkpoints '
                            f'(has {sorted(mngr.all_steps())})')
  state, _ = checkpoint.restore(mngr, s.abstract_state, step, tx=s.tx)
  return config, s.mesh, state


RUN_TOKENIZER = 'tokenizer_info.json'   # what a run records of its tokenizer (moejax.train writes it)


def record_tokenizer(workdir: str, tokenizer):
  """Notes the run's tokenizer (sha256, vocabulary size) so later readers can check theirs."""
  with open(os.path.join(workdir, RUN_TOKENIZER), 'w') as f:
    json.dump({'sha256': tokenizer.info.get('sha256'), 'vocab_size': tokenizer.vocab_size}, f)


def run_tokenizer(workdir: str, config):
  """The tokenizer of config.data.dir, refused in one line when it is not the one the run trained
  with (data re-prepared since) or has more tokens than the model's vocabulary."""
  tok = shards.load_tokenizer(config.data.dir)
  path = os.path.join(workdir, RUN_TOKENIZER)
  if os.path.exists(path):
    with open(path) as f:
      want = json.load(f)
    if want.get('sha256') != tok.info.get('sha256'):
      raise ValueError(f'{config.data.dir}: its tokenizer (sha256 {str(tok.info.get("sha256"))[:12]}) is '
                       f'not the one {workdir} trained with (sha256 {str(want.get("sha256"))[:12]})')
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f'{config.data.dir}: its tokenizer has {tok.vocab_size} tokens; the checkpoint\'s '
                     f'vocabulary has {config.model.vocab_size}')
  return tok


def generate(config, mesh, params, router_bias, prompt_ids: list[int], max_new: int,
             temperature: float, top_k: int, seed: int) -> list[int]:
  """The prompt and `max_new` sampled tokens (generate_batch of one row)."""
  if not prompt_ids:
    raise ValueError('prompt: empty (nothing to continue)')
  return generate_batch(config, mesh, params, router_bias, [prompt_ids], max_new, temperature, top_k, seed)[0]


def generate_batch(config, mesh, params, router_bias, prompts: list[list[int]], max_new: int,
                   temperature: float, top_k: int, seed: int) -> list[list[int]]:
  """Autoregressive sampling of prompts of one token length together, with per-layer decode caches
  (moejax.decode): each token is one jitted decode step for every row. The context holds at most
  seq_len tokens (the prompt's last seq_len); when it is full, the caches restart from its latest
  seq_len // 2 tokens."""
  if not prompts or not prompts[0] or len({len(p) for p in prompts}) != 1:
    raise ValueError('prompts: need one or more non-empty prompts of one token length')
  cfg, T = ModelConfig.from_config(config.model), config.train.seq_len

  @jax.jit
  def step(params, router_bias, caches, token_B, pos, key):
    logits_BV, caches = decode.decode_step(params, router_bias, caches, token_B, pos, cfg, mesh)
    if temperature == 0:
      return jnp.argmax(logits_BV, axis=-1), caches
    top_vals, _ = jax.lax.top_k(logits_BV, top_k)
    logits_BV = jnp.where(logits_BV < top_vals[:, -1:], -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV / temperature, axis=-1), caches

  empty = decode.init_caches(params, cfg, len(prompts), T)
  ids_BT = np.array(prompts, np.int32)
  key = jax.random.key(seed)
  caches, pos, pending = empty, 0, ids_BT[:, -T:]   # pending: tokens not yet in the caches
  for i in range(max_new):
    if pos + pending.shape[1] > T:
      caches, pos, pending = empty, 0, ids_BT[:, -(T // 2):]
    for j in range(pending.shape[1]):
      next_B, caches = step(params, router_bias, caches, jnp.asarray(pending[:, j]), jnp.int32(pos),
                            jax.random.fold_in(key, i))
      pos += 1
    ids_BT = np.concatenate([ids_BT, np.asarray(next_B, np.int32)[:, None]], axis=1)
    pending = ids_BT[:, -1:]
  return ids_BT.tolist()


def main(argv):
  del argv
  F = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  try:
    config, mesh, state = load(F.workdir)
    tok = run_tokenizer(F.workdir, config)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  prompt_ids = tok.encode(F.prompt)
  ids = generate(config, mesh, state['params'], state['router_bias'], prompt_ids, F.max_new_tokens,
                 F.temperature, F.top_k, F.seed)
  print(f'--- sample from step {int(state["step"])} ---')
  print(tok.decode(ids))


def define_flags():
  """CLI flags, defined only when run as a program (so importing `generate` defines none)."""
  flags.DEFINE_string('workdir', None, 'Run directory of a trained model.', required=True)
  flags.DEFINE_string('prompt', 'ROMEO:', 'Text to continue.')
  flags.DEFINE_integer('max_new_tokens', 60, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
