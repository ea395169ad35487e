"""moejax.tools.bench_data builds its report (every table and target line) on a tiny corpus."""
import re

from moejax.tools import bench_data, corpus


def test_corpus_counts_and_groups(tmp_path):
  import numpy as np
  info = corpus.make(str(tmp_path / 'c'), 0.3, files=2)
  assert info['documents'] == info['distinct'] + info['exact'] + info['near']
  groups = np.load(info['groups'])
  assert len(groups) == info['documents'] and len(np.unique(groups)) == info['distinct']
  again = corpus.make(str(tmp_path / 'd'), 0.3, files=2)   # seeded
  assert (tmp_path / 'c/part-000.jsonl').read_bytes() == (tmp_path / 'd/part-000.jsonl').read_bytes()
  assert {k: again[k] for k in ('distinct', 'exact', 'near')} == {k: info[k] for k in ('distinct', 'exact', 'near')}


def test_report(tmp_path):
  out = tmp_path / 'data_perf.md'
  assert bench_data.main([f'--out={out}', '--mb=1', '--small_mb=0.5', '--files=2',
                          '--tokenizer_mb=0.5', '--workers=1', f'--work={tmp_path / "w"}']) == 0
  text = out.read_text()
  assert text.startswith('# Data pipeline benchmark')
  assert 'Command: `python -m moejax.tools.bench_data --out=' in text and 'Commit: `' in text
  for section in ('## Corpora', '## Anchor', '## Stage throughput', '## Scaling', '## Peak memory',
                  '## Deduplication quality', '## Targets'):
    assert section in text
  assert '| large exact w=1 |' in text and '| small minhash w=1 |' in text
  assert len(re.findall(r'^- .*: (met|NOT met) \(', text, re.M)) == 5
