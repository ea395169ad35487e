"""The one line `make train` ends with: the last evaluation's held-out loss and bits per byte."""
from moejax.report import held_out_line


def test_held_out_line_names_the_last_eval_and_each_sources_bits_per_byte():
  evals = [{'step': 0, 'eval/loss': 8.0, 'eval/main/bpb': 4.0},
           {'step': 300, 'eval/loss': 5.30744, 'eval/main/bpb': 2.77651, 'eval/web/bpb': 3.1, 'eval/web/loss': 6.0}]
  assert held_out_line(evals) == 'held-out at step 300: loss 5.3074, bits per byte: main 2.7765, web 3.1000'


def test_held_out_line_without_evaluations():
  assert held_out_line([]) == 'held-out: no evaluation in metrics.jsonl'
