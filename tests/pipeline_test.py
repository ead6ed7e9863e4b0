"""Tests for fixclip_jax.data.pipeline (grain train/eval iterators)."""
import gc
import io
import os
import shutil
import tempfile

from absl import flags
from absl.testing import absltest
import numpy as np
from PIL import Image

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
  c = pipeline.default_data_config()
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
    self.assertEqual(batch["image"].dtype, np.float32)
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
      np.testing.assert_allclose(batch["image"][row], transforms.clip_eval_transform(
          Image.open(io.BytesIO(ex["image"])), 24))

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
    # grain spawns workers that read absl flags: parse them when pytest runs us.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
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
    config = _config(num_epochs=1, global_batch=1, filter_captions=True,
                     skip_bad_images=True)
    kept = [int(b["index"][0]) for b in pipeline.make_train_iterator(
        config, _tokenizer(), source=src, process_index=0, process_count=1)]
    self.assertEqual(sorted(kept), [0, 2, 3, 4, 7])
    config.skip_bad_images = False
    with self.assertRaisesRegex(ValueError, "'k6'"):
      list(pipeline.make_train_iterator(config, _tokenizer(), source=src,
                                        process_index=0, process_count=1))

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
    c = pipeline.default_data_config()
    for knob in ("type", "path", "image_root", "image_size", "global_batch",
                 "shuffle_seed", "num_workers", "transform", "rrc_scale",
                 "text_context", "short_caption", "filters"):
      self.assertIn(knob, c)
    captions.CaptionFilterConfig.from_mapping(c.filters.to_dict())


class EvalIteratorTest(absltest.TestCase):

  def test_ordered_padded_and_split_over_hosts(self):
    src = _source(7)
    per_host = []
    for host in range(2):
      batches = list(pipeline.make_eval_iterator(
          _config(), _tokenizer(), source=src, process_index=host,
          process_count=2))
      self.assertLen(batches, pipeline.num_eval_batches(7, 4, 2))
      per_host.append(np.concatenate([b["index"] for b in batches]).tolist())
      last = batches[-1]
    self.assertEqual(per_host, [[0, 2, 4, 6], [1, 3, 5, -1]])
    self.assertEqual(np.abs(last["image"][-1]).max(), 0.0)
    self.assertEqual(np.abs(last["text_long"][-1]).max(), 0)
    np.testing.assert_allclose(last["image"][0], transforms.clip_eval_transform(
        Image.open(io.BytesIO(src[5]["image"])), 24))


if __name__ == "__main__":
  absltest.main()
