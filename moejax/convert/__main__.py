"""`python -m moejax.convert import|export|logits` (see moejax/convert/__init__.py)."""
import argparse
import sys
import time

from moejax.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='moejax.convert', description='Hugging Face checkpoints in and out of moejax.')
  sub = p.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='an HF model directory -> a moejax workdir (step 0)')
  imp.add_argument('--hf', required=True)
  imp.add_argument('--workdir', required=True)
  exp = sub.add_parser('export', help='a moejax workdir -> an HF model directory')
  exp.add_argument('--workdir', required=True)
  exp.add_argument('--hf', required=True)
  exp.add_argument('--step', type=int, default=None)
  lg = sub.add_parser('logits', help='float32 logits of a checkpoint for given token ids')
  lg.add_argument('--workdir', required=True)
  lg.add_argument('--input_ids', required=True)
  lg.add_argument('--out', required=True)
  lg.add_argument('--step', type=int, default=None)
  a = p.parse_args(argv)
  from moejax.convert.checkpoints import ConvertError, export_hf, import_hf, logits
  start = time.perf_counter()
  try:
    if a.command == 'import':
      r = import_hf(a.hf, a.workdir)
      print(f'imported {r["model_type"]} ({r["params"]:,} parameters, {r["tensors"]} tensors) from {a.hf} '
            f'into {a.workdir} in {time.perf_counter() - start:.1f} s; train it with '
            f'--config={a.workdir}/experiment.py --workdir={a.workdir}')
    elif a.command == 'export':
      r = export_hf(a.workdir, a.hf, a.step)
      print(f'exported step {r["step"]} of {a.workdir} as {r["model_type"]} ({r["tensors"]} tensors) '
            f'into {a.hf} in {time.perf_counter() - start:.1f} s')
    else:
      shape = logits(a.workdir, a.input_ids, a.out, a.step)
      print(f'logits {list(shape)} -> {a.out}')
  except (ConvertError, ConfigError, FileNotFoundError) as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
