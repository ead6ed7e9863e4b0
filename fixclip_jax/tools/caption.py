r"""Re-captions images with an MLLM behind an OpenAI-compatible server (docs/method.md §3).

FIX-CLIP re-captions its training images with Llama3-LLaVA-NeXT-8B using 20 prompt
templates and drops repetitive, meaningless and too-short captions. Such models are
usually served by vLLM, SGLang or TGI behind the OpenAI chat API; this module is the
client:

  python -m fixclip_jax.tools.caption --images=DIR_OR_MANIFEST --out=caps.jsonl \
      --endpoint=http://localhost:8000/v1 --model=llava-hf/llama3-llava-next-8b-hf

Each image goes as a base64 data URL to `POST {endpoint}/chat/completions` with one of
the prompts, chosen deterministically from (seed, image key). The output is a JSONL
training manifest, one line per captioned image:
  {"image", "caption", "short_caption", "prompt_id", "model"}
"image" is by default the image's path relative to the output manifest's folder, which
is where `sources.JsonlSource` resolves relative paths when no image_root is given, so
the output trains as it is; `--image_paths=as_input` keeps the input manifest's "image"
field verbatim (or, for a directory, the path relative to it) for use with an image root.

Resuming: lines are appended whole by one writer (the main thread), so rerunning the
same command skips the images already in the output; a partial last line left by a kill
mid-write is truncated away with a warning. Images that could not be captioned go to
`<out>.failures.jsonl` ({"image", "kind", "reason", "detail"}, kind one of unreadable /
rejected / api_error / failed). It is a log across runs: the last record of an image
counts, and an image in the output is done whatever the log says. On a rerun, "failed"
(transient: retries exhausted) is tried again; the permanent kinds are skipped unless
`retry_failed` is set.
"""
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import io
import json
import os
import random
import socket
import sys
import threading
import time
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Set, Tuple, Union)
import urllib.error
import urllib.request

from absl import app
from absl import flags
from absl import logging
from PIL import Image
import tqdm

from fixclip_jax import cli
from fixclip_jax.data import captions as captions_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Formats sent as they are on disk; anything else is re-encoded as JPEG.
_MIME_BY_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
FAILURES_SUFFIX = ".failures.jsonl"
# Failure kinds that a rerun does not retry by default: retrying gives the same answer.
PERMANENT_FAILURES = ("unreadable", "rejected", "api_error")

# Our own wording of 20 varied requests for a detailed description (docs/method.md §3 uses 20
# templates with Llama3-LLaVA-NeXT-8B; the paper does not publish them).
DEFAULT_PROMPTS = (
    "Describe this image in detail.",
    "Write a detailed description of everything visible in this picture.",
    "Give a thorough, paragraph-long description of this image, covering the main "
    "subjects, the background and the overall scene.",
    "What is happening in this image? Describe the scene, the objects and their "
    "positions in detail.",
    "Describe the contents of this photo as if explaining it to someone who cannot see "
    "it, including colors, shapes and spatial layout.",
    "Provide a comprehensive caption for this image that mentions the main objects, "
    "their attributes and how they relate to each other.",
    "Look carefully at this image and describe it, starting with the most prominent "
    "element and moving to the finer details.",
    "Describe this image thoroughly: the setting, the people or animals if any, the "
    "objects, the lighting and the mood.",
    "Write a rich, descriptive paragraph about this picture, mentioning textures, colors "
    "and any text that appears in it.",
    "Explain in detail what this image shows, including the foreground, the middle "
    "ground and the background.",
    "Give an elaborate description of the visual content of this image.",
    "Describe the scene in this image with as much specific detail as you can observe.",
    "Summarize the visual content of this image in a detailed paragraph, noting the "
    "number, type and arrangement of objects.",
    "Describe this picture in depth. What are the key elements, and where are they "
    "located in the frame?",
    "Write a detailed caption for this image that a person could use to picture it "
    "accurately without seeing it.",
    "Analyze this image and describe its composition, subjects, colors and surroundings.",
    "Describe every notable detail in this image, from the largest objects to small "
    "items in the corners.",
    "Tell me what you see in this image, in detail, including the environment and any "
    "actions taking place.",
    "Produce a long, precise description of this photograph, covering appearance, "
    "materials, positions and context.",
    "Describe this image comprehensively, paying attention to the relationships between "
    "objects and the overall atmosphere.",
)
SHORT_PROMPT = "Describe this image in one sentence."


class UnreadableImageError(Exception):
  """The image file is missing or cannot be decoded."""


class EndpointUnreachableError(RuntimeError):
  """The server cannot be reached at all (connection refused, unknown host)."""


class ApiError(Exception):
  """A non-retryable HTTP error (4xx other than 408/429) or an unparseable response."""

  def __init__(self, status: int, body: str, url: str):
    super().__init__(f"HTTP {status} from {url}: {body}")
    self.status, self.body, self.url = status, body, url


class RequestFailedError(Exception):
  """Retries exhausted on transient errors; `reason` is the last error's category."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


class _TransientError(Exception):
  """One attempt failed in a way worth retrying."""

  def __init__(self, reason: str, detail: str, retry_after: Optional[float] = None):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail, self.retry_after = reason, detail, retry_after


class _RefusedError(_TransientError):
  """Connection refused / unknown host: fatal before the first answer, else transient."""


class _StoppedError(Exception):
  """The run is being stopped; workers give up at their next request."""


# ---------------------------------------------------------------------------
# Inputs: images and prompts.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One image to caption. `key` is written as "image" and identifies it on resume."""
  key: str
  path: str


def _list_directory(root: str) -> List[ImageItem]:
  items = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()  # deterministic walk order
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(dirpath, name)
        key = os.path.relpath(path, root).replace(os.sep, "/")
        items.append(ImageItem(key=key, path=path))
  return items


def _list_manifest(manifest: str, image_root: Optional[str]) -> List[ImageItem]:
  root = image_root if image_root is not None else os.path.dirname(manifest)
  items = []
  with open(manifest, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{manifest}:{lineno}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise ValueError(f"{manifest}:{lineno}: missing string field 'image'")
      key = record["image"]
      items.append(ImageItem(key=key, path=os.path.join(root, key)))
  return items


def list_images(source: str, image_root: Optional[str] = None,
                relative_to: Optional[str] = None) -> List[ImageItem]:
  """Images of a directory (recursive; jpg/jpeg/png/webp) or of a JSONL manifest.

  Manifest lines need an "image" field; relative paths are resolved against
  `image_root` (default: the manifest's directory). Keys are the manifest's field
  verbatim (for a directory: the path relative to it), or with `relative_to` the path
  relative to that folder (pass the output manifest's folder).
  """
  if os.path.isdir(source):
    if image_root is not None:
      raise ValueError(f"--image_root applies to a manifest, but {source} is a directory")
    items = _list_directory(source)
  elif os.path.isfile(source):
    items = _list_manifest(source, image_root)
  else:
    raise FileNotFoundError(f"--images: {source} is neither a directory nor a manifest file")
  if relative_to is not None:
    base = os.path.abspath(relative_to)
    items = [ImageItem(key=os.path.relpath(os.path.abspath(it.path), base).replace(
        os.sep, "/"), path=it.path) for it in items]
  return items


def load_prompts(path: Optional[str]) -> Tuple[str, ...]:
  """Prompts of a file, one per line (blank lines and '#' comments skipped)."""
  if path is None:
    return DEFAULT_PROMPTS
  with open(path, encoding="utf-8") as f:
    prompts = tuple(l.strip() for l in f if l.strip() and not l.lstrip().startswith("#"))
  if not prompts:
    raise ValueError(f"--prompts: {path} holds no prompts")
  return prompts


def prompt_order(seed: int, key: str, num_prompts: int) -> List[int]:
  """A permutation of prompt ids fixed by (seed, key): attempt k uses order[k].

  Ranking by a hash keeps it independent of Python's RNG, so the choice is the same
  across runs, machines and Python versions; retries of a rejected caption walk down
  the ranking and so always use a prompt not tried yet.
  """
  def rank(pid):
    return hashlib.sha256(f"{seed}\0{key}\0{pid}".encode("utf-8")).digest()
  return sorted(range(num_prompts), key=rank)


def encode_image(path: str, max_side: Optional[int] = None) -> str:
  """The image as a data URL; original bytes when possible, else re-encoded JPEG.

  The image is fully decoded first so that truncated or corrupt files are caught here
  rather than by the server. Images larger than `max_side` are downscaled (LLaVA-NeXT
  tiles at most ~1344 px, larger uploads only cost bandwidth).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
  except Exception as e:  # PIL raises many types on corrupt data.  pylint: disable=broad-except
    raise UnreadableImageError(f"{type(e).__name__}: {e}") from None
  mime = _MIME_BY_FORMAT.get(fmt)
  too_large = bool(max_side) and max(img.size) > max_side
  if mime is None or too_large:
    img = img.convert("RGB")
    if too_large:
      img.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    data, mime = buf.getvalue(), "image/jpeg"
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------
# The HTTP client.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ClientConfig:
  """How to talk to an OpenAI-compatible server."""
  endpoint: str  # e.g. http://localhost:8000/v1
  model: str
  api_key: Optional[str] = None
  timeout: float = 120.0  # seconds per request
  max_retries: int = 5  # retries after the first attempt
  backoff_base: float = 1.0  # first retry waits ~this, doubling each time
  backoff_max: float = 60.0
  max_tokens: int = 512
  short_max_tokens: int = 77
  temperature: float = 0.0
  # Merged into every chat request (server-specific knobs, e.g. repetition_penalty).
  extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _truncate(text: str, limit: int = 2000) -> str:
  return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _retry_after(headers) -> Optional[float]:
  value = headers.get("Retry-After") if headers is not None else None
  try:
    return float(value) if value is not None else None
  except ValueError:  # an HTTP date; rare, fall back to our own backoff
    return None


def _response_text(response: Mapping[str, Any]) -> str:
  """choices[0].message.content; some servers return a list of content parts."""
  content = response["choices"][0]["message"]["content"]
  if content is None:
    return ""
  if isinstance(content, list):
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
  return str(content)


class ChatClient:
  """Chat completions with retries: exponential backoff + jitter on timeouts,
  connection errors, 408, 429 and 5xx; other 4xx raise ApiError with the body."""

  def __init__(self, config: ClientConfig, stop_event: Optional[threading.Event] = None):
    self.config = config
    self.endpoint = config.endpoint.rstrip("/")
    self._stop = stop_event or threading.Event()
    self._lock = threading.Lock()
    self._answered = False  # some request got an HTTP answer: the server exists
    self.requests = 0  # attempts sent
    self.retries = 0

  def _headers(self) -> Dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self.config.api_key:
      headers["Authorization"] = f"Bearer {self.config.api_key}"
    return headers

  def _send(self, method: str, path: str, payload: Optional[Mapping[str, Any]],
            timeout: float) -> Dict[str, Any]:
    """One attempt. Raises _TransientError / _RefusedError / ApiError."""
    url = self.endpoint + path
    data = json.dumps(payload).encode("utf-8") if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=self._headers())
    with self._lock:
      self.requests += 1
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    except urllib.error.HTTPError as e:
      self._answered = True
      try:
        err_body = e.read().decode("utf-8", "replace")
      except Exception:  # pylint: disable=broad-except
        err_body = ""
      err_body = _truncate(err_body or e.reason or "")
      if e.code in (408, 429) or e.code >= 500:
        raise _TransientError(f"HTTP {e.code}", err_body, _retry_after(e.headers)) from None
      raise ApiError(e.code, err_body, url) from None
    except urllib.error.URLError as e:  # connection-level: reason is the OSError
      reason = e.reason
      if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
        raise _RefusedError("connection refused", f"{url}: {reason}") from None
      if isinstance(reason, TimeoutError):
        raise _TransientError("timeout", f"{url}: no answer in {timeout}s") from None
      raise _TransientError("connection error", f"{url}: {reason}") from None
    except TimeoutError:  # timeout while reading the response
      raise _TransientError("timeout", f"{url}: no answer in {timeout}s") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
      raise _TransientError("connection error", f"{url}: {type(e).__name__}: {e}") from None
    self._answered = True
    try:
      return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ApiError(200, "response is not JSON: " +
                     _truncate(body.decode("utf-8", "replace"), 500), url) from None

  def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
    delay = min(self.config.backoff_max, self.config.backoff_base * 2.0 ** attempt)
    delay *= 0.5 + 0.5 * random.random()  # jitter: de-synchronise concurrent workers
    if retry_after is not None:  # the server's 429/503 hint wins when longer
      delay = max(delay, min(retry_after, self.config.backoff_max))
    return delay

  def _with_retries(self, method: str, path: str, payload, timeout: float,
                    max_retries: int) -> Dict[str, Any]:
    last = None
    for attempt in range(max_retries + 1):
      if self._stop.is_set():
        raise _StoppedError()
      try:
        return self._send(method, path, payload, timeout)
      except _RefusedError as e:
        # Fail fast when the server was never there, instead of spending every
        # image's retries on it; once it has answered, a refusal is a restart.
        if not self._answered:
          raise EndpointUnreachableError(
              f"cannot connect to {self.endpoint}{path} ({e.detail}); is the server "
              "running and is --endpoint right?") from None
        last = e
      except _TransientError as e:
        last = e
      if attempt < max_retries:
        with self._lock:
          self.retries += 1
        delay = self._backoff(attempt, last.retry_after)
        logging.log_every_n_seconds(
            logging.WARNING, "Retrying after %s (%.1fs): %s", 10,
            last.reason, delay, _truncate(last.detail, 300))
        if self._stop.wait(delay):
          raise _StoppedError()
    raise RequestFailedError(last.reason, f"after {max_retries + 1} attempts: {last.detail}")

  def list_models(self) -> List[str]:
    """Model ids served at {endpoint}/models."""
    response = self._with_retries("GET", "/models", None, min(self.config.timeout, 30.0), 1)
    return [m.get("id") for m in response.get("data", []) if isinstance(m, dict)]

  def preflight(self) -> None:
    """Fails fast if the endpoint is down or does not serve the model.

    Raises EndpointUnreachableError (connection refused, timeouts), ApiError (e.g. 401
    for a bad key) or ValueError (model not served). A server without /models (404) is
    accepted with a warning.
    """
    try:
      models = self.list_models()
    except RequestFailedError as e:
      raise EndpointUnreachableError(
          f"{self.endpoint}/models did not answer ({e}); is the server up?") from None
    except ApiError as e:
      if e.status in (404, 405):
        logging.warning("%s/models is not available (HTTP %d); skipping the model check",
                        self.endpoint, e.status)
        return
      raise
    if models and self.config.model not in models:
      raise ValueError(f"--model={self.config.model!r} is not served by {self.endpoint}; "
                       f"it serves {models}")

  def complete(self, prompt: str, image_url: str, max_tokens: Optional[int] = None) -> str:
    """The model's answer to one image + prompt (a single user turn)."""
    payload = {
        "model": self.config.model,
        # Image before text: LLaVA's chat template puts <image> before the question.
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": prompt},
        ]}],
        "max_tokens": max_tokens or self.config.max_tokens,
        "temperature": self.config.temperature,
        **self.config.extra_body,
    }
    response = self._with_retries("POST", "/chat/completions", payload,
                                  self.config.timeout, self.config.max_retries)
    try:
      return _response_text(response)
    except (KeyError, IndexError, TypeError):
      raise ApiError(200, "no choices[0].message.content in " +
                     _truncate(json.dumps(response), 500),
                     self.endpoint + "/chat/completions") from None


# ---------------------------------------------------------------------------
# Caption filters.
# ---------------------------------------------------------------------------


def _default_filter_config():
  return captions_lib.CaptionFilterConfig()


def caption_rejection(caption: str, filter_config) -> Optional[str]:
  """Why a caption is rejected (repetitive, too short, refusal, ...) or None."""
  return captions_lib.filter_reason(caption, filter_config)


def clean_caption(text: str) -> str:
  """Whitespace (MLLM paragraphs and newlines) collapsed to single spaces."""
  return " ".join(text.split())


# ---------------------------------------------------------------------------
# One image, end to end (runs in a worker thread).
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Outcome:
  item: ImageItem
  record: Optional[Dict[str, Any]] = None  # the manifest line, when captioned
  failure: Optional[Dict[str, Any]] = None  # the failures-file line, when not
  rejections: List[str] = dataclasses.field(default_factory=list)
  short_fallback: bool = False


@dataclasses.dataclass
class _Settings:
  prompts: Sequence[str]
  seed: int
  retry_rejected: int
  short: str
  filter_config: Any
  max_side: Optional[int]


def _failure(item: ImageItem, kind: str, reason: str, detail: str) -> Dict[str, Any]:
  return {"image": item.key, "kind": kind, "reason": reason, "detail": detail}


def _short_caption(client: ChatClient, caption: str, image_url: str,
                   mode: str) -> Tuple[str, bool]:
  """(short caption, whether the model request failed and we fell back)."""
  if mode == "first_sentence":
    return captions_lib.first_sentence(caption), False
  try:
    short = clean_caption(client.complete(SHORT_PROMPT, image_url,
                                          client.config.short_max_tokens))
  except (ApiError, RequestFailedError) as e:
    logging.warning("Short caption request failed (%s); using the first sentence", e)
    short = ""
  if not short:
    return captions_lib.first_sentence(caption), True
  return short, False


def caption_one(item: ImageItem, client: ChatClient, settings: _Settings) -> _Outcome:
  """Reads, captions, filters (retrying rejected captions with other prompts)."""
  outcome = _Outcome(item=item)
  try:
    image_url = encode_image(item.path, settings.max_side)
  except UnreadableImageError as e:
    outcome.failure = _failure(item, "unreadable", "unreadable image", f"{item.path}: {e}")
    return outcome
  order = prompt_order(settings.seed, item.key, len(settings.prompts))
  for attempt in range(settings.retry_rejected + 1):
    prompt_id = order[attempt % len(order)]
    try:
      caption = clean_caption(client.complete(settings.prompts[prompt_id], image_url))
    except ApiError as e:
      logging.warning("%s: HTTP %d from %s: %s", item.key, e.status, e.url, e.body)
      outcome.failure = _failure(item, "api_error", f"HTTP {e.status}", e.body)
      return outcome
    except RequestFailedError as e:
      outcome.failure = _failure(item, "failed", e.reason, e.detail)
      return outcome
    reason = None
    if settings.filter_config is not None:
      reason = caption_rejection(caption, settings.filter_config)
    if reason is None:
      break
    outcome.rejections.append(reason)
  else:
    outcome.failure = _failure(item, "rejected", reason, _truncate(caption, 500))
    return outcome
  short, outcome.short_fallback = _short_caption(client, caption, image_url, settings.short)
  outcome.record = {"image": item.key, "caption": caption, "short_caption": short,
                    "prompt_id": prompt_id, "model": client.config.model}
  return outcome


# ---------------------------------------------------------------------------
# Output files: append-only JSONL with repair of a partial last line.
# ---------------------------------------------------------------------------


def _repair_jsonl(path: str) -> List[Dict[str, Any]]:
  """Records of an append-only JSONL file; truncates a partial last line away."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    logging.warning("%s: dropping a partial last line of %d bytes (a run was killed "
                    "mid-write); that image will be captioned again", path, len(data) - end)
    with open(path, "r+b") as f:
      f.truncate(end)
      f.flush()
      os.fsync(f.fileno())
  records = []
  for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}:{lineno}: corrupt line in the middle of the file ({e}); "
                       "remove it and rerun") from None
  return records


class OutputLockedError(RuntimeError):
  """Another caption run is writing the same output."""


@contextlib.contextmanager
def output_lock(out_path: str) -> Iterator[None]:
  """Holds an exclusive lock on `out_path` (created if absent) for the run: two
  runs appending to (and repairing) one manifest would corrupt it. The lock
  (flock) goes away with the process, however it ends."""
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "ab") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise OutputLockedError(
          f"{out_path} is being written by another caption run (it holds the "
          "file's lock); wait for it to finish, or pass another --out") from None
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _AppendWriter:
  """Appends whole lines with one write each; fsyncs every `fsync_every` lines."""

  def __init__(self, path: str, fsync_every: int):
    self._f = open(path, "ab", buffering=0)  # unbuffered: every line reaches the OS now
    self._fsync_every = max(1, fsync_every)
    self._unsynced = 0

  def write(self, record: Mapping[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:  # a raw write may be short; a kill in between leaves a partial line
      view = view[self._f.write(view):]
    self._unsynced += 1
    if self._unsynced >= self._fsync_every:
      self.sync()

  def sync(self) -> None:
    if self._unsynced:
      os.fsync(self._f.fileno())
      self._unsynced = 0

  def close(self) -> None:
    self.sync()
    self._f.close()


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


def _as_items(image_items: Iterable[Union[ImageItem, str]]) -> List[ImageItem]:
  return [it if isinstance(it, ImageItem) else ImageItem(key=str(it), path=str(it))
          for it in image_items]


class _Tally:
  """Counts for the summary (main thread only)."""

  def __init__(self, max_examples: int = 20):
    self.captioned = 0
    self.rejections = collections.Counter()  # every rejected caption, by reason
    self.failed = collections.Counter()  # images not captioned, by "kind: reason"
    self.by_kind = collections.Counter()
    self.unreadable: List[str] = []
    self.examples: List[Dict[str, Any]] = []
    self.short_fallbacks = 0
    self.consecutive_failures = 0
    self._max_examples = max_examples

  def add(self, outcome: _Outcome) -> None:
    self.rejections.update(outcome.rejections)
    self.short_fallbacks += outcome.short_fallback
    if outcome.record is not None:
      self.captioned += 1
      self.consecutive_failures = 0
      return
    failure = outcome.failure
    self.by_kind[failure["kind"]] += 1
    self.failed[f"{failure['kind']}: {failure['reason']}"] += 1
    if failure["kind"] == "unreadable" and len(self.unreadable) < self._max_examples:
      self.unreadable.append(outcome.item.path)
    if len(self.examples) < self._max_examples:
      self.examples.append(failure)
    if failure["kind"] in ("failed", "api_error"):  # server trouble, not the image
      self.consecutive_failures += 1
    else:
      self.consecutive_failures = 0


def caption_images(image_items: Iterable[Union[ImageItem, str]], out_path: str,
                   client_config: ClientConfig, **options) -> Dict[str, Any]:
  """Captions the images not yet in `out_path`, appending to it; returns a summary.

  Args:
    image_items: ImageItems (or paths, used as both key and path).
    out_path: the JSONL manifest; failures go to out_path + ".failures.jsonl".
    client_config: server, model, timeouts and retries.
    prompts: the prompt set (default DEFAULT_PROMPTS).
    concurrency: images in flight, hence requests in flight (one per worker).
    seed: with the image key, fixes the prompt of each image.
    retry_rejected: a caption the filters reject is asked again with another prompt up
      to this many times.
    short: "first_sentence" (Long-CLIP's rule) or "model" (a second, one-sentence
      request; falls back to the first sentence if it fails).
    filter_config: a captions.CaptionFilterConfig, "default", or None for no filtering.
    max_side: images larger than this are downscaled before upload (None: never).
    fsync_every: fsync the output every this many lines (and at the end).
    preflight: GET {endpoint}/models first and fail fast if it is down.
    retry_failed: also retry images a previous run recorded as unreadable, rejected or
      api_error (by default only transient failures are retried).
    max_consecutive_failures: stop after this many images in a row fail on server errors
      (0: never), rather than burn through the whole list against a broken server.
    progress: show a tqdm bar with images/s and ETA.

  Raises:
    EndpointUnreachableError, ApiError, ValueError: the server is down or misconfigured
      (before any image is spent) or keeps failing (max_consecutive_failures).
    OutputLockedError: another run is writing `out_path` (before anything is read
      or written).
  """
  with output_lock(out_path):
    return _caption_images(image_items, out_path, client_config, **options)


def _caption_images(
    image_items: Iterable[Union[ImageItem, str]],
    out_path: str,
    client_config: ClientConfig,
    *,
    prompts: Optional[Sequence[str]] = None,
    concurrency: int = 16,
    seed: int = 0,
    retry_rejected: int = 2,
    short: str = "first_sentence",
    filter_config: Any = "default",
    max_side: Optional[int] = 1344,
    fsync_every: int = 100,
    preflight: bool = True,
    retry_failed: bool = False,
    max_consecutive_failures: int = 100,
    progress: bool = True,
) -> Dict[str, Any]:
  """caption_images, with `out_path` locked."""
  if short not in ("first_sentence", "model"):
    raise ValueError(f"short must be 'first_sentence' or 'model', got {short!r}")
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")
  if isinstance(filter_config, str) and filter_config == "default":
    filter_config = _default_filter_config()
  settings = _Settings(prompts=tuple(prompts or DEFAULT_PROMPTS), seed=seed,
                       retry_rejected=retry_rejected, short=short,
                       filter_config=filter_config, max_side=max_side)
  start = time.time()
  items = _as_items(image_items)
  failures_path = out_path + FAILURES_SUFFIX

  # Resume: what the output already holds, and what earlier runs gave up on for good.
  done: Set[str] = {r.get("image") for r in _repair_jsonl(out_path)}
  last_failure = {r.get("image"): r.get("kind") for r in _repair_jsonl(failures_path)}
  todo, seen = [], set()
  skipped = skipped_failed = duplicates = 0
  for item in items:
    if item.key in seen:
      duplicates += 1
      continue
    seen.add(item.key)
    if item.key in done:
      skipped += 1
    elif not retry_failed and last_failure.get(item.key) in PERMANENT_FAILURES:
      skipped_failed += 1
    else:
      todo.append(item)
  if duplicates:
    logging.warning("%d duplicate images in the input were ignored", duplicates)
  logging.info("%d images: %d already captioned, %d failed before (skipped), %d to do",
               len(seen), skipped, skipped_failed, len(todo))

  stop = threading.Event()
  client = ChatClient(client_config, stop_event=stop)
  tally = _Tally()
  if todo and preflight:
    client.preflight()

  if todo:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    _run_pool(todo, client, settings, concurrency, stop, tally,
              _AppendWriter(out_path, fsync_every), _AppendWriter(failures_path, fsync_every),
              max_consecutive_failures, progress)

  elapsed = time.time() - start
  summary = {
      "out": out_path,
      "failures_file": failures_path,
      "images": len(seen),
      "duplicates_in_input": duplicates,
      "skipped": skipped,
      "skipped_failed_before": skipped_failed,
      "captioned": tally.captioned,
      "rejected": dict(tally.rejections),
      "rejected_images": tally.by_kind["rejected"],
      "failed": dict(tally.failed),
      "failed_images": tally.by_kind["failed"] + tally.by_kind["api_error"],
      "unreadable": tally.by_kind["unreadable"],
      "unreadable_examples": tally.unreadable,
      "failure_examples": tally.examples,
      "short_fallbacks": tally.short_fallbacks,
      "requests": client.requests,
      "retries": client.retries,
      "elapsed_s": round(elapsed, 3),
      "images_per_s": round(tally.captioned / elapsed, 3) if elapsed > 0 else None,
  }
  return summary


def _run_pool(todo: Sequence[ImageItem], client: ChatClient, settings: _Settings,
              concurrency: int, stop: threading.Event, tally: _Tally,
              writer: _AppendWriter, failure_writer: _AppendWriter,
              max_consecutive_failures: int, progress: bool) -> None:
  """Workers caption; this (single) thread writes every line, so lines never interleave."""
  bar = tqdm.tqdm(total=len(todo), unit="img", smoothing=0.05, disable=not progress,
                  dynamic_ncols=True)
  pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="caption")
  pending: Set[concurrent.futures.Future] = set()
  remaining = iter(todo)

  def handle(outcome: _Outcome) -> None:
    tally.add(outcome)
    if outcome.record is not None:
      writer.write(outcome.record)
    else:
      failure_writer.write(outcome.failure)
    bar.update(1)
    bar.set_postfix(ok=tally.captioned, rejected=tally.by_kind["rejected"],
                    failed=tally.by_kind["failed"] + tally.by_kind["api_error"],
                    unreadable=tally.by_kind["unreadable"], refresh=False)

  try:
    for item in remaining:  # keep a small queue ahead of the workers, not the whole list
      pending.add(pool.submit(caption_one, item, client, settings))
      if len(pending) >= 2 * concurrency:
        break
    while pending:
      finished, pending = concurrent.futures.wait(
          pending, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        handle(future.result())  # fatal errors (endpoint down) propagate from here
      if (max_consecutive_failures and
          tally.consecutive_failures >= max_consecutive_failures):
        raise RuntimeError(
            f"{tally.consecutive_failures} images in a row failed on server errors "
            f"(last: {tally.examples[-1] if tally.examples else '?'}); stopping. Fix the "
            "server and rerun the same command to resume.")
      for item in remaining:
        pending.add(pool.submit(caption_one, item, client, settings))
        if len(pending) >= 2 * concurrency:
          break
  except BaseException:
    # Keep what already finished, then stop the workers at their next request.
    stop.set()
    for future in pending:
      future.cancel()
    for future in pending:
      if future.done() and not future.cancelled() and future.exception() is None:
        handle(future.result())
    raise
  finally:
    pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
    writer.close()
    failure_writer.close()
    bar.close()


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program, so that importing
  this module next to other CLIs never clashes)."""
  flags.DEFINE_string("images", None, "Directory (recursive) or JSONL manifest with 'image'.")
  flags.DEFINE_string("image_root", None, "Root for relative manifest paths "
                      "(default: the manifest's directory).")
  flags.DEFINE_enum("image_paths", "relative_to_out", ["relative_to_out", "as_input"],
                    "'image' in the output: relative to the output's folder (trains with "
                    "no image_root) or as in the input (manifest field / path under DIR).")
  flags.DEFINE_string("out", None, "Output JSONL manifest (appended to; resumable).")
  flags.DEFINE_string("endpoint", None, "OpenAI-compatible base URL, e.g. http://host:8000/v1.")
  flags.DEFINE_string("model", None, "Model name as served.")
  flags.DEFINE_string("prompts", None, "File of prompts, one per line (default: built-in 20).")
  flags.DEFINE_integer("concurrency", 16, "Requests in flight.")
  flags.DEFINE_float("timeout", 120.0, "Seconds per request.")
  flags.DEFINE_integer("max_retries", 5, "Retries on timeouts, resets, 429 and 5xx.")
  flags.DEFINE_enum("short", "first_sentence", ["first_sentence", "model"],
                    "Short caption: the first sentence, or a second one-sentence request.")
  flags.DEFINE_string("api_key_env", None, "Environment variable holding the API key.")
  flags.DEFINE_integer("seed", 0, "Fixes the prompt of each image (with its path).")
  flags.DEFINE_integer("max_tokens", 512, "max_tokens of the caption request.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature.")
  flags.DEFINE_string("extra_body", None, "JSON object merged into each request, e.g. "
                      "'{\"repetition_penalty\": 1.05}'.")
  flags.DEFINE_integer("retry_rejected", 2, "Retries of a filtered-out caption with "
                       "another prompt.")
  flags.DEFINE_bool("filter", True, "Apply the caption filters (captions.filter_reason).")
  flags.DEFINE_string("filter_config", None, "JSON object of CaptionFilterConfig fields "
                      "overriding the defaults, e.g. '{\"min_words\": 20}'.")
  flags.DEFINE_integer("max_side", 1344, "Downscale larger images before upload (0: never).")
  flags.DEFINE_integer("fsync_every", 100, "fsync the output every this many lines.")
  flags.DEFINE_bool("retry_failed", False, "Also retry images that earlier runs recorded "
                    "as unreadable, rejected or api_error.")
  flags.DEFINE_integer("max_consecutive_failures", 100, "Stop after this many images in a "
                       "row fail on server errors (0: never).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv: Sequence[str]) -> None:
  cli.reject_positional_arguments(argv)
  for name in ("images", "out", "endpoint", "model"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  api_key = None
  if FLAGS.api_key_env:
    api_key = os.environ.get(FLAGS.api_key_env)
    if not api_key:
      raise app.UsageError(f"--api_key_env={FLAGS.api_key_env}: that variable is not set")
  extra_body = {}
  if FLAGS.extra_body:
    try:
      extra_body = json.loads(FLAGS.extra_body)
    except json.JSONDecodeError as e:
      raise app.UsageError(f"--extra_body is not valid JSON: {e}") from None
    if not isinstance(extra_body, dict):
      raise app.UsageError("--extra_body must be a JSON object")
  filter_config = None
  if FLAGS.filter:
    try:
      filter_config = captions_lib.CaptionFilterConfig.from_mapping(
          json.loads(FLAGS.filter_config or "{}"))
    except (json.JSONDecodeError, ValueError, TypeError) as e:
      raise app.UsageError(f"--filter_config: {e}") from None
  config = ClientConfig(endpoint=FLAGS.endpoint, model=FLAGS.model, api_key=api_key,
                        timeout=FLAGS.timeout, max_retries=FLAGS.max_retries,
                        max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                        extra_body=extra_body)
  try:
    relative_to = None
    if FLAGS.image_paths == "relative_to_out":
      relative_to = os.path.dirname(os.path.abspath(FLAGS.out))
    items = list_images(FLAGS.images, FLAGS.image_root, relative_to=relative_to)
    summary = caption_images(
        items, FLAGS.out, config, prompts=load_prompts(FLAGS.prompts),
        concurrency=FLAGS.concurrency, seed=FLAGS.seed,
        retry_rejected=FLAGS.retry_rejected, short=FLAGS.short,
        filter_config=filter_config,
        max_side=FLAGS.max_side or None, fsync_every=FLAGS.fsync_every,
        retry_failed=FLAGS.retry_failed,
        max_consecutive_failures=FLAGS.max_consecutive_failures, progress=FLAGS.progress)
  except (EndpointUnreachableError, ApiError, ValueError, FileNotFoundError,
          RuntimeError) as e:
    logging.error("%s", e)
    sys.exit(f"caption: error: {e}")
  except KeyboardInterrupt:
    logging.warning("Interrupted; finished captions are saved, rerun the same command "
                    "to resume")
    sys.exit(130)
  logging.info("Done: %d captioned, %d skipped, %d rejected, %d failed, %d unreadable "
               "(details in %s); summary on stdout", summary["captioned"],
               summary["skipped"], summary["rejected_images"], summary["failed_images"],
               summary["unreadable"], summary["failures_file"])
  print(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
