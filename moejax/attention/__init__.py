"""Causal self-attention types behind one interface, selected by name (`config.model.attention`).

Each type is an `Attention` table entry (moejax.attention.core) holding everything the rest of the
code needs: `specs(cfg)` declares its parameters; `apply(p, x_BTD, cfg, segment_ids_BT=None)`
returns y_BTD and the per-head max logit, attending only within each document when given segment
ids (every type honours them); `init_cache` and `decode` run one token at a time against the type's
own cache (moejax.decode); `flops_per_token`; `qk_clip` (None = refuses QK-clip); `supports`, the
`model.attn` options it honours. `cfg` is always an `AttentionConfig` (moejax.attention.config).
`config.model.attention` is one name or a comma-separated pattern ("kda,kda,kda,mla") repeated to
the depth: layer i (counted over the whole stack, dense blocks first) uses pattern[i % len(pattern)].
"""
from moejax.attention.config import AttentionConfig, KDAConfig, MLAConfig, NSAConfig  # noqa: F401
from moejax.attention.core import Attention, causal_softmax_attention, sliding_window_attention  # noqa: F401
from moejax.attention.kda import KDA
from moejax.attention.nsa import NSA
from moejax.attention.softmax import GQA, MHA, MLA, SWA, latent_scale  # noqa: F401
from moejax.errors import check, one_of
from moejax.layers import rope  # noqa: F401

ATTENTIONS = {'gqa': GQA, 'mha': MHA, 'mla': MLA, 'swa': SWA, 'nsa': NSA, 'kda': KDA}
OPTIONS = {'qk_norm': 'model.attn.qk_norm', 'sinks': 'model.attn.sinks', 'softcap': 'model.attn.softcap',
           'qkv_bias': 'model.attn.qkv_bias'}


def parse_pattern(attention: str) -> list[str]:
  return [name.strip() for name in attention.split(',')]


def pattern_names(attention: str, num_layers: int) -> tuple[str, ...]:
  """The attention name of every layer: the pattern repeated to num_layers."""
  pattern = parse_pattern(attention)
  return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def check_pattern(attention, cfg: AttentionConfig):
  """Every name is a known type and every option set in `cfg` is honoured by every type used."""
  check(isinstance(attention, str), 'model.attention', f'must be a name or a comma pattern, got {attention!r}')
  names = parse_pattern(attention)
  for name in names:
    one_of(name, ATTENTIONS, 'model.attention')
  for option, field in OPTIONS.items():
    unsupported = sorted({n for n in names if option not in ATTENTIONS[n].supports})
    supported = sorted(n for n, a in ATTENTIONS.items() if option in a.supports)
    check(not getattr(cfg, option) or not unsupported, field,
          f'not supported by attention {", ".join(unsupported)} (only by {", ".join(supported)})')


def repeating_unit(names) -> list[str]:
  """The shortest prefix u with names[i] == u[i % len(u)] for every i."""
  names = list(names)
  for p in range(1, len(names) + 1):
    if all(names[i] == names[i % p] for i in range(len(names))):
      return names[:p]
  return names
