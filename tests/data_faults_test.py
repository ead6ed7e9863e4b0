"""Data faults of issue 23 (item 6), each on tiny inputs, each a few seconds:

  BOM manifest       a UTF-8 byte-order mark loses no record (utf-8-sig)
  thin image         a 20000x1 PNG (~100 bytes) is skipped from its header
                     (side / aspect ratio bound), never decoded or resized
  16-bit images      grayscale I;16 and 16-bit RGB PNGs become the 8-bit
                     values libpng's strip_16 gives (v >> 8), not white
  stalled reads      FIFOs that never get a writer: read threads stay within
                     sources.READ_POOL_SIZE, and an all-stalled stream stops
                     after STALLED_READS_TO_STOP timeouts in a row with one
                     error (main: one line, exit 2)
The 16-bit PNGs are written here byte by byte from the PNG specification
(signature, IHDR, zlib IDAT, IEND), not by PIL, whose reading is under test.
"""
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax.data import pipeline
from fixclip_jax.data import sources
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from tests import sources_test

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOKENIZER = []


def _tokenizer():
  if not _TOKENIZER:
    _TOKENIZER.append(tokenizers.get_tokenizer("clip"))
  return _TOKENIZER[0]


# Temp folders and data configs as the source tests make them.
_tempdir = sources_test._tempdir
_data_config = sources_test._data_config


def _png16(pixels: np.ndarray) -> bytes:
  """A 16-bit PNG (colour type 0 gray [H, W] or 2 RGB [H, W, 3]), written
  from the PNG specification: big-endian samples, filter 0 per row."""
  height, width = pixels.shape[:2]
  colour_type = 2 if pixels.ndim == 3 else 0
  rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes()
                  for y in range(height))

  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  return (b"\x89PNG\r\n\x1a\n"
          + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16,
                                       colour_type, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png(size, mode="RGB") -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size).save(buf, format="PNG")
  return buf.getvalue()


def _release_fifos(paths):
  for path in paths:
    try:  # a writer comes and leaves: a reader blocked in open() goes on
      os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
      pass


def _blocked_reads(source):
  """The pool's reads of `source` still blocked."""
  return [key for key in list(sources._read_pool.blocked)  # pylint: disable=protected-access
          if key[0] == source._read_group]  # pylint: disable=protected-access


def _release_all(source, fifos, timeout_s=20.0):
  """Ends every read of `source`: waiters give up (abandon_reads), so no
  queued read starts; the blocked ones get a writer, until none is left.
  (A read blocked on a FIFO that is then deleted would hold a pool thread
  for the rest of the process, and the tests after this one share the
  pool.)"""
  sources.abandon_reads()
  time.sleep(0.2)  # waiters poll every 50 ms
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    _release_fifos(fifos)
    if not _blocked_reads(source):
      return
    time.sleep(0.05)


class BomManifestTest(absltest.TestCase):

  def test_a_byte_order_mark_loses_no_record(self):
    root = _tempdir(self)
    for name in ("a.png", "b.png"):
      with open(os.path.join(root, name), "wb") as f:
        f.write(_png((8, 8)))
    path = os.path.join(root, "manifest.jsonl")
    lines = [json.dumps({"image": "a.png", "caption": "first"}),
             json.dumps({"image": "b.png", "caption": "second"})]
    with open(path, "w", encoding="utf-8-sig") as f:  # what Notepad writes
      f.write("\n".join(lines) + "\n")
    with open(path, "rb") as f:
      self.assertEqual(f.read(3), b"\xef\xbb\xbf")
    src = sources.JsonlSource(path)
    self.assertEqual(len(src), 2)
    self.assertEqual([src[i]["caption"] for i in range(2)],
                     ["first", "second"])
    # A mark anywhere else is still a bad line, named.
    with open(path, "w", encoding="utf-8") as f:
      f.write(lines[0] + "\n\ufeff" + lines[1] + "\n")
    with self.assertRaisesRegex(sources.BadRecordError, r"manifest\.jsonl:2"):
      sources.JsonlSource(path)[1]  # pylint: disable=expression-not-assigned


class ThinImageTest(absltest.TestCase):

  def test_a_20000x1_png_is_rejected_from_its_header(self):
    data = _png((20000, 1), "L")
    self.assertLess(len(data), 200)
    # The defaults (224 px, 40M pixels): aspect ratio bound 40e6 / 224^2.
    start = time.monotonic()
    with self.assertRaisesRegex(pipeline.ImageTooLargeError,
                                r"20000x1: aspect ratio 20000\.0 > data\."
                                r"max_image_pixels / data\.image_size\^2 = "
                                r"797\.2"):
      pipeline.decode_oversized(data, 40_000_000, 224)
    self.assertLess(time.monotonic() - start, 1.0)
    # Each side: 200000x150 holds 30M pixels, under the cap, but a side over
    # 40e6 / 224 (its crop would hold 298667x224 = 67M pixels).
    with self.assertRaisesRegex(pipeline.ImageTooLargeError,
                                r"a side of 200000 pixels > data\.max_image_"
                                r"pixels / data\.image_size = 40000000 / 224 "
                                r"= 178571"):
      pipeline.check_shape(200_000, 150, 40_000_000, 224)
    pipeline.check_shape(4000, 6, 40_000_000, 224)  # ratio 667: kept
    pipeline.check_shape(20000, 1, 0, 224)  # no cap: no bound

  def test_the_pipeline_skips_it_undecoded_under_both_transforms(self):
    # Header says 20000x1, the pixel data is garbage: only a header-time
    # decision can call it too large (a decode would say unreadable).
    good = _png((20000, 1), "L")
    idat = good.index(b"IDAT") + 4
    header_only = good[:idat] + b"\xff" * 8 + good[idat + 8:]
    with self.assertRaises(Exception):
      transforms.decode_image(header_only)
    for transform in ("resize_center_crop", "random_resized_crop"):
      config = _data_config(image_size=32, max_image_pixels=50_000,
                            transform=transform, text_context=77,
                            short_context=77)
      processor = pipeline._ExampleProcessor(config, _tokenizer())  # pylint: disable=protected-access
      for data in (_png((20000, 1), "L"), header_only):
        example = {"image": data, "caption": "a thin line", "key": "k"}
        out = processor(example, 0, 0, "thin.png")
        self.assertIsInstance(out, pipeline.SkippedExample, transform)
        self.assertEqual(out.reason, "image_too_large", out)
        self.assertIn("20000x1", out.detail)
      # A thin image within the bound is kept and cropped as usual.
      out = processor({"image": _png((600, 20), "L"), "caption": "a line",
                       "key": "k"}, 0, 0, "line.png")
      self.assertEqual(out["image"].shape, (32, 32, 3))


class SixteenBitTest(absltest.TestCase):

  def test_16_bit_gray_and_rgb_become_their_high_bytes(self):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (32, 32)).astype(np.uint16)
    gray[0, :4] = (0, 255, 256, 65535)
    rgb = rng.integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    expected_gray = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, -1)
    for pixels, expected in ((gray, expected_gray),
                             (rgb, (rgb >> 8).astype(np.uint8))):
      data = _png16(pixels)
      np.testing.assert_array_equal(
          np.asarray(transforms.decode_image(data)), expected)
      # The train pipeline's crop at the native size is the image itself.
      config = _data_config(image_size=32, text_context=77, short_context=77)
      processor = pipeline._ExampleProcessor(config, _tokenizer())  # pylint: disable=protected-access
      out = processor({"image": data, "caption": "noise", "key": "k"}, 0, 0,
                      "x.png")
      np.testing.assert_array_equal(out["image"], expected)
    # A smooth 16-bit ramp is a ramp, not 99.6% white.
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    img = np.asarray(transforms.decode_image(_png16(ramp)))
    self.assertLess((img == 255).mean(), 0.01)
    self.assertAlmostEqual(img.mean(), (ramp >> 8).mean(), delta=0.5)
    # 16-bit gray through the oversized path (JPEG 2000 keeps 16 bits).
    self.assertEqual(transforms.to_rgb(Image.fromarray(gray)).mode, "RGB")


class StalledReadsTest(absltest.TestCase):

  def _fifo_manifest(self, n):
    root = _tempdir(self)
    fifos = []
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
      for i in range(n):
        fifos.append(os.path.join(root, f"f{i}.png"))
        os.mkfifo(fifos[-1])  # open() waits for a writer that never comes
        f.write(json.dumps({"image": f"f{i}.png", "caption": f"c {i}"}) + "\n")
    self.addCleanup(_release_fifos, fifos)
    return os.path.join(root, "manifest.jsonl"), fifos

  def _source(self, manifest, fifos, read_timeout_s):
    src = sources.make_source(_data_config(type="jsonl", path=manifest,
                                           read_timeout_s=read_timeout_s))
    self.addCleanup(_release_all, src, fifos)  # before the folder goes
    return src

  def test_threads_stay_bounded_and_an_all_stalled_source_stops(self):
    n = sources.READ_POOL_SIZE + 24
    manifest, fifos = self._fifo_manifest(n)
    src = self._source(manifest, fifos, 0.1)
    threads_before = threading.active_count()
    errors = []
    start = time.monotonic()
    for epoch in range(3):  # every record again: no new thread per read
      for i in range(n):
        try:
          src.get(i, epoch)
        except (sources.ReadTimeoutError, sources.ReadsStalledError) as e:
          errors.append(e)
    took = time.monotonic() - start
    self.assertEqual(len(errors), 3 * n)
    stalled = [e for e in errors if isinstance(e, sources.ReadsStalledError)]
    first = next(i for i, e in enumerate(errors)
                 if isinstance(e, sources.ReadsStalledError))
    self.assertEqual(first, sources.STALLED_READS_TO_STOP - 1)
    self.assertRegex(str(stalled[0]), r"16 reads in a row did not finish "
                     r"within data\.read_timeout_s=0\.1s .*f15\.png")
    # Not one thread per read: at most the pool (FIFO opens never return).
    self.assertLessEqual(threading.active_count() - threads_before,
                         sources.READ_POOL_SIZE)
    self.assertLessEqual(sources.read_pool_threads(), sources.READ_POOL_SIZE)
    # Records whose read is still blocked fail at once (no second thread).
    at_once = [e for e in errors if "still blocked" in str(e)]
    self.assertNotEmpty(at_once)
    self.assertBetween(len(sources._read_pool.blocked), 1,  # pylint: disable=protected-access
                       sources.READ_POOL_SIZE)
    print(f"[data fault] {n} FIFOs x 3 epochs: {len(errors)} errors in "
          f"{took:.1f} s, {len(at_once)} at once, {len(stalled)} stalled; "
          f"{sources.read_pool_threads()} read threads")
    # A stalled read that comes back frees its thread, and the count of
    # timeouts in a row starts over at the next read that finishes.
    _release_fifos(fifos)
    deadline = time.monotonic() + 10
    while _blocked_reads(src) and time.monotonic() < deadline:
      time.sleep(0.05)
    self.assertEmpty(_blocked_reads(src))
    os.remove(fifos[0])
    with open(fifos[0], "wb") as f:
      f.write(_png((8, 8)))
    src.read_timeout_s = 10  # a loaded machine may take a while to read
    self.assertEqual(src.get(0)["caption"], "c 0")
    src.read_timeout_s = 0.1
    with self.assertRaisesRegex(sources.ReadTimeoutError, "did not finish"):
      src.get(1)  # a timeout again, not yet a stalled storage

  def test_the_train_stream_stops_within_a_few_timeouts(self):
    manifest, fifos = self._fifo_manifest(64)
    config = _data_config(type="jsonl", path=manifest, read_timeout_s=0.25,
                          image_size=32, global_batch=4, read_threads=4,
                          prefetch_buffer=8, text_context=77,
                          short_context=77)
    src = self._source(manifest, fifos, 0.25)
    it = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                      process_index=0, process_count=1)
    self.addCleanup(it.close)  # (cleanups run last first: then the reads)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(self._next(it)),
                              daemon=True)
    start = time.monotonic()
    reader.start()
    # 16 timeouts in a row over 4 reader threads: ~4 timeouts of 0.25 s
    # (before: 1000 skips x 0.25 s / 4 threads, a minute; 60 s timeouts:
    # hours).
    reader.join(20)
    took = time.monotonic() - start
    self.assertTrue(outcome, f"no outcome after {took:.0f} s")
    self.assertIsInstance(outcome[0], sources.ReadsStalledError, outcome)
    self.assertLess(took, 10)
    self.assertIn("The storage looks stalled", str(outcome[0]))
    self.assertLessEqual(sources.read_pool_threads(), sources.READ_POOL_SIZE)

  @staticmethod
  def _next(it):
    try:
      return next(it)
    except Exception as e:  # pylint: disable=broad-except
      return e

  def test_main_says_one_line_and_exits_2(self):
    manifest, _ = self._fifo_manifest(40)
    workdir = os.path.join(_tempdir(self), "run")
    env = dict(os.environ)
    env.pop("FIXCLIP_DEBUG", None)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.main", "--config=demo",
         f"--workdir={workdir}", "--mode=train", "--config.objective=clip",
         "--config.model.num_prompts=0", "--config.model.mask_token=False",
         "--config.model.gta_groups=0", "--config.model.context_length=77",
         "--config.data.text_context=77", "--config.data.short_context=77",
         "--config.data.long_buckets=()", "--config.data.short_buckets=()",
         "--config.optim.frozen_regex=", "--config.optim.new_params_regex=",
         "--config.pretrain77.steps=0", "--config.data.global_batch=8",
         "--config.data.type=jsonl", f"--config.data.path={manifest}",
         "--config.data.read_timeout_s=0.5", "--config.num_train_steps=4"],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertNotIn("Traceback", proc.stderr)
    # The skipped reads are logged (rate-limited) as any skip; the end is
    # one error line.
    errors = [l for l in proc.stderr.splitlines() if " error: " in l]
    self.assertLen(errors, 1, proc.stderr[-3000:])
    self.assertEqual(errors[0], proc.stderr.strip().splitlines()[-1])
    self.assertRegex(errors[0], r"16 reads in a row did not finish within "
                     r"data\.read_timeout_s=0\.5s .*storage looks stalled")
    print(f"[data fault] all-FIFO manifest: exit 2 after {took:.0f} s "
          f"(startup included): {errors[0][:160]}")


if __name__ == "__main__":
  absltest.main()
