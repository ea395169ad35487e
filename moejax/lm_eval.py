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
    self.scorer = Scorer.from_workdir(workdir, None if step is None else int(step))

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    logp, greedy, count = self.scorer.score([r.args for r in requests])
    return [(float(lp), bool(g == c)) for lp, g, c in zip(logp, greedy, count)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    """A whole text's log-likelihood after an EOD: the harness's rolling windows of the model's
    context (each window predicts new tokens with as much of the preceding text as fits), all the
    requests' windows scored in one batched pass."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    tok, rows, owner = self.scorer.tokenizer, [], []
    for i, r in enumerate(requests):
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          tok.encode(r.args[0]), prefix_token=tok.eod_id, max_seq_len=self.scorer.max_len, context_len=1)):
        rows.append((ctx + cont, len(cont)))
        owner.append(i)
    logp = self.scorer.score_ids(rows)[0] if rows else []
    out = [0.0] * len(requests)
    for i, lp in zip(owner, logp):
      out[i] += float(lp)
    return out

  def generate_until(self, requests) -> list[str]:
    """Greedy continuations with moejax's cached decode; requests whose prompts have the same token
    length decode together as one batch (the decode step shares one position across rows)."""
    from moejax import sample
    s, tok = self.scorer, self.scorer.tokenizer
    jobs = []
    for r in requests:
      context, opts = r.args[0], (r.args[1] if len(r.args) > 1 else {})
      opts = opts if isinstance(opts, dict) else {}
      until = opts.get('until', [])
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(opts.get('max_gen_toks', 64))
      ids = ([tok.eod_id] + tok.encode(context))[-max(1, s.max_len - max_new):]
      jobs.append((ids, max_new, until))
    out = [''] * len(jobs)
    groups = {}
    for i, (ids, max_new, _) in enumerate(jobs):
      groups.setdefault((len(ids), max_new), []).append(i)
    for (_, max_new), members in groups.items():
      for b in range(0, len(members), s.rows):
        idx = members[b:b + s.rows]
        new = sample.generate_batch(s.config, s.mesh, s.params, s.router_bias,
                                    [jobs[i][0] for i in idx], max_new, temperature=0.0, top_k=1, seed=0)
        for i, ids in zip(idx, new):
          text = tok.decode([t for t in ids[len(jobs[i][0]):] if t != tok.eod_id])
          for stop in jobs[i][2]:
            text = text.split(stop)[0] if stop else text
          out[i] = text
    return out


def main():
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == '__main__':
  sys.exit(main())
