"""A loopback OpenAI-compatible chat server that stands in for an LLM judge and rephraser by known
rules, so that the quality pipeline (moejax.data.judge, the rephrase stage) and its study run here
without a model or a network.

Models it serves (GET /v1/models lists them; POST /v1/chat/completions):
  judge      grades the document inside the grading prompt (the text between the prompt's parts
             around {document}) and ends with `Educational score: N`, N by the rule:
               markers  the number of distinct MARKERS words present, capped at 5
               vocab    round half up(5 * the share of the document's words in a word list), i.e. how much
                        of it reads as the reference text (the quality study's rule)
  rephraser  rewrites the last user message by MODERN (archaic -> modern English words, keeping
             case and punctuation), the stand-in for a "simple modern English" rephrasing

  python -m moejax.tools.fake_llm PORT_FILE [--rule=markers|vocab] [--vocab=FILE]
      binds 127.0.0.1 on a free port, writes the port to PORT_FILE, serves until killed.

In tests, `Server(...)` runs it in a thread; `fault(text, n)` (n: the request's number for this
text) may return ('status', code), ('body', bytes) or ('sleep', seconds) to misbehave.
"""
import argparse
import collections
import http.server
import json
import re
import sys
import threading
import time
from pathlib import Path

MARKERS = ('photosynthesis', 'theorem', 'enzyme', 'algorithm', 'velocity')
MODERN = {'thou': 'you', 'thee': 'you', 'thy': 'your', 'thine': 'yours', 'art': 'are',
          'hath': 'has', 'doth': 'does', 'dost': 'do', 'hast': 'have', 'wilt': 'will',
          'shalt': 'shall', 'ere': 'before', 'oft': 'often', "'tis": 'it is', 'tis': 'it is',
          'nay': 'no', 'aye': 'yes', 'ay': 'yes', 'wherefore': 'why', 'whence': 'from where',
          'hither': 'here', 'thither': 'there', 'anon': 'soon', 'prithee': 'please',
          'methinks': 'I think', 'ye': 'you', 'o': 'oh', 'forsooth': 'truly',
          'perchance': 'perhaps', 'alack': 'alas', 'wast': 'were', 'canst': 'can',
          'couldst': 'could', 'wouldst': 'would', 'shouldst': 'should', 'knowest': 'know',
          'speak\'st': 'speak', 'sirrah': 'sir', 'whither': 'where'}
WORD = re.compile(r"[A-Za-z']+")
MODELS = ('judge', 'rephraser')


def words(text: str) -> list[str]:
  return [w.lower().strip("'") for w in WORD.findall(text) if w.strip("'")]


def grade_markers(doc: str) -> int:
  low = doc.lower()
  return min(5, sum(m in low for m in MARKERS))


def grade_vocab(doc: str, vocab: frozenset) -> int:
  ws = words(doc)
  share = sum(w in vocab for w in ws) / max(1, len(ws))
  return min(5, int(5 * share + 0.5))


def modernize(text: str) -> str:
  def sub(m):
    w = m.group(0)
    new = MODERN.get(w.lower())
    if new is None:
      return w
    return new[0].upper() + new[1:] if w[0].isupper() else new
  return WORD.sub(sub, text)


def document_of(message: str, prompt: str) -> str:
  """The document inside a grading prompt (the message itself when it is not in that form)."""
  head, _, tail = prompt.partition('{document}')
  if message.startswith(head) and message.endswith(tail) and len(message) >= len(head) + len(tail):
    return message[len(head):len(message) - len(tail)]
  return message


class Server:
  """The server in a daemon thread: .url (…/v1), .requests (Counter of user texts), .stop()."""

  def __init__(self, rule: str = 'markers', vocab=(), prompt: str | None = None, fault=None):
    if prompt is None:
      from moejax.data.judge import DEFAULT_PROMPT
      prompt = DEFAULT_PROMPT.read_text()
    self.rule, self.vocab, self.prompt, self.fault = rule, frozenset(vocab), prompt, fault
    self.requests = collections.Counter()
    self.auth = set()
    self.lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_GET(self):
        if not self.path.rstrip('/').endswith('/models'):
          return self._send(404, b'{}')
        self._send(200, json.dumps({'data': [{'id': m, 'object': 'model'} for m in MODELS]}).encode())

      def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        user = [m.get('content', '') for m in req.get('messages', []) if m.get('role') == 'user']
        text = user[-1] if user else ''
        with outer.lock:
          outer.auth.add(self.headers.get('Authorization'))
          outer.requests[text] += 1
          n = outer.requests[text]
        if outer.fault:
          f = outer.fault(text, n)
          if f and f[0] == 'status':
            return self._send(f[1], b'{"error": "injected"}')
          if f and f[0] == 'body':
            return self._send(200, f[1])
          if f and f[0] == 'sleep':
            time.sleep(f[1])
        model = req.get('model')
        if model not in MODELS:
          return self._send(404, json.dumps({'error': f'model {model!r} not found'}).encode())
        self._send(200, json.dumps(outer.reply(model, text)).encode())

      def _send(self, code, data):
        try:
          self.send_response(code)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client timed out and left
          pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.httpd.daemon_threads = True
    self.port = self.httpd.server_address[1]
    self.url = f'http://127.0.0.1:{self.port}/v1'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def grade(self, doc: str) -> int:
    return grade_markers(doc) if self.rule == 'markers' else grade_vocab(doc, self.vocab)

  def reply(self, model: str, text: str) -> dict:
    if model == 'judge':
      content = f'The extract is graded by a fixed rule.\nEducational score: {self.grade(document_of(text, self.prompt))}'
    else:
      content = modernize(text)
    return {'object': 'chat.completion', 'model': model,
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': content}}]}

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('port_file')
  p.add_argument('--rule', default='markers', choices=('markers', 'vocab'))
  p.add_argument('--vocab', default='', help='word list, one per line (rule vocab)')
  a = p.parse_args(argv)
  vocab = Path(a.vocab).read_text().split() if a.vocab else ()
  s = Server(a.rule, vocab)
  Path(a.port_file).write_text(str(s.port))
  s.thread.join()
  return 0


if __name__ == '__main__':
  sys.exit(main())
