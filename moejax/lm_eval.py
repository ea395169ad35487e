"""lm-eval-harness on a moejax checkpoint: `python -m moejax.lm_eval --model moejax
--model_args workdir=runs/X[,step=N,batch_rows=16] --tasks ... [--include_path DIR] [--output_path DIR]`.

Registers the model `moejax` (an `lm_eval.api.model.LM`) and runs the harness's own CLI, so any
harness task (local YAML tasks too) runs on the checkpoint. Log-likelihoods come from the same
batched scorer as `moejax.eval` (moejax.eval.Scorer), so the two agree on the same data;
`generate_until` decodes greedily with moejax's cached decode (moejax.sample.generate).
Keep it offline with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 and local `dataset_path: json` tasks.
"""
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from moejax.eval import Scorer


@register_model('moejax')
class MoejaxLM(LM):
  def __init__(self, workdir: str, step: int | None = None, batch_size=None, **kwargs):
    super().__init__()
    self.scorer = Scorer(workdir, None if step is None else int(step))

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    logp, greedy, count = self.scorer.score([r.args for r in requests])
    return [(float(lp), bool(g == c)) for lp, g, c in zip(logp, greedy, count)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    """A whole text's log-likelihood (each request scored after an EOD, in windows of the model's
    context: the scorer keeps the last seq_len tokens, so longer texts are cut into pieces)."""
    tok, L = self.scorer.tokenizer, self.scorer.max_len
    out = []
    for r in requests:
      ids = tok.encode(r.args[0])
      pieces = [tok.decode(ids[i:i + L]) for i in range(0, len(ids), L)] or ['']
      out.append(float(sum(self.scorer.score([('', p)])[0][0] for p in pieces)))
    return out

  def generate_until(self, requests) -> list[str]:
    from moejax import sample
    s, out = self.scorer, []
    for r in requests:
      context, opts = r.args[0], (r.args[1] if len(r.args) > 1 else {})
      until = opts.get('until', []) if isinstance(opts, dict) else []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(opts.get('max_gen_toks', 64)) if isinstance(opts, dict) else 64
      ids = ([s.tokenizer.eod_id] + s.tokenizer.encode(context))[-(s.max_len - max_new):]
      new = sample.generate(s.config, s.mesh, s.params, s.router_bias, ids, max_new,
                            temperature=0.0, top_k=1, seed=0)
      text = s.tokenizer.decode([t for t in new if t != s.tokenizer.eod_id])
      for stop in until:
        text = text.split(stop)[0] if stop else text
      out.append(text)
    return out


def main():
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == '__main__':
  sys.exit(main())
