"""moejax.data.rephrase against a real chat-completions server on loopback (http.server thread)."""
import collections
import http.server
import json
import threading

import pytest

from moejax.data import prepare, rephrase, shards

KEY = 'sk-test-secret-123'


class Server:
  """Replies REPHRASED[<chunk>]; a chunk with FLAKY fails with 503 twice first, EMPTY gets an empty
  reply, MALFORMED a non-JSON body. Records the requests."""

  def __init__(self):
    self.requests = collections.Counter()
    self.auth = set()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        outer.auth.add(self.headers.get('Authorization'))
        chunk = body['messages'][-1]['content']
        outer.requests[chunk] += 1
        if 'FLAKY' in chunk and outer.requests[chunk] <= 2:
          return self._send(503, b'busy')
        if 'MALFORMED' in chunk:
          return self._send(200, b'{"choices": [')
        text = '' if 'EMPTY' in chunk else f'REPHRASED[{chunk}]'
        self._send(200, json.dumps({'choices': [{'message': {'role': 'assistant', 'content': text}}]}).encode())

      def _send(self, code, data):
        self.send_response(code)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.httpd.shutdown()


def write_docs(path, texts):
  path.write_text(''.join(json.dumps({'id': f'd{i}', 'text': t}) + '\n' for i, t in enumerate(texts)))


def run(server, raw, out, capsys, monkeypatch, *extra):
  monkeypatch.setenv('TEST_KEY', KEY)
  code = rephrase.main([f'--raw={raw}', f'--out={out}', '--style=simple', f'--base_url={server.url}',
                        '--api_key_env=TEST_KEY', '--backoff=0.01', '--concurrency=3', *extra])
  cap = capsys.readouterr()
  assert code == 0 and KEY not in cap.out + cap.err
  return cap.out


def test_rephrase_writes_variants_retries_skips_bad_replies_and_resumes(server, tmp_path, capsys, monkeypatch):
  raw, out = tmp_path / 'docs.jsonl', tmp_path / 'out' / 'simple.jsonl'
  long_doc = '\n\n'.join(f'para {k} ' + 'x' * 30 for k in range(6))
  write_docs(raw, ['plain one', 'FLAKY two', 'EMPTY three', 'MALFORMED four', long_doc])
  msg = run(server, raw, out, capsys, monkeypatch, '--max_chunk_chars=90')
  assert 'rephrased 3 of 5' in msg and '1 empty, 1 malformed' in msg
  assert server.auth == {f'Bearer {KEY}'}
  recs = {r['id']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(recs) == {'d0', 'd1', 'd4'} and all(r['variant'] == 'simple' for r in recs.values())
  assert recs['d0']['text'] == 'REPHRASED[plain one]'
  assert server.requests['FLAKY two'] == 3
  assert recs['d4']['text'].count('REPHRASED[') == 3  # chunked to <= 90 chars: 2 paragraphs each
  before = sum(server.requests.values())
  msg = run(server, raw, out, capsys, monkeypatch, '--max_chunk_chars=90')
  assert '3 already done' in msg
  assert sum(server.requests.values()) - before == 2  # only the two bad documents are retried
  # The rephrasings become variants of the originals when prepared together.
  assert prepare.main(['--workers=1', f'--raw={raw}', f'--raw={out}', f'--out={tmp_path / "p"}', '--vocab_size=300',
                       '--val_fraction=0.2']) == 0
  assert shards.load_manifest(str(tmp_path / 'p'))['variants']['names'] == {'original': 5, 'simple': 3}


def test_chunks_fit_the_limit_and_keep_all_text():
  text = '\n\n'.join(['a' * 50, 'b' * 10, 'c' * 250, 'd'])
  parts = rephrase.chunks(text, 100)
  assert all(len(p) <= 100 for p in parts)
  assert ''.join(parts).replace('\n', '') == text.replace('\n', '')


def test_unreachable_server_counts_failures_and_unknown_style_is_one_line_error(tmp_path, capsys):
  raw = tmp_path / 'docs.jsonl'
  write_docs(raw, ['one'])
  code = rephrase.main([f'--raw={raw}', f'--out={tmp_path / "o.jsonl"}', '--style=haiku'])
  err = capsys.readouterr().err
  assert code == 2 and '--style' in err and err.count('\n') == 1
  code = rephrase.main([f'--raw={raw}', f'--out={tmp_path / "o.jsonl"}', '--base_url=http://127.0.0.1:9/v1',
                        '--retries=1', '--backoff=0.01', '--timeout=2'])
  assert code == 0 and '1 failed' in capsys.readouterr().out
