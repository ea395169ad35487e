"""An OpenAI-compatible chat-completions client for the data tools (judge, rephrase stage): one or
several endpoints (requests spread round-robin, a retry goes to the next one), retries with
exponential backoff on connection errors, timeouts, retryable HTTP codes, non-JSON bodies and
replies the caller rejects (`check`), and a preflight that turns an unreachable endpoint or an
unknown model name into one line before any work starts.

The API key comes from an environment variable (its name given); it only ever goes into the
Authorization header, never into a message.
"""
import itertools
import json
import random
import threading
import time
import urllib.error
import urllib.request

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ChatError(Exception):
  """A request that did not give a usable reply: kind is 'failed' (transport/HTTP), 'malformed'
  (not a chat completion), 'empty' or 'rejected' (check() said no, e.g. no score line)."""

  def __init__(self, kind: str, detail: str):
    super().__init__(detail)
    self.kind = kind


def reply_text(raw: bytes) -> str:
  """The message text of a /chat/completions response body, or ChatError saying what is wrong."""
  try:
    text = json.loads(raw)['choices'][0]['message']['content']
  except (ValueError, KeyError, IndexError, TypeError):
    raise ChatError('malformed', 'reply is not a chat completion') from None
  if not isinstance(text, str):
    raise ChatError('malformed', 'reply content is not text')
  if not text.strip():
    raise ChatError('empty', 'empty reply')
  return text


class EndpointError(Exception):
  """An endpoint that cannot serve the run (unreachable, unknown model); one line."""


def base_urls(spec: str) -> list[str]:
  urls = [u.strip().rstrip('/') for u in spec.split(',') if u.strip()]
  if not urls:
    raise EndpointError('--base_url: no URL given')
  return urls


class Chat:
  """Thread-safe; `complete(messages)` returns the reply text (retried, then ChatError)."""

  def __init__(self, urls: list[str], model: str, api_key: str | None, *, retries: int = 4,
               timeout: float = 120.0, backoff: float = 1.0, temperature: float = 0.0,
               max_tokens: int = 512):
    self.urls, self.model, self.retries, self.timeout = list(urls), model, retries, timeout
    self.backoff, self.temperature, self.max_tokens = backoff, temperature, max_tokens
    self._headers = {'Content-Type': 'application/json'}
    if api_key:
      self._headers['Authorization'] = f'Bearer {api_key}'
    self._next = itertools.count()
    self._lock = threading.Lock()

  def _url(self) -> str:
    with self._lock:
      return self.urls[next(self._next) % len(self.urls)]

  def preflight(self):
    """GET <url>/models on each endpoint: EndpointError if one is unreachable or lists models
    without this one. A server without /models (404, 405, 501) is taken as it is."""
    for url in self.urls:
      req = urllib.request.Request(f'{url}/models', headers=self._headers)
      try:
        with urllib.request.urlopen(req, timeout=min(self.timeout, 30)) as resp:
          listing = json.loads(resp.read())
      except urllib.error.HTTPError as e:
        if e.code in (401, 403):
          raise EndpointError(f'{url}: HTTP {e.code} (is the API key variable set?)') from None
        continue   # no model listing: nothing to check
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        raise EndpointError(f'{url}: unreachable ({getattr(e, "reason", e)})') from None
      except ValueError:
        continue
      names = [m.get('id') for m in listing.get('data', []) if isinstance(m, dict)] \
          if isinstance(listing, dict) else []
      if names and self.model not in names:
        raise EndpointError(f'--model: {url} does not serve {self.model!r} (it lists {names[:8]})')

  def complete(self, messages: list[dict], check=None, extra: dict | None = None) -> str:
    """The reply's text; `check(text)` may raise ValueError to reject it (then it is retried);
    `extra`: more request fields (e.g. a per-variant `seed`)."""
    body = json.dumps({'model': self.model, 'temperature': self.temperature,
                       'max_tokens': self.max_tokens, 'messages': messages, **(extra or {})}).encode()
    last = ChatError('failed', 'no attempt')
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
      try:
        text = self._once(body)
        if check is not None:
          try:
            check(text)
          except ValueError as e:
            raise ChatError('rejected', str(e)) from None
        return text
      except ChatError as e:
        last = e
        if e.kind == 'fatal':
          break
    raise ChatError(last.kind if last.kind != 'fatal' else 'failed',
                    f'gave up after {attempt + 1} attempt(s) ({last})')

  def _once(self, body: bytes) -> str:
    url = self._url()
    req = urllib.request.Request(f'{url}/chat/completions', data=body, headers=self._headers,
                                 method='POST')
    try:
      with urllib.request.urlopen(req, timeout=self.timeout) as resp:
        raw = resp.read()
    except urllib.error.HTTPError as e:
      raise ChatError('failed' if e.code in RETRY_STATUS else 'fatal', f'HTTP {e.code}') from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
      raise ChatError('failed', f'{type(e).__name__}: {getattr(e, "reason", e)}') from None
    return reply_text(raw)
