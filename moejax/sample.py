"""Generates text from the latest checkpoint: `python -m moejax.sample --workdir=runs/X --prompt="..."`."""
import json
import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checkpoint, model
from moejax.data import pipeline
from moejax.state import setup

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory of a trained model.', required=True)
_PROMPT = flags.DEFINE_string('prompt', 'ROMEO:', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 60, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def load(workdir: str):
  """Config, params and router bias of the latest checkpoint, placed on one device."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh = ml_collections.ConfigDict({'data': 1, 'expert': 1})
  s = setup(config, devices=jax.devices()[:1])
  mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f'workdir: no checkpoint in {workdir}/checkpoints')
  state, _ = checkpoint.restore(mngr, s.abstract_state)
  return config, s.mesh, state


def generate(config, mesh, params, router_bias, prompt_ids: list[int], max_new: int,
             temperature: float, top_k: int, seed: int) -> list[int]:
  """Autoregressive sampling over a window of seq_len tokens (the model is re-run per token)."""
  T = config.train.seq_len

  @jax.jit
  def next_token(tokens_1T, length, key):
    logits_1TV, _ = model.forward(params, router_bias, tokens_1T, config.model, mesh)
    logits_V = logits_1TV[0, length - 1]
    if temperature == 0:
      return jnp.argmax(logits_V)
    top_vals, _ = jax.lax.top_k(logits_V, top_k)
    logits_V = jnp.where(logits_V < top_vals[-1], -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V / temperature)

  ids = list(prompt_ids)
  key = jax.random.key(seed)
  for i in range(max_new):
    window = ids[-T:]
    tokens = jnp.zeros((1, T), jnp.int32).at[0, :len(window)].set(jnp.asarray(window))
    ids.append(int(next_token(tokens, len(window), jax.random.fold_in(key, i))))
  return ids


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    config, mesh, state = load(_WORKDIR.value)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  tok = pipeline.load_tokenizer(config.data.dir)
  prompt_ids = tok.encode(_PROMPT.value)
  ids = generate(config, mesh, state['params'], state['router_bias'], prompt_ids, _MAX_NEW.value,
                 _TEMPERATURE.value, _TOP_K.value, _SEED.value)
  print(f'--- sample from step {int(state["step"])} ---')
  print(tok.decode(ids))


if __name__ == '__main__':
  app.run(main)
