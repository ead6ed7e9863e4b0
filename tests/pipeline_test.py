"""Tests for fixclip_jax.data.pipeline (the grain train iterator)."""
import gc
import io
import json
import os
import shutil
import tarfile
import tempfile

from absl import flags
from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax import config_base
from fixclip_jax import pixels
from fixclip_jax.data import captions
from fixclip_jax.data import pipeline
from fixclip_jax.data import sources
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms

_TOKENIZER = None


def _tokenizer():
  global _TOKENIZER
  if _TOKENIZER is None:
    _TOKENIZER = tokenizers.get_tokenizer("clip")
  return _TOKENIZER


def _config(**overrides):
  c = config_base.base_config().data
  c.type = "synthetic"
  c.image_size = 24
  c.global_batch = 4
  c.read_threads = 2
  c.prefetch_buffer = 8
  c.update(overrides)
  return c


def _source(num=20, seed=0):
  return sources.InMemorySource(
      synthetic.synthetic_examples(num, image_size=32, seed=seed))


def _take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def _assert_same_batches(test, a, b):
  test.assertEqual(len(a), len(b))
  for x, y in zip(a, b):
    test.assertEqual(set(x), set(y))
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


class TrainIteratorTest(absltest.TestCase):

  def test_batch_shapes_dtypes_and_content(self):
    src = _source()
    it = pipeline.make_train_iterator(_config(), _tokenizer(), source=src,
                                      process_index=0, process_count=1)
    batch = next(it)
    self.assertEqual(batch["image"].shape, (4, 24, 24, 3))
    self.assertEqual(batch["image"].dtype, np.uint8)  # normalised on the device
    self.assertEqual(batch["text_long"].shape, (4, 248))
    self.assertEqual(batch["text_long"].dtype, np.int32)
    self.assertEqual(batch["text_short"].shape, (4, 248))
    self.assertEqual(batch["text_short"].dtype, np.int32)
    self.assertEqual(batch["index"].dtype, np.int32)
    for row, index in enumerate(batch["index"]):
      ex = src[int(index)]
      np.testing.assert_array_equal(
          batch["text_long"][row], _tokenizer()([ex["caption"]], 248)[0])
      np.testing.assert_array_equal(
          batch["text_short"][row],
          _tokenizer()([captions.first_sentence(ex["caption"])], 248)[0])
      np.testing.assert_array_equal(
          pixels.normalize_uint8(batch["image"][row]),
          transforms.clip_eval_transform(Image.open(io.BytesIO(ex["image"])), 24))

  def test_short_caption_policy_and_context(self):
    records = [{"image": r["image"], "caption": r["caption"],
                "short_caption": f"provided short caption {i}"}
               for i, r in enumerate(synthetic.synthetic_examples(4, 16))]
    src = sources.InMemorySource(records)
    tok = _tokenizer()
    for policy, expect in (("provided", lambda i: f"provided short caption {i}"),
                           ("first_sentence", lambda i: captions.first_sentence(
                               records[i]["caption"]))):
      batch = next(pipeline.make_train_iterator(
          _config(short_caption=policy, short_context=77), tok, source=src,
          process_index=0, process_count=1))
      self.assertEqual(batch["text_short"].shape, (4, 77))
      for row, index in enumerate(batch["index"]):
        np.testing.assert_array_equal(batch["text_short"][row],
                                      tok([expect(int(index))], 77)[0])
    with self.assertRaisesRegex(ValueError, "short_caption"):
      pipeline.make_train_iterator(_config(short_caption="last"), tok,
                                   source=src, process_index=0, process_count=1)

  def test_hosts_are_disjoint_and_cover_the_epoch(self):
    src = _source(20)
    seen = []
    for host in range(2):
      it = pipeline.make_train_iterator(_config(num_epochs=1), _tokenizer(),
                                        source=src, process_index=host,
                                        process_count=2)
      batches = list(it)
      self.assertLen(batches, 5)  # 10 examples per host, batches of 4 // 2
      self.assertEqual(batches[0]["image"].shape[0], 2)
      seen.append(np.concatenate([b["index"] for b in batches]).tolist())
    self.assertEmpty(set(seen[0]) & set(seen[1]))
    self.assertEqual(sorted(seen[0] + seen[1]), list(range(20)))

  def test_epochs_reshuffle(self):
    src = _source(8)
    it = pipeline.make_train_iterator(_config(num_epochs=2), _tokenizer(),
                                      source=src, process_index=0,
                                      process_count=1)
    order = np.concatenate([b["index"] for b in it]).tolist()
    self.assertLen(order, 16)
    self.assertEqual(sorted(order[:8]), list(range(8)))
    self.assertEqual(sorted(order[8:]), list(range(8)))
    self.assertNotEqual(order[:8], order[8:])

  def test_deterministic_for_a_seed(self):
    src = _source()
    config = _config(transform="random_resized_crop", rrc_scale=(0.3, 1.0))
    make = lambda c: pipeline.make_train_iterator(
        c, _tokenizer(), source=src, process_index=0, process_count=1)
    a, b = _take(make(config), 3), _take(make(config), 3)
    _assert_same_batches(self, a, b)
    other = _take(make(_config(transform="random_resized_crop",
                               rrc_scale=(0.3, 1.0), shuffle_seed=1)), 3)
    self.assertNotEqual([x["index"].tolist() for x in a],
                        [x["index"].tolist() for x in other])

  def test_state_restore(self):
    src = _source()
    config = _config(transform="random_resized_crop", rrc_scale=(0.3, 1.0))
    it = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                      process_index=0, process_count=1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)  # crosses into the second epoch (5 batches/epoch)
    fresh = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                         process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_same_batches(self, _take(fresh, 4), expected)

  def test_state_restore_with_worker_process(self):
    _parse_flags()
    src = _source()
    config = _config(transform="random_resized_crop", rrc_scale=(0.3, 1.0))
    reference = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                             process_index=0, process_count=1)
    expected = _take(reference, 5)
    config.num_workers = 1
    it = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                      process_index=0, process_count=1)
    first = _take(it, 2)
    state = it.get_state()
    it.close()
    fresh = pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                         process_index=0, process_count=1)
    fresh.set_state(state)
    rest = _take(fresh, 3)
    fresh.close()
    gc.collect()
    # Worker processes change nothing: same batches as in-process loading.
    _assert_same_batches(self, first + rest, expected)

  def test_caption_filter_and_bad_images(self):
    records = [{"image": r["image"], "caption": r["caption"], "key": f"k{i}"}
               for i, r in enumerate(synthetic.synthetic_examples(8, 16))]
    records[1]["caption"] = "I'm sorry, I cannot describe this image for you."
    records[5]["caption"] = "Too short."
    records[6]["image"] = b"not an image at all"
    src = sources.InMemorySource(records)
    config = _config(num_epochs=1, global_batch=1, filter_captions=True)
    batches = list(pipeline.make_train_iterator(
        config, _tokenizer(), source=src, process_index=0, process_count=1))
    self.assertEqual(sorted(int(b["index"][0]) for b in batches),
                     [0, 2, 3, 4, 7])
    config.raise_on_bad_data = True
    with self.assertRaisesRegex(pipeline.BadExampleError, "'k[156]'"):
      list(pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                        process_index=0, process_count=1))

  def test_random_resized_crop_of_jpegs(self):
    records = [{"image": _jpeg(r["image"]), "caption": r["caption"]}
               for r in synthetic.synthetic_examples(4, 128)]
    src = sources.InMemorySource(records)
    config = _config(transform="random_resized_crop", rrc_scale=(0.9, 1.0),
                     image_size=48, num_epochs=1, rrc_jpeg_draft=False)
    exact = next(pipeline.make_train_iterator(
        config, _tokenizer(), source=src, process_index=0, process_count=1))
    for row, index in enumerate(exact["index"]):
      # Crops are seeded by (shuffle_seed, epoch, record id, 1).
      want = transforms.clip_train_transform(
          transforms.decode_image(records[index]["image"]), 48,
          np.random.default_rng([0, 0, int(index), 1]),
          kind="random_resized_crop", scale=(0.9, 1.0))
      np.testing.assert_array_equal(pixels.normalize_uint8(exact["image"][row]), want)
    config.rrc_jpeg_draft = True  # 1/2-scale decode: same crops, close pixels
    drafted = next(pipeline.make_train_iterator(
        config, _tokenizer(), source=src, process_index=0, process_count=1))
    np.testing.assert_array_equal(drafted["index"], exact["index"])
    diff = np.abs(pixels.normalize_uint8(drafted["image"]) -
                  pixels.normalize_uint8(exact["image"]))
    self.assertGreater(diff.max(), 0)
    self.assertLess(diff.mean(), 0.05)  # normalised units (~ 3 / 255 / std)

  def test_jsonl_source_from_config(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    manifest = synthetic.make_synthetic_dataset(os.path.join(root, "d"), 8, 16)
    batch = next(pipeline.make_train_iterator(
        _config(type="jsonl", path=manifest), _tokenizer(), process_index=0,
        process_count=1))
    self.assertEqual(batch["image"].shape, (4, 24, 24, 3))

  def test_config_errors(self):
    src = _source(8)
    with self.assertRaisesRegex(ValueError, "not divisible"):
      pipeline.make_train_iterator(_config(global_batch=6), _tokenizer(),
                                   source=src, process_index=0, process_count=4)
    with self.assertRaisesRegex(ValueError, "fewer than one batch"):
      pipeline.make_train_iterator(_config(global_batch=16), _tokenizer(),
                                   source=src, process_index=0, process_count=1)
    with self.assertRaisesRegex(ValueError, "transform"):
      pipeline.make_train_iterator(_config(transform="flip"), _tokenizer(),
                                   source=src, process_index=0, process_count=1)

  def test_default_config_names_every_knob(self):
    c = config_base.base_config().data
    for knob in ("type", "path", "image_root", "image_size", "global_batch",
                 "shuffle_seed", "num_workers", "transform", "rrc_scale",
                 "text_context", "short_caption", "filters",
                 "max_caption_chars", "raise_on_bad_data",
                 "max_consecutive_skips", "rrc_jpeg_draft", "tokenizer"):
      self.assertIn(knob, c)
    captions.CaptionFilterConfig.from_mapping(c.filters.to_dict())


def _jpeg(png: bytes) -> bytes:
  buf = io.BytesIO()
  Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG",
                                                  quality=90)
  return buf.getvalue()


# A JSONL dataset with bad data: line number -> what is wrong with it.
_BAD_LINES = {1: "unreadable_image", 3: "unreadable_image", 5: "missing_file",
              7: "empty_caption", 9: "caption_too_long", 11: "caption_filter"}
_NUM_LINES = 14
_MAX_CHARS = 1000  # data.max_caption_chars of these tests


def _write_bad_jsonl(root: str) -> str:
  """14 JPEG examples; those in _BAD_LINES broken as named there."""
  os.makedirs(os.path.join(root, "img"))
  rng = np.random.default_rng(0)
  lines = []
  for i, ex in enumerate(synthetic.synthetic_examples(_NUM_LINES, 32)):
    name = f"img/{i:02d}.jpg"
    data = _jpeg(ex["image"])
    caption = ex["caption"]
    if i == 1:  # truncated: the scan data stops halfway
      data = data[:len(data) // 2]
    elif i == 3:  # random bytes with a .jpg name
      data = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    elif i == 7:
      caption = ""
    elif i == 9:  # runaway MLLM output, > _MAX_CHARS characters
      caption = "A red circle next to a blue square. " * 40
    elif i == 11:
      caption = "I'm sorry, but I cannot describe the contents of this image."
    if i != 5:  # line 5 names a file that does not exist
      with open(os.path.join(root, name), "wb") as f:
        f.write(data)
    lines.append({"image": name, "caption": caption, "key": f"k{i}"})
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines))
  return path


def _write_bad_tar(root: str) -> str:
  """A webdataset shard: two good keys, two with non-UTF-8 captions."""
  path = os.path.join(root, "shard-000.tar")
  examples = synthetic.synthetic_examples(4, 32)
  members = [
      ("g0.jpg", _jpeg(examples[0]["image"])),
      ("g0.txt", examples[0]["caption"].encode()),
      ("b1.jpg", _jpeg(examples[1]["image"])),
      ("b1.txt", b"A caption in latin-1: caf\xe9 cr\xe8me \xff"),
      ("b2.jpg", _jpeg(examples[2]["image"])),
      ("b2.json", b'{"caption": "bad \xc3\x28 bytes in json"}'),
      ("g3.jpg", _jpeg(examples[3]["image"])),
      ("g3.json", json.dumps({"caption": examples[3]["caption"]}).encode()),
  ]
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _parse_flags():
  # grain spawns workers that read absl flags: parse them when pytest runs us.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class BadDataTest(absltest.TestCase):
  """Bad data is skipped, counted per reason and logged; never stops a run."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.manifest = _write_bad_jsonl(os.path.join(cls.root, "jsonl"))
    cls.shard = _write_bad_tar(cls.root)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def _jsonl_config(self, **overrides):
    settings = dict(type="jsonl", path=self.manifest, filter_captions=True,
                    max_caption_chars=_MAX_CHARS)
    settings.update(overrides)
    return _config(**settings)

  def _expected_skips(self):
    counts = dict.fromkeys(pipeline.SKIP_REASONS, 0)
    for reason in _BAD_LINES.values():
      counts[reason] += 1
    return counts

  def _one_epoch(self, config):
    """All batches of one epoch, plus skips still pending at its end."""
    it = pipeline.make_train_iterator(config, _tokenizer(), process_index=0,
                                      process_count=1)
    batches = [{k: np.array(v) for k, v in b.items()} for b in it]
    # Skips after the last kept example have no example to ride on.
    pending = np.asarray(it.get_state()["pending_skips"])
    return batches, pending

  def test_jsonl_yields_good_examples_and_counts_skips(self):
    pipeline.SKIP_LOG.reset()
    with self.assertLogs("absl", "WARNING") as logs:
      batches, pending = self._one_epoch(self._jsonl_config(
          num_epochs=1, global_batch=1))
    good = [i for i in range(_NUM_LINES) if i not in _BAD_LINES]
    self.assertEqual(sorted(int(b["index"][0]) for b in batches), good)
    for b in batches:
      self.assertEqual(b["skipped"].shape, (1, len(pipeline.SKIP_REASONS)))
      self.assertEqual(b["skipped"].dtype, np.int32)
    total = np.sum([b["skipped"][0] for b in batches], axis=0) + pending
    self.assertEqual(pipeline.skip_counts(total), self._expected_skips())
    # Each skip is logged with where it happened (all are within the first
    # SKIP_LOG_FIRST of their reason).
    text = "\n".join(logs.output)
    self.assertLen([l for l in logs.output if "Skipped example" in l],
                   len(_BAD_LINES))
    for i, reason in _BAD_LINES.items():
      self.assertRegex(text, f"{reason}.*img/{i:02d}.jpg.*manifest.jsonl:"
                       f"{i + 1}, key 'k{i}'")

  def test_counts_ride_on_the_next_kept_example(self):
    # Every batch's skips are those between it and the previous batch: with
    # batches of 2, kept rows + skips per batch add up to the stream length.
    batches, pending = self._one_epoch(self._jsonl_config(num_epochs=1,
                                                          global_batch=2))
    self.assertLen(batches, 4)
    consumed = sum(2 + int(b["skipped"].sum()) for b in batches)
    self.assertEqual(consumed + int(pending.sum()), _NUM_LINES)

  def test_same_with_a_worker_process(self):
    _parse_flags()
    config = self._jsonl_config(num_epochs=0, global_batch=2)
    expected = _take(pipeline.make_train_iterator(
        config, _tokenizer(), process_index=0, process_count=1), 9)
    self.assertGreater(sum(int(b["skipped"].sum()) for b in expected), 6)
    config.num_workers = 1
    it = pipeline.make_train_iterator(config, _tokenizer(), process_index=0,
                                      process_count=1)
    first = _take(it, 4)
    state = it.get_state()
    it.close()
    fresh = pipeline.make_train_iterator(config, _tokenizer(), process_index=0,
                                         process_count=1)
    fresh.set_state(state)
    rest = _take(fresh, 5)
    fresh.close()
    gc.collect()
    _assert_same_batches(self, first + rest, expected)

  def test_state_restore_with_skips(self):
    config = self._jsonl_config(num_epochs=0, global_batch=2,
                                transform="random_resized_crop")
    make = lambda: pipeline.make_train_iterator(
        config, _tokenizer(), process_index=0, process_count=1)
    for num_before in (1, 3, 5):  # states inside epoch 1, at, after the turn
      it = make()
      _take(it, num_before)
      state = it.get_state()
      expected = _take(it, 5)
      self.assertGreater(sum(int(b["skipped"].sum()) for b in expected), 0)
      fresh = make()
      fresh.set_state(state)
      _assert_same_batches(self, _take(fresh, 5), expected)

  def test_tar_shard_with_non_utf8_captions(self):
    batches, pending = self._one_epoch(_config(
        type="tar", path=self.shard, num_epochs=1, global_batch=1))
    src = sources.TarSource(self.shard)
    self.assertEqual(sorted(src.key(int(b["index"][0])) for b in batches),
                     ["g0", "g3"])
    total = np.sum([b["skipped"][0] for b in batches], axis=0) + pending
    expected = dict.fromkeys(pipeline.SKIP_REASONS, 0)
    expected["bad_caption_encoding"] = 2
    self.assertEqual(pipeline.skip_counts(total), expected)

  def test_raise_on_bad_data_names_the_file(self):
    config = self._jsonl_config(num_epochs=1, global_batch=1,
                                raise_on_bad_data=True, filter_captions=False)
    with self.assertRaisesRegex(pipeline.BadExampleError,
                                r"img/\d\d\.jpg.*manifest\.jsonl:\d+"):
      list(pipeline.make_train_iterator(config, _tokenizer(), process_index=0,
                                        process_count=1))

  def test_all_bad_raises_after_max_consecutive_skips(self):
    config = self._jsonl_config(num_epochs=0, global_batch=2,
                                image_root="/nonexistent/images",
                                max_consecutive_skips=20)
    it = pipeline.make_train_iterator(config, _tokenizer(), process_index=0,
                                      process_count=1)
    with self.assertRaisesRegex(ValueError, r"21 bad examples in a row.*"
                                r"/nonexistent/images/img/\d\d\.jpg"):
      next(it)


class SkipLogTest(absltest.TestCase):

  def test_first_n_then_every_kth_per_reason(self):
    log = pipeline.SkipLog(first=2, every=3)
    skip = lambda r: pipeline.SkippedExample(r, "some/file.jpg", "broken")
    with self.assertLogs("absl", "WARNING") as logs:
      logged = [log(skip("missing_file")) for _ in range(7)]
      other = log(skip("empty_caption"))
    # Counts 1, 2 (the first two), then 3 and 6 (every third).
    self.assertEqual(logged, [True, True, True, False, False, True, False])
    self.assertTrue(other)
    self.assertLen(logs.output, 5)
    self.assertIn("some/file.jpg", logs.output[0])


if __name__ == "__main__":
  absltest.main()
