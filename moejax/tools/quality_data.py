"""The data of the quality study (`make ablate-quality`): a web-like source of Shakespeare scenes
mixed with generated low-quality text, graded by a loopback judge, a classifier trained on the
grades, the source scored, its best slice rephrased, and a held-out play for evaluation.

  python -m moejax.tools.quality_data --out=data/quality [--raw_only]

Every step is a command of the walkthrough in docs/data.md, run in this process against
moejax.tools.fake_llm (rule `vocab`: grade = round half up(5 x the share of a document's words
among the WORDS most frequent words of the two training plays)):

  raw/web.jsonl        the modern editions of Hamlet and Macbeth cut into ~2,000-character chunks
                       (clean), as many chunks of generated syllable-salad with a few real words
                       (junk), and chunks with 30-80% of their words replaced by such noise (mixed)
  raw/heldout.jsonl    The Tempest, chunked the same way (never trained on)
  web/                 prepare (BPE 1024 trained on web's train split)
  heldout/             prepare --tokenizer=web --val_fraction=0.9: data.dir, the study's eval
  labels.jsonl         judge label --sample=LABELS of web
  clf/                 judge train --features=frequency (the rule is a share of words)
  web/*.scores.npy     judge score
  rephrased/           rephrase --out_dir (the stage), style `simple` (the judge's rephraser model modernizes
                       archaic words), of web's documents graded >= 3
  web_rephrased/       prepare web + rephrased (--tokenizer=web), then judge score
Re-running skips what is done (each command resumes or says it is up to date).
"""
import argparse
import collections
import json
import random
import sys
from pathlib import Path

from moejax.data import judge, prepare, rephrase, sources
from moejax.tools import fake_llm

FIXTURE = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures' / 'shakespeare_sample'
TRAIN_PLAYS, HELDOUT_PLAY = ('hamlet', 'macbeth'), 'tempest'
CHUNK_CHARS = 2000
WORDS = 2000
LABELS = 300
SEED = 0


def chunks_of(play: str) -> list[str]:
  text = (FIXTURE / f'{play}_gut.txt').read_text(encoding='utf-8')
  return [c for scene in sources.split_documents(text) for c in rephrase.chunks(scene, CHUNK_CHARS)]


def noise_word(rng: random.Random) -> str:
  return ''.join(rng.choice('bcdfghklmnprstvwz') + rng.choice('aeiouy') for _ in range(rng.randint(1, 4)))


def junk(rng: random.Random, real: list[str]) -> str:
  """Syllable salad with ~10% real words, in lines like the plays'."""
  out, n = [], 0
  while n < CHUNK_CHARS:
    line = ' '.join(rng.choice(real) if rng.random() < 0.1 else noise_word(rng) for _ in range(rng.randint(4, 12)))
    out.append(line.capitalize() + rng.choice('.,;!?'))
    n += len(out[-1]) + 1
  return '\n'.join(out)


def corrupt(rng: random.Random, text: str, share: float) -> str:
  return ' '.join(noise_word(rng) if rng.random() < share else w for w in text.split(' '))


def write_raw(out: Path) -> dict:
  rng = random.Random(SEED)
  clean = [c for p in TRAIN_PLAYS for c in chunks_of(p)]
  counts = collections.Counter(fake_llm.words('\n'.join(clean)))
  vocab = [w for w, _ in counts.most_common(WORDS)]
  real = vocab[:500]
  docs = [('clean', c) for c in clean]
  docs += [('junk', junk(rng, real)) for _ in range(len(clean))]
  docs += [('mixed', corrupt(rng, c, rng.uniform(0.3, 0.8))) for c in rng.sample(clean, len(clean) // 2)]
  rng.shuffle(docs)
  raw = out / 'raw'
  raw.mkdir(parents=True, exist_ok=True)
  with open(raw / 'web.jsonl', 'w') as f:
    for i, (kind, text) in enumerate(docs):
      f.write(json.dumps({'id': f'{kind}-{i:04d}', 'text': text}) + '\n')
  with open(raw / 'heldout.jsonl', 'w') as f:
    for i, text in enumerate(chunks_of(HELDOUT_PLAY)):
      f.write(json.dumps({'id': f'{HELDOUT_PLAY}-{i:04d}', 'text': text}) + '\n')
  (out / 'judge_words.txt').write_text('\n'.join(vocab) + '\n')
  return collections.Counter(k for k, _ in docs)


def run(step: str, code: int):
  if code != 0:
    raise SystemExit(f'quality_data: error: {step} exited with {code}')


def build(out: Path) -> dict:
  kinds = write_raw(out)
  print(f'raw: {dict(kinds)} documents in {out}/raw/web.jsonl', flush=True)
  web, heldout = out / 'web', out / 'heldout'
  common = ['--workers=1', '--shard_tokens=200000']
  run('prepare web', prepare.main([f'--raw={out}/raw/web.jsonl', f'--out={web}', '--vocab_size=1024',
                                   '--val_fraction=0.05', *common]))
  run('prepare heldout', prepare.main([f'--raw={out}/raw/heldout.jsonl', f'--out={heldout}',
                                       f'--tokenizer={web}', '--val_fraction=0.9', *common]))
  vocab = (out / 'judge_words.txt').read_text().split()
  server = fake_llm.Server('vocab', vocab)
  try:
    run('judge label', judge.main(['label', f'--raw={out}/raw/web.jsonl', f'--out={out}/labels.jsonl',
                                   f'--base_url={server.url}', '--model=judge', f'--sample={LABELS}',
                                   f'--seed={SEED}', '--concurrency=8']))
    run('judge train', judge.main(['train', f'--labels={out}/labels.jsonl', f'--raw={out}/raw/web.jsonl',
                                   f'--out={out}/clf', '--features=frequency']))
    run('judge score web', judge.main(['score', f'--model_dir={out}/clf', f'--data={web}', '--workers=1']))
    run('rephrase', rephrase.main([f'--raw={out}/raw/web.jsonl', f'--out_dir={out}/rephrased', '--style=simple',
                                   f'--base_url={server.url}', '--model=rephraser', '--concurrency=8',
                                   '--max_chunk_chars=1000', f'--classifier={out}/clf', '--min_score=3']))
  finally:
    server.stop()
  run('prepare web_rephrased', prepare.main([f'--raw={out}/raw/web.jsonl', f'--raw={out}/rephrased',
                                             f'--out={out}/web_rephrased', f'--tokenizer={web}',
                                             '--val_fraction=0.05', *common]))
  run('judge score web_rephrased', judge.main(['score', f'--model_dir={out}/clf', f'--data={out}/web_rephrased',
                                               '--workers=1']))
  return {'kinds': dict(kinds), 'classifier': json.loads((out / 'clf' / 'classifier.json').read_text())}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default='data/quality')
  p.add_argument('--raw_only', action='store_true', help='only write raw/ and judge_words.txt (docs/data.md)')
  a = p.parse_args(argv)
  if a.raw_only:
    print(f'raw: {dict(write_raw(Path(a.out)))} documents in {a.out}/raw/web.jsonl; the judge\'s words in '
          f'{a.out}/judge_words.txt')
  else:
    build(Path(a.out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
