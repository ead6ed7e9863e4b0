"""Tests of the captioning client against a fake OpenAI-compatible server.

The server (http.server on 127.0.0.1, a free port) answers /v1/models and
/v1/chat/completions with canned captions chosen by the image (its pixel colour
encodes an index) and the prompt, and injects programmable faults: 500s, slow
answers past the client's timeout, 400s with a JSON error body, refusals,
repetitive captions. It counts every hit and the most requests in flight.
"""
import base64
import collections
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax import config_base
from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import tokenizers
from fixclip_jax.tools import caption as caption_lib

PROMPTS = caption_lib.DEFAULT_PROMPTS
MODEL = "fake-llava"
REFUSAL = "I'm sorry, but I can't help with describing this image."
BAD_REQUEST_MESSAGE = "Image is too large: 10000x10000 exceeds the 4096 pixel limit"


def canned_caption(index: int, prompt_id: int) -> str:
  return (f"A flat square picture with number {index} painted in a single even tone. "
          f"The surface shows no people, animals or written text, and the soft "
          f"lighting leaves no shadows anywhere across the frame, asked with template "
          f"{prompt_id}.")


def short_answer(index: int) -> str:
  return f"A plain coloured square, number {index}."


def repetitive_caption(index: int) -> str:
  return " ".join(["a red square on a table"] * 12) + f" {index}"


class FakeServer:
  """Programmable OpenAI-compatible chat server; see the module docstring."""

  def __init__(self, delay: float = 0.0):
    self.delay = delay  # seconds every chat request takes
    self.fail_first = 0  # the first K chat requests answer 500
    self.fail_status = 500
    self.fail_all = False  # every chat request answers fail_status
    self.slow_first = 0  # the first K chat requests sleep slow_seconds
    self.slow_seconds = 0.0
    self.bad_request = set()  # image indices answered with a 400
    self.refuse_once = set()  # image indices refused on their first request
    self.repetitive = set()  # image indices always answered repetitively
    self.required_key = None  # Authorization: Bearer <key> expected when set
    self.served_models = [MODEL]
    self.lock = threading.Lock()
    self.chat_hits = 0
    self.model_hits = 0
    self.in_flight = 0
    self.max_in_flight = 0
    self.hits_by_image = collections.Counter()
    self.prompts_by_image = collections.defaultdict(list)
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # keep the test output clean
        pass

      def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def do_GET(self):
        with fake.lock:
          fake.model_hits += 1
        if self.path != "/v1/models":
          return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if fake.required_key and self.headers.get(
            "Authorization") != f"Bearer {fake.required_key}":
          return self._reply(401, {"error": {"message": "invalid API key"}})
        self._reply(200, {"object": "list",
                          "data": [{"id": m, "object": "model"} for m in fake.served_models]})

      def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
          fake.chat_hits += 1
          hit = fake.chat_hits
          fake.in_flight += 1
          fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
          status, payload = fake.answer(hit, request)
        finally:
          with fake.lock:
            fake.in_flight -= 1
        try:
          self._reply(status, payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.httpd.handle_error = lambda request, address: None
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()
    self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def answer(self, hit, request):
    """(status, JSON payload) for one chat request."""
    if self.fail_all or hit <= self.fail_first:
      return self.fail_status, {"error": {"message": "internal error, try again"}}
    if hit <= self.slow_first:
      time.sleep(self.slow_seconds)
    if self.delay:
      time.sleep(self.delay)
    if request.get("model") != MODEL:
      return 404, {"error": {"message": f"model {request.get('model')} not found"}}
    content = request["messages"][0]["content"]
    prompt = next(p["text"] for p in content if p["type"] == "text")
    url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
    index = image_index(url)
    with self.lock:
      self.hits_by_image[index] += 1
      self.prompts_by_image[index].append(prompt)
      first_request = self.hits_by_image[index] == 1
    if index in self.bad_request:
      return 400, {"error": {"message": BAD_REQUEST_MESSAGE, "type": "BadRequestError",
                             "code": 400}}
    if prompt == caption_lib.SHORT_PROMPT:
      text = short_answer(index)
    elif index in self.repetitive:
      text = repetitive_caption(index)
    elif index in self.refuse_once and first_request:
      text = REFUSAL
    else:
      text = canned_caption(index, PROMPTS.index(prompt))
    return 200, {"id": f"chatcmpl-{hit}", "object": "chat.completion", "model": MODEL,
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}]}


def image_index(data_url: str) -> int:
  """The image index the test wrote into the red channel."""
  header, b64 = data_url.split(",", 1)
  assert header.startswith("data:image/") and header.endswith(";base64"), header
  img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
  return img.getpixel((0, 0))[0]


def write_images(root: str, n: int, start: int = 0):
  """n small PNGs whose red channel is their index; returns the ImageItems."""
  items = []
  for i in range(start, start + n):
    path = os.path.join(root, f"img_{i:02d}.png")
    Image.new("RGB", (8, 6), (i, 90, 200)).save(path)
    items.append(caption_lib.ImageItem(key=f"img_{i:02d}.png", path=path))
  return items


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def closed_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


class CaptionTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # tempfile rather than create_tempdir: the latter needs parsed absl flags,
    # which pytest does not provide.
    self.dir = tempfile.mkdtemp(prefix="caption_test_")
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    self.out = os.path.join(self.dir, "out", "captions.jsonl")

  def start_server(self, **kw) -> FakeServer:
    server = FakeServer(**kw)
    self.addCleanup(server.close)
    return server

  def config(self, server, **kw):
    defaults = dict(endpoint=server.endpoint if server else None, model=MODEL, timeout=2.0,
                    max_retries=4, backoff_base=0.01, backoff_max=0.05)
    defaults.update(kw)
    return caption_lib.ClientConfig(**defaults)

  def run_captioning(self, items, config, **kw):
    kw.setdefault("concurrency", 4)
    kw.setdefault("progress", False)
    return caption_lib.caption_images(items, self.out, config, **kw)

  def test_faults_retries_rejections_and_unreadable(self):
    server = self.start_server()
    server.fail_first = 3
    server.bad_request = {4}
    server.refuse_once = {5}
    server.repetitive = {6}
    items = write_images(self.dir, 10)
    broken = os.path.join(self.dir, "broken.jpg")
    with open(broken, "wb") as f:
      f.write(b"\xff\xd8 this is not a jpeg")
    items.append(caption_lib.ImageItem("broken.jpg", broken))
    items.append(caption_lib.ImageItem("missing.png", os.path.join(self.dir, "missing.png")))

    summary = self.run_captioning(items, self.config(server), retry_rejected=2)

    records = read_jsonl(self.out)
    keys = [r["image"] for r in records]
    good = [f"img_{i:02d}.png" for i in range(10) if i not in (4, 6)]
    self.assertCountEqual(keys, good)  # each good image exactly once
    for r in records:
      self.assertEqual(set(r), {"image", "caption", "short_caption", "prompt_id", "model"})
      self.assertEqual(r["model"], MODEL)
      self.assertEqual(r["short_caption"], captions_lib.first_sentence(r["caption"]))
      index = int(r["image"][4:6])
      order = caption_lib.prompt_order(0, r["image"], len(PROMPTS))
      # The refused image was asked again with its second-ranked prompt.
      self.assertEqual(r["prompt_id"], order[1] if index == 5 else order[0])
      self.assertEqual(r["caption"], canned_caption(index, r["prompt_id"]))
    self.assertNotEqual(server.prompts_by_image[5][0], server.prompts_by_image[5][1])

    # Server hits: one per plain good image (7), 1 for the 400 (not retried), 2 for the
    # refused one, 3 for the always-repetitive one, plus the 3 injected 500s (retried).
    self.assertEqual(server.chat_hits, 7 + 1 + 2 + 3 + 3)
    self.assertEqual(summary["retries"], 3)
    self.assertEqual(summary["captioned"], 8)
    self.assertEqual(summary["rejected"], {"refusal": 1, "repetitive": 3})
    self.assertEqual(summary["rejected_images"], 1)
    self.assertEqual(summary["unreadable"], 2)
    self.assertEqual(summary["failed"], {"api_error: HTTP 400": 1, "rejected: repetitive": 1,
                                         "unreadable: unreadable image": 2})
    self.assertEqual(sorted(server.hits_by_image), list(range(10)))  # unreadable: none

    failures = {r["image"]: r for r in read_jsonl(self.out + caption_lib.FAILURES_SUFFIX)}
    self.assertCountEqual(failures, ["img_04.png", "img_06.png", "broken.jpg", "missing.png"])
    self.assertEqual(failures["img_04.png"]["kind"], "api_error")
    self.assertEqual(failures["img_04.png"]["reason"], "HTTP 400")
    self.assertIn(BAD_REQUEST_MESSAGE, failures["img_04.png"]["detail"])  # body shown
    self.assertEqual(failures["img_06.png"]["kind"], "rejected")
    self.assertEqual(failures["img_06.png"]["reason"], "repetitive")
    self.assertEqual(failures["broken.jpg"]["kind"], "unreadable")
    self.assertIn(broken, failures["broken.jpg"]["detail"])
    self.assertIn(broken, summary["unreadable_examples"])

    # A rerun requests nothing: done images are skipped, permanent failures too.
    hits = server.chat_hits
    summary = self.run_captioning(items, self.config(server), retry_rejected=2)
    self.assertEqual(server.chat_hits, hits)
    self.assertEqual((summary["skipped"], summary["skipped_failed_before"]), (8, 4))
    self.assertLen(read_jsonl(self.out), 8)

  def test_rejections_counted_without_retry(self):
    server = self.start_server()
    server.refuse_once = {1}
    server.repetitive = {2}
    items = write_images(self.dir, 4)
    summary = self.run_captioning(items, self.config(server), retry_rejected=0)
    self.assertEqual(summary["rejected"], {"refusal": 1, "repetitive": 1})
    self.assertEqual(summary["rejected_images"], 2)
    self.assertEqual(server.chat_hits, 4)
    self.assertCountEqual([r["image"] for r in read_jsonl(self.out)],
                          ["img_00.png", "img_03.png"])

  def test_timeouts_are_retried(self):
    server = self.start_server()
    server.slow_first, server.slow_seconds = 2, 1.5
    items = write_images(self.dir, 3)
    summary = self.run_captioning(items, self.config(server, timeout=0.6), concurrency=2)
    self.assertEqual(summary["captioned"], 3)
    self.assertEqual(summary["retries"], 2)
    self.assertEqual(server.chat_hits, 5)
    self.assertEqual(summary["failed"], {})

  def test_retries_exhausted_are_failures_retried_on_rerun(self):
    server = self.start_server()
    server.fail_all, server.fail_status = True, 503
    items = write_images(self.dir, 2)
    summary = self.run_captioning(items, self.config(server, max_retries=2))
    self.assertEqual(server.chat_hits, 2 * 3)  # first attempt + 2 retries each
    self.assertEqual(summary["failed"], {"failed: HTTP 503": 2})
    self.assertEqual(summary["failed_images"], 2)
    failure = read_jsonl(self.out + caption_lib.FAILURES_SUFFIX)[0]
    self.assertIn("internal error, try again", failure["detail"])
    self.assertEqual(read_jsonl(self.out), [])
    # Transient failures are tried again by the next run.
    server.fail_all = False
    summary = self.run_captioning(items, self.config(server, max_retries=2))
    self.assertEqual(summary["captioned"], 2)
    self.assertLen(read_jsonl(self.out), 2)

  def test_stops_after_consecutive_server_failures(self):
    server = self.start_server()
    server.fail_all = True
    items = write_images(self.dir, 8)
    with self.assertRaisesRegex(RuntimeError, "3 images in a row failed"):
      self.run_captioning(items, self.config(server, max_retries=0), concurrency=1,
                          max_consecutive_failures=3)
    self.assertLessEqual(server.chat_hits, 4)

  def test_resume_after_kill(self):
    server = self.start_server()
    items = write_images(self.dir, 8)
    os.makedirs(os.path.dirname(self.out))
    complete = [{"image": f"img_{i:02d}.png", "caption": canned_caption(i, 0),
                 "short_caption": "x", "prompt_id": 0, "model": MODEL} for i in range(4)]
    with open(self.out, "w", encoding="utf-8") as f:
      for record in complete:
        f.write(json.dumps(record) + "\n")
      f.write('{"image": "img_04.png", "caption": "A flat sq')  # killed mid-write

    with self.assertLogs(level="WARNING") as logs:
      summary = self.run_captioning(items, self.config(server))
    self.assertTrue(any("partial last line" in m for m in logs.output), logs.output)

    self.assertEqual(sorted(server.hits_by_image), [4, 5, 6, 7])  # only the missing ones
    self.assertEqual(server.chat_hits, 4)
    self.assertEqual((summary["skipped"], summary["captioned"]), (4, 4))
    records = read_jsonl(self.out)  # every line parses: the partial one is gone
    self.assertEqual(records[:4], complete)
    self.assertEqual(sorted(r["image"] for r in records),
                     [f"img_{i:02d}.png" for i in range(8)])

    summary = self.run_captioning(items, self.config(server))
    self.assertEqual((summary["skipped"], summary["captioned"]), (8, 0))
    self.assertEqual(server.chat_hits, 4)
    self.assertLen(read_jsonl(self.out), 8)

  def test_resume_after_real_kill(self):
    server = self.start_server(delay=0.1)
    write_images(self.dir, 30)
    command = [sys.executable, "-m", "fixclip_jax.tools.caption", f"--images={self.dir}",
               f"--out={self.out}", f"--endpoint={server.endpoint}", f"--model={MODEL}",
               "--concurrency=4", "--fsync_every=1", "--noprogress"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def complete_lines():
      if not os.path.exists(self.out):
        return 0
      with open(self.out, "rb") as f:
        return f.read().count(b"\n")
    deadline = time.time() + 30
    while time.time() < deadline and complete_lines() < 5:
      time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    written = complete_lines()  # (a partial last line, if any, is repaired by the rerun)
    self.assertBetween(written, 5, 29)
    # Requests the dead client had already sent may still be reaching the server.
    time.sleep(0.3)
    hits = server.chat_hits
    subprocess.run(command, cwd=repo, check=True, capture_output=True, timeout=60)
    keys = [r["image"] for r in read_jsonl(self.out)]
    self.assertLen(keys, 30)
    self.assertLen(set(keys), 30)
    # The rerun asked only for what the killed run had not written.
    self.assertEqual(server.chat_hits - hits, 30 - written)

  def test_endpoint_down_fails_fast(self):
    items = write_images(self.dir, 3)
    endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    config = caption_lib.ClientConfig(endpoint=endpoint, model=MODEL, max_retries=5,
                                      backoff_base=1.0)
    for preflight in (True, False):
      start = time.time()
      with self.assertRaisesRegex(caption_lib.EndpointUnreachableError, endpoint):
        self.run_captioning(items, config, preflight=preflight)
      self.assertLess(time.time() - start, 2.0)  # no backoff spent on a dead server
    self.assertFalse(os.path.exists(self.out) and read_jsonl(self.out))

  def test_cli_endpoint_down_exits_nonzero(self):
    write_images(self.dir, 2)
    endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.caption", f"--images={self.dir}",
         f"--out={self.out}", f"--endpoint={endpoint}", f"--model={MODEL}",
         "--noprogress"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(endpoint, proc.stderr)
    self.assertIn("cannot connect", proc.stderr)

  def test_cli_end_to_end(self):
    server = self.start_server()
    write_images(os.path.join(self.dir), 2)
    sub = os.path.join(self.dir, "sub")
    os.makedirs(sub)
    write_images(sub, 1, start=2)
    with open(os.path.join(self.dir, "notes.txt"), "w") as f:
      f.write("not an image")
    os.environ["FAKE_KEY_FOR_TEST"] = "secret"
    self.addCleanup(os.environ.pop, "FAKE_KEY_FOR_TEST")
    server.required_key = "secret"
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.caption", f"--images={self.dir}",
         f"--out={self.out}", f"--endpoint={server.endpoint}", f"--model={MODEL}",
         "--api_key_env=FAKE_KEY_FOR_TEST", "--short=model", "--noprogress"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(proc.returncode, 0, proc.stderr)
    records = {r["image"]: r for r in read_jsonl(self.out)}
    # Paths relative to the output's folder, where a JSONL source looks by default.
    self.assertCountEqual(records, ["../img_00.png", "../img_01.png", "../sub/img_02.png"])
    for key in records:
      self.assertTrue(os.path.isfile(os.path.join(os.path.dirname(self.out), key)))
    self.assertEqual(records["../sub/img_02.png"]["short_caption"], short_answer(2))
    self.assertEqual(server.chat_hits, 6)  # a caption and a short request per image
    self.assertEqual(json.loads(proc.stdout)["captioned"], 3)

    # The manifest feeds the training pipeline unchanged.
    data = config_base.base_config().data
    data.type, data.path = "jsonl", self.out
    data.image_size, data.global_batch, data.read_threads = 16, 3, 1
    tok = tokenizers.ClipTokenizer(context_length=data.text_context)
    batch = next(pipeline.make_train_iterator(data, tok, process_index=0,
                                              process_count=1))
    self.assertEqual(batch["image"].shape, (3, 16, 16, 3))
    lines = read_jsonl(self.out)
    for row, index in enumerate(batch["index"]):
      np.testing.assert_array_equal(batch["text_long"][row],
                                    tok([lines[index]["caption"]])[0])
      np.testing.assert_array_equal(batch["text_short"][row],
                                    tok([lines[index]["short_caption"]])[0])

  def test_a_second_run_on_the_same_output_is_refused(self):
    # 1 s a caption, one at a time: the first run holds the output long enough.
    server = self.start_server(delay=1.0)
    items = write_images(self.dir, 8)
    first = threading.Thread(target=self.run_captioning,
                             args=(items, self.config(server)),
                             kwargs={"concurrency": 1})
    first.start()
    deadline = time.time() + 30
    while server.chat_hits == 0 and time.time() < deadline:
      time.sleep(0.02)  # the first run holds the lock by now
    with self.assertRaisesRegex(caption_lib.OutputLockedError,
                                "is being written by another caption run"):
      self.run_captioning(items, self.config(server))
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.caption", f"--images={self.dir}",
         f"--out={self.out}", f"--endpoint={server.endpoint}", f"--model={MODEL}",
         "--noprogress"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(f"{self.out} is being written by another caption run",
                  proc.stderr)
    self.assertTrue(first.is_alive(), "the first run ended too early to test")
    server.delay = 0.0
    first.join(timeout=60)
    self.assertLen(read_jsonl(self.out), 8)  # not touched by the others
    # The lock goes with the run: the next one starts (nothing left to do).
    self.assertEqual(self.run_captioning(items, self.config(server))["skipped"], 8)

  def test_bad_api_key_and_unknown_model_fail_before_captioning(self):
    server = self.start_server()
    server.required_key = "right"
    items = write_images(self.dir, 2)
    with self.assertRaisesRegex(caption_lib.ApiError, "invalid API key"):
      self.run_captioning(items, self.config(server, api_key="wrong"))
    with self.assertRaisesRegex(ValueError, "'other-model' is not served.*fake-llava"):
      self.run_captioning(items, self.config(server, api_key="right", model="other-model"))
    self.assertEqual(server.chat_hits, 0)

  def test_concurrency_is_bounded(self):
    server = self.start_server(delay=0.1)
    items = write_images(self.dir, 12)
    summary = self.run_captioning(items, self.config(server), concurrency=3)
    self.assertEqual(summary["captioned"], 12)
    self.assertLessEqual(server.max_in_flight, 3)
    self.assertGreaterEqual(server.max_in_flight, 2)  # and it is concurrent at all

  def test_short_caption_model_request(self):
    server = self.start_server()
    items = write_images(self.dir, 3)
    summary = self.run_captioning(items, self.config(server), short="model")
    self.assertEqual(summary["captioned"], 3)
    for r in read_jsonl(self.out):
      self.assertEqual(r["short_caption"], short_answer(int(r["image"][4:6])))
    self.assertEqual(server.chat_hits, 6)

  def test_prompt_choice_is_deterministic_and_spread(self):
    order = caption_lib.prompt_order(0, "a/b.jpg", 20)
    self.assertEqual(sorted(order), list(range(20)))
    self.assertEqual(order, caption_lib.prompt_order(0, "a/b.jpg", 20))
    self.assertNotEqual(order, caption_lib.prompt_order(1, "a/b.jpg", 20))
    firsts = collections.Counter(caption_lib.prompt_order(0, f"img{i}.jpg", 20)[0]
                                 for i in range(400))
    self.assertLen(firsts, 20)
    self.assertLess(max(firsts.values()), 45)  # ~20 each when uniform
    self.assertLen(set(caption_lib.DEFAULT_PROMPTS), 20)

  def test_load_prompts(self):
    path = os.path.join(self.dir, "prompts.txt")
    with open(path, "w") as f:
      f.write("# my prompts\nDescribe it.\n\n  Describe it in detail.  \n")
    self.assertEqual(caption_lib.load_prompts(path), ("Describe it.", "Describe it in detail."))
    self.assertEqual(caption_lib.load_prompts(None), caption_lib.DEFAULT_PROMPTS)
    with open(path, "w") as f:
      f.write("# nothing\n")
    with self.assertRaisesRegex(ValueError, "prompts.txt holds no prompts"):
      caption_lib.load_prompts(path)

  def test_encode_image(self):
    png = os.path.join(self.dir, "a.png")
    Image.new("RGB", (64, 32), (10, 20, 30)).save(png)
    with open(png, "rb") as f:
      original = f.read()
    url = caption_lib.encode_image(png, max_side=64)  # fits: the file's own bytes
    self.assertEqual(url, "data:image/png;base64," + base64.b64encode(original).decode())
    url = caption_lib.encode_image(png, max_side=16)  # too large: a smaller JPEG
    self.assertTrue(url.startswith("data:image/jpeg;base64,"))
    small = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    self.assertEqual(small.size, (16, 8))
    gif = os.path.join(self.dir, "a.gif")  # a format servers may not take: JPEG
    Image.new("P", (4, 4)).save(gif)
    self.assertTrue(caption_lib.encode_image(gif).startswith("data:image/jpeg;base64,"))
    truncated = os.path.join(self.dir, "t.png")
    with open(truncated, "wb") as f:
      f.write(original[:len(original) // 2])
    with self.assertRaises(caption_lib.UnreadableImageError):
      caption_lib.encode_image(truncated)

  def test_list_images(self):
    os.makedirs(os.path.join(self.dir, "a", "b"))
    for name in ("x.JPG", "a/y.png", "a/b/z.webp", "a/b/w.jpeg", "a/readme.txt"):
      with open(os.path.join(self.dir, name), "wb") as f:
        f.write(b"")
    keys = [it.key for it in caption_lib.list_images(self.dir)]
    self.assertEqual(keys, ["x.JPG", "a/y.png", "a/b/w.jpeg", "a/b/z.webp"])

    manifest = os.path.join(self.dir, "m.jsonl")
    with open(manifest, "w") as f:
      f.write(json.dumps({"image": "a/y.png", "caption": "old"}) + "\n\n")
      f.write(json.dumps({"image": "/abs/q.jpg"}) + "\n")
    items = caption_lib.list_images(manifest, image_root="/root")
    self.assertEqual(items, [caption_lib.ImageItem("a/y.png", "/root/a/y.png"),
                             caption_lib.ImageItem("/abs/q.jpg", "/abs/q.jpg")])
    self.assertEqual(caption_lib.list_images(manifest)[0].path,
                     os.path.join(self.dir, "a/y.png"))
    relative = caption_lib.list_images(manifest, relative_to=os.path.join(self.dir, "a"))
    self.assertEqual(relative[0].key, "y.png")
    with open(manifest, "a") as f:
      f.write(json.dumps({"path": "c.jpg"}) + "\n")
    with self.assertRaisesRegex(ValueError, r"m\.jsonl:4: missing string field 'image'"):
      caption_lib.list_images(manifest)
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      caption_lib.list_images(os.path.join(self.dir, "nowhere"))


if __name__ == "__main__":
  absltest.main()
