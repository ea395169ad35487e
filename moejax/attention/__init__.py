"""Causal self-attention types behind one interface, selected by name (`config.model.attention`).

Each type is an `Attention(specs, apply, flops_per_token, init_cache, decode)`: `specs(cfg)`
declares its parameters (ParamSpec with logical axes); `apply(p, x_BTD, cfg, segment_ids_BT=None)`
returns y_BTD and the per-head max logit, attending only within each document when given segment
ids (every type honours them); `init_cache(cfg, batch, max_len, dtype)` and `decode(p, x_BD, cache, pos,
cfg)` run one token at a time against the type's own cache (moejax.decode, moejax.sample).
`config.model.attention` is one name or a comma-separated pattern ("kda,kda,kda,mla") repeated to
the depth: layer i (counted over the whole stack, dense blocks first) uses pattern[i % len(pattern)].
"""
from moejax.attention.core import Attention, causal_softmax_attention, sliding_window_attention  # noqa: F401
from moejax.attention.kda import KDA
from moejax.attention.nsa import NSA
from moejax.attention.softmax import GQA, MHA, MLA, SWA, latent_scale  # noqa: F401
from moejax.layers import rope  # noqa: F401

ATTENTIONS = {'gqa': GQA, 'mha': MHA, 'mla': MLA, 'swa': SWA, 'nsa': NSA, 'kda': KDA}


def parse_pattern(attention: str) -> list[str]:
  return [name.strip() for name in attention.split(',')]


def layer_attentions(cfg) -> list[str]:
  """The attention name of every layer: the pattern repeated to cfg.num_layers."""
  pattern = parse_pattern(cfg.attention)
  return [pattern[i % len(pattern)] for i in range(cfg.num_layers)]


def repeating_unit(names: list[str]) -> list[str]:
  """The shortest prefix u with names[i] == u[i % len(u)] for every i."""
  for p in range(1, len(names) + 1):
    if all(names[i] == names[i % p] for i in range(len(names))):
      return names[:p]
  return names
