"""Generates text from the latest checkpoint: `python -m moejax.sample --workdir=runs/X --prompt="..."`."""
import json
import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checkpoint, decode
from moejax.data import shards
from moejax.model_config import ModelConfig
from moejax.state import setup




def load(workdir: str, step: int | None = None):
  """Config, mesh and state of the latest checkpoint (or `step`), placed on one device."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh = ml_collections.ConfigDict({'data': 1, 'expert': 1})
  s = setup(config, devices=jax.devices()[:1])
  mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f'workdir: no checkpoint in {workdir}/checkpoints')
  if step is not None and step not in mngr.all_steps():
    raise FileNotFoundError(f'--step {step}: no such checkpoint in {workdir}/checkpoints '
                            f'(has {sorted(mngr.all_steps())})')
  state, _ = checkpoint.restore(mngr, s.abstract_state, step)
  return config, s.mesh, state


def generate(config, mesh, params, router_bias, prompt_ids: list[int], max_new: int,
             temperature: float, top_k: int, seed: int) -> list[int]:
  """Autoregressive sampling with per-layer decode caches (moejax.decode): each token is one
  jitted decode step. The context holds at most seq_len tokens (the prompt's last seq_len); when
  it is full, the caches restart from its latest seq_len // 2 tokens."""
  if not prompt_ids:
    raise ValueError('prompt: empty (nothing to continue)')
  cfg, T = ModelConfig.from_config(config.model), config.train.seq_len

  @jax.jit
  def step(params, router_bias, caches, token, pos, key):
    logits_1V, caches = decode.decode_step(params, router_bias, caches, token[None], pos, cfg, mesh)
    logits_V = logits_1V[0]
    if temperature == 0:
      return jnp.argmax(logits_V), caches
    top_vals, _ = jax.lax.top_k(logits_V, top_k)
    logits_V = jnp.where(logits_V < top_vals[-1], -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V / temperature), caches

  empty = decode.init_caches(params, cfg, 1, T)
  ids = list(prompt_ids)
  key = jax.random.key(seed)
  caches, pos, pending = empty, 0, ids[-T:]   # pending: tokens not yet in the caches
  for i in range(max_new):
    if pos + len(pending) > T:
      caches, pos, pending = empty, 0, ids[-(T // 2):]
    for token in pending:
      next_token, caches = step(params, router_bias, caches, jnp.int32(token), jnp.int32(pos),
                                jax.random.fold_in(key, i))
      pos += 1
    ids.append(int(next_token))
    pending = ids[-1:]
  return ids


def main(argv):
  del argv
  F = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  try:
    config, mesh, state = load(F.workdir)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  tok = shards.load_tokenizer(config.data.dir)
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
