"""Evaluation loaders on tiny copies of each benchmark's distributed layout."""
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax import config_base
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import imagenet_classes
from fixclip_jax.evaluation import run


def _write_image(path, color=(200, 30, 30), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (12, 9), color).save(path, format=fmt)


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _tempdir(test):
  """A fresh temp dir removed after the test (works under pytest and absltest)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _check_pairing(test, ds):
  """text_to_image and image_to_texts are inverse and cover everything."""
  test.assertLen(ds.text_to_image, len(ds.texts))
  test.assertLen(ds.image_to_texts, len(ds.image_paths))
  seen = []
  for image_index, text_ids in enumerate(ds.image_to_texts):
    for t in text_ids:
      test.assertEqual(ds.text_to_image[t], image_index)
    seen.extend(text_ids)
  test.assertEqual(sorted(seen), list(range(len(ds.texts))))
  for p in ds.image_paths:
    test.assertTrue(os.path.isfile(p), p)


class RetrievalLoadersTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)

  def test_urban1k_first_line_same_stem(self):
    base = os.path.join(self.root, "Urban1k")
    for stem in ("10", "2", "1"):
      _write_image(os.path.join(base, "image", f"{stem}.jpg"), fmt="JPEG")
      _write(os.path.join(base, "caption", f"{stem}.txt"),
             f"Long caption of {stem}. More.\nsecond line ignored\n")
    for root in (self.root, base):  # the parent or the folder itself
      ds = datasets.load_dataset("urban1k", root)
      self.assertEqual(ds.protocol, "urban1k")
      self.assertLen(ds.image_paths, 3)
      _check_pairing(self, ds)
      for path, text in zip(ds.image_paths, ds.texts):
        stem = os.path.basename(path)[:-4]
        self.assertEqual(text, f"Long caption of {stem}. More.")

  def test_urban1k_missing_image_names_the_file(self):
    base = os.path.join(self.root, "Urban1k")
    _write(os.path.join(base, "caption", "7.txt"), "caption\n")
    os.makedirs(os.path.join(base, "image"))
    with self.assertRaisesRegex(FileNotFoundError, r"image[/\\]7\.jpg"):
      datasets.load_urban1k(base)

  def test_wrong_root_names_the_expected_path(self):
    with self.assertRaisesRegex(FileNotFoundError, "Urban1k.*caption"):
      datasets.load_urban1k(self.root)
    with self.assertRaisesRegex(FileNotFoundError, "dataset_coco.json"):
      datasets.load_dataset("coco_karpathy", self.root)
    with self.assertRaisesRegex(FileNotFoundError, "results_20130124.token"):
      datasets.load_dataset("flickr30k-full", self.root)

  def test_sharegpt4v_first_n_entries(self):
    entries = []
    for i in range(12):
      rel = f"coco/train2017/{i:012d}.jpg" if i % 2 else f"sam/images/sa_{i}.jpg"
      _write_image(os.path.join(self.root, "imgs", rel))
      entries.append({"id": str(i), "image": rel, "conversations": [
          {"from": "human", "value": "<image>\nDescribe."},
          {"from": "gpt", "value": f"Caption {i}.\nSecond paragraph."}]})
    _write(os.path.join(self.root, datasets.SHAREGPT4V_JSON), json.dumps(entries))
    ds = datasets.load_sharegpt4v(self.root, num_examples=10,
                                  image_root=os.path.join(self.root, "imgs"))
    self.assertLen(ds.texts, 10)
    self.assertEqual(ds.texts[3], "Caption 3. Second paragraph.")
    self.assertTrue(ds.image_paths[3].endswith("coco/train2017/000000000003.jpg"))
    self.assertEqual(ds.protocol, "sharegpt4v-first10")
    _check_pairing(self, ds)
    with self.assertRaisesRegex(ValueError, "fewer than the 1000"):
      datasets.load_dataset("sharegpt4v_1k", self.root)

  def test_dci_all_splits_short_plus_extra(self):
    base = os.path.join(self.root, "densely_captioned_images")
    splits = {"train": ["a.json", "b.json"], "valid": ["c.json"], "test": ["d.json"]}
    _write(os.path.join(base, "splits.json"), json.dumps(splits))
    for name in "abcd":
      _write_image(os.path.join(base, "photos", f"sa_{name}.jpg"))
      _write(os.path.join(base, "annotations", f"{name}.json"), json.dumps({
          "image": f"sa_{name}.jpg", "short_caption": f"Short {name}.",
          "extra_caption": f"Extra {name}.", "mask_data": {}}))
    ds = datasets.load_dataset("dci", self.root)
    self.assertLen(ds.image_paths, 4)
    self.assertEqual(ds.texts[2], "Short c.\nExtra c.")
    self.assertTrue(ds.image_paths[2].endswith("sa_c.jpg"))
    _check_pairing(self, ds)
    test_only = datasets.load_dci(base, splits=["test"])
    self.assertEqual(test_only.texts, ["Short d.\nExtra d."])
    self.assertNotEqual(test_only.protocol, ds.protocol)

  def test_docci_test_split_only(self):
    rows = []
    for i, split in enumerate(["train", "test", "qual_dev", "test"]):
      name = f"{split}_{i:05d}.jpg"
      _write_image(os.path.join(self.root, "images", name))
      rows.append({"example_id": f"{split}_{i}", "split": split,
                   "image_file": name, "description": f"Description {i}."})
    _write(os.path.join(self.root, "docci_descriptions.jsonlines"),
           "\n".join(json.dumps(r) for r in rows) + "\n")
    ds = datasets.load_dataset("docci", self.root)
    self.assertEqual(ds.texts, ["Description 1.", "Description 3."])
    self.assertTrue(ds.image_paths[1].endswith("test_00003.jpg"))
    _check_pairing(self, ds)

  def test_coco_karpathy_test_first_five(self):
    images = []
    for i, split in enumerate(["test", "train", "restval", "test", "val"]):
      folder = "val2014" if split != "train" else "train2014"
      name = f"COCO_{folder}_{i:012d}.jpg"
      _write_image(os.path.join(self.root, folder, name))
      images.append({"filepath": folder, "filename": name, "split": split,
                     "cocoid": i, "sentences": [
                         {"raw": f"img {i} cap {k} ", "tokens": []}
                         for k in range(6 if i == 3 else 5)]})
    _write(os.path.join(self.root, "dataset_coco.json"),
           json.dumps({"images": images, "dataset": "coco"}))
    ds = datasets.load_dataset("coco_karpathy", self.root)
    self.assertLen(ds.image_paths, 2)
    self.assertLen(ds.texts, 10)  # image 3's 6th caption dropped
    self.assertEqual(ds.texts[5:], [f"img 3 cap {k}" for k in range(5)])
    self.assertEqual(ds.image_to_texts, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    self.assertEqual(ds.protocol, "coco-karpathy-test-2")
    _check_pairing(self, ds)

  def test_coco_val2017_sorted_ids_first_five_in_file_order(self):
    ids = [139, 42, 785]
    for i in ids:
      _write_image(os.path.join(self.root, "val2017", f"{i:012d}.jpg"))
    anns = []
    for k in range(6):  # interleaved, as in the real file
      for i in ids:
        anns.append({"id": len(anns), "image_id": i, "caption": f"{i}-{k}"})
    _write(os.path.join(self.root, "annotations", "captions_val2017.json"),
           json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"}
                                  for i in ids], "annotations": anns}))
    ds = datasets.load_dataset("coco_val2017", self.root)
    self.assertEqual([os.path.basename(p) for p in ds.image_paths],
                     ["000000000042.jpg", "000000000139.jpg", "000000000785.jpg"])
    self.assertEqual(ds.texts[:5], [f"42-{k}" for k in range(5)])
    self.assertLen(ds.texts, 15)
    _check_pairing(self, ds)

  def test_flickr30k_karpathy(self):
    images = []
    for i, split in enumerate(["train", "test", "test", "val"]):
      name = f"{1000 + i}.jpg"
      _write_image(os.path.join(self.root, "flickr30k-images", name))
      images.append({"filename": name, "split": split, "imgid": i,
                     "sentences": [{"raw": f"{i}:{k}"} for k in range(5)]})
    _write(os.path.join(self.root, "dataset_flickr30k.json"),
           json.dumps({"images": images, "dataset": "flickr30k"}))
    ds = datasets.load_dataset("flickr30k_karpathy", self.root)
    self.assertEqual([os.path.basename(p) for p in ds.image_paths],
                     ["1001.jpg", "1002.jpg"])
    self.assertEqual(ds.texts[5], "2:0")
    self.assertEqual(ds.protocol, "flickr30k-karpathy-test-2")
    _check_pairing(self, ds)

  def test_flickr30k_full_token_file(self):
    lines = []
    for name in ("1000092795.jpg", "10002456.jpg", "1000268201.jpg"):
      _write_image(os.path.join(self.root, "flickr30k-images", name))
      lines += [f"{name}#{k}\t{name[:4]} caption {k} ." for k in range(5)]
    _write(os.path.join(self.root, "results_20130124.token"), "\n".join(lines) + "\n")
    ds = datasets.load_dataset("flickr30k_full", self.root)
    self.assertLen(ds.image_paths, 3)
    self.assertLen(ds.texts, 15)
    self.assertEqual(ds.texts[7], "1000 caption 2 .")
    self.assertEqual(ds.text_to_image[7], 1)
    self.assertTrue(ds.image_paths[1].endswith("10002456.jpg"))
    self.assertEqual(ds.protocol, "flickr30k-full-3")
    _check_pairing(self, ds)
    _write(os.path.join(self.root, "results_20130124.token"), "no tab here\n")
    with self.assertRaisesRegex(ValueError, "results_20130124.token:1"):
      datasets.load_flickr30k_full(self.root)

  def test_synthetic_long_and_short(self):
    rows = [{"image": "img/0.png", "caption": "A red square. On blue.",
             "short_caption": "A red square."},
            {"image": "img/1.png", "caption": "Two dots. Left of a line."}]
    for r in rows:
      _write_image(os.path.join(self.root, r["image"]), fmt="PNG")
    _write(os.path.join(self.root, "manifest.jsonl"),
           "\n".join(json.dumps(r) for r in rows) + "\n")
    long_ds = datasets.load_dataset("synthetic_long", self.root)
    short_ds = datasets.load_dataset(
        "synthetic-short", os.path.join(self.root, "manifest.jsonl"))
    self.assertEqual(long_ds.protocol, "synthetic-long")
    self.assertEqual(short_ds.protocol, "synthetic-short")
    self.assertEqual(long_ds.texts, [r["caption"] for r in rows])
    self.assertEqual(short_ds.texts, ["A red square.", "Two dots"])
    self.assertEqual(long_ds.image_paths, short_ds.image_paths)
    _check_pairing(self, short_ds)

  def test_reads_the_synthetic_generator_output(self):
    from fixclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    manifest = synthetic.make_synthetic_dataset(
        os.path.join(self.root, "synth"), 4, image_size=32)
    with open(manifest) as f:
      rows = [json.loads(line) for line in f]
    long_ds = datasets.load_dataset("synthetic_long", os.path.dirname(manifest))
    short_ds = datasets.load_dataset("synthetic_short", os.path.dirname(manifest))
    self.assertEqual(long_ds.texts, [r["caption"] for r in rows])
    self.assertEqual(short_ds.texts, [r["short_caption"] for r in rows])
    _check_pairing(self, long_ds)

  def test_synthetic_long77_cuts_long_captions_to_77_tokens(self):
    root = os.path.dirname(synthetic.make_synthetic_dataset(
        os.path.join(self.root, "synth"), 4, image_size=32))
    long_ds = datasets.load_dataset("synthetic_long", root)
    cut_ds = datasets.load_dataset("synthetic-long77", root)
    self.assertEqual(cut_ds.protocol, "synthetic-long77")
    self.assertEqual(cut_ds.texts, long_ds.texts)
    self.assertEqual((long_ds.text_context, cut_ds.text_context), (None, 77))
    tok = tokenizers.get_tokenizer("clip", context_length=248)
    self.assertIs(run.dataset_tokenizer(tok, long_ds, 248), tok)
    cut = run.dataset_tokenizer(tok, cut_ds, 248)(cut_ds.texts)
    self.assertEqual(cut.shape, (4, 77))
    np.testing.assert_array_equal(cut[:, -1], tok.eot_token_id)  # captions > 77
    np.testing.assert_array_equal(cut[:, :76], tok(cut_ds.texts)[:, :76])
    self.assertEqual(run.dataset_tokenizer(tok, cut_ds, 32)(cut_ds.texts).shape,
                     (4, 32))
    with self.assertRaisesRegex(ValueError, "long77"):
      datasets.load_synthetic(root, which="long76")

  def test_synthetic_late_keeps_whole_late_twin_pairs_only(self):
    root = os.path.dirname(synthetic.make_synthetic_dataset(
        os.path.join(self.root, "synth"), 16, image_size=32,
        late_detail_share=0.5))
    with open(os.path.join(root, "manifest.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    twins = [r for r in rows if r["scene"]["late_twin"]]
    self.assertBetween(len(twins), 2, len(rows) - 2)   # a mixed set
    late = datasets.load_dataset("synthetic_late", root)
    self.assertEqual(late.protocol, "synthetic-late")
    self.assertEqual(late.texts, [r["caption"] for r in twins])
    self.assertEqual(len(late.texts) % 2, 0)            # both members of a pair
    # Twins agree on the first 77 tokens and differ after them.
    tok = tokenizers.get_tokenizer("clip", context_length=248)
    ids = tok(late.texts)
    np.testing.assert_array_equal(ids[0::2, :76], ids[1::2, :76])
    self.assertTrue(np.all(np.any(ids[0::2] != ids[1::2], axis=1)))
    _check_pairing(self, late)

  def test_unknown_name(self):
    with self.assertRaisesRegex(KeyError, "urban1k"):
      datasets.load_dataset("nope", self.root)


class ClassificationLoadersTest(absltest.TestCase):

  def test_image_folder_numeric_classes_sorted_as_numbers(self):
    root = _tempdir(self)
    for label in (0, 2, 10):
      for j in range(2):
        _write_image(os.path.join(root, str(label), f"ILSVRC2012_val_{label}{j}.JPEG"),
                     fmt="JPEG")
    names = ["zero", "two", "ten"]
    ds = datasets.load_image_folder(root, class_names=names, name="tiny")
    self.assertLen(ds, 6)
    path, label = ds.read(5)
    self.assertEqual(label, 2)
    self.assertIn(os.path.join("10", ""), path)
    self.assertEqual(ds.class_names, tuple(names))

  def test_imagenet_folder_needs_1000_classes(self):
    root = _tempdir(self)
    _write_image(os.path.join(root, "n01440764", "a.JPEG"), fmt="JPEG")
    with self.assertRaisesRegex(FileNotFoundError, "1000 class folders"):
      datasets.load_classification("imagenet", root)

  def test_imagenet_folder_uses_openai_names(self):
    root = _tempdir(self)
    for i in range(1000):
      os.makedirs(os.path.join(root, f"n{i:08d}"))
    _write_image(os.path.join(root, "n00000001", "x.JPEG"), fmt="JPEG")
    ds = datasets.load_classification("imagenet", root)
    self.assertLen(ds, 1)
    self.assertEqual(ds.read(0)[1], 1)
    self.assertEqual(ds.class_names[1], "goldfish")
    self.assertEqual(ds.class_names, imagenet_classes.IMAGENET_CLASSNAMES)

  def test_cifar10_tfds_data_source(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = _tempdir(self)
    with self.assertRaisesRegex(FileNotFoundError, "prepared TFDS dataset"):
      datasets.load_classification("cifar10", data_dir)
    records = [{"image": np.full((32, 32, 3), i, np.uint8), "label": i % 10,
                "id": str(i)} for i in range(4)]
    with tfds.testing.mock_data(num_examples=4,
                                as_data_source_fn=lambda *a, **k: records):
      ds = datasets.load_classification("cifar10", data_dir)
    self.assertLen(ds, 4)
    self.assertLen(ds.class_names, 10)
    self.assertEqual(ds.class_names[0], "airplane")
    image, label = ds.read(3)
    self.assertEqual(label, 3)
    self.assertEqual(image.shape, (32, 32, 3))
    np.testing.assert_array_equal(image, 3)

  def test_cifar100_names_from_tfds_info(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = _tempdir(self)
    records = [{"image": np.zeros((32, 32, 3), np.uint8), "label": 7,
                "coarse_label": 1, "id": "0"}]
    with tfds.testing.mock_data(num_examples=1,
                                as_data_source_fn=lambda *a, **k: records):
      ds = datasets.load_classification("cifar-100", data_dir)
      info_names = tfds.builder("cifar100", data_dir=data_dir).info.features[
          "label"].names
    self.assertLen(ds.class_names, 100)
    self.assertEqual(list(ds.class_names),
                     [n.replace("_", " ") for n in info_names])
    self.assertEqual(ds.read(0)[1], 7)



class DatasetNameTest(absltest.TestCase):
  """One name normalisation for both registries, wherever a name is used."""

  def test_registry_names_stay_distinct(self):
    keys = list(datasets.RETRIEVAL_LOADERS) + list(datasets.CLASSIFICATION_LOADERS)
    canonical = [datasets.canonical_name(k) for k in keys]
    self.assertEqual(len(set(canonical)), len(keys), canonical)

  def test_spellings_reach_the_right_loader(self):
    def fake(key):
      return lambda root, **kwargs: (key, root)
    retrieval = {k: fake(k) for k in datasets.RETRIEVAL_LOADERS}
    classification = {k: fake(k) for k in datasets.CLASSIFICATION_LOADERS}
    config = config_base.base_config()
    config.eval.root = "/data"
    config.eval.datasets = ("CIFAR10, cifar-10,Cifar_100, ImageNet,Urban1K,"
                            "COCO-Karpathy,sharegpt4v_1k,Flickr30k full")
    with mock.patch.dict(datasets.RETRIEVAL_LOADERS, retrieval), \
         mock.patch.dict(datasets.CLASSIFICATION_LOADERS, classification):
      loaded = run.load_eval_sets(config.eval, "/unused",
                                  config.data.synthetic_image_size)
      self.assertEqual(datasets.load_classification("CIFAR-10", "/d"),
                       ("cifar10", "/d"))
      self.assertEqual(datasets.load_dataset("Urban_1k", "/d"), ("urban1k", "/d"))
    self.assertEqual([key for key, _ in loaded], [
        "cifar10", "cifar10", "cifar100", "imagenet", "urban1k",
        "coco_karpathy", "sharegpt4v_1k", "flickr30k_full"])
    self.assertTrue(datasets.is_classification("CIFAR10"))
    self.assertFalse(datasets.is_classification("urban1k"))

  def test_unknown_names_list_the_known_ones(self):
    with self.assertRaisesRegex(KeyError, "cifar10"):
      datasets.load_classification("cifar11", "/d")
    with self.assertRaisesRegex(KeyError, "urban1k"):
      datasets.load_dataset("urban2k", "/d")


class BenchmarkFolderProblemsTest(absltest.TestCase):
  """Files that do not pair up, captions that are not UTF-8 (issue 15)."""

  def setUp(self):
    super().setUp()
    self.base = os.path.join(_tempdir(self), "Urban1k")
    for stem in ("1", "2", "3"):
      _write_image(os.path.join(self.base, "image", f"{stem}.jpg"), fmt="JPEG")
      _write(os.path.join(self.base, "caption", f"{stem}.txt"),
             f"Caption of {stem}.\n")

  def test_a_caption_that_is_not_utf8_names_the_file(self):
    with open(os.path.join(self.base, "caption", "2.txt"), "wb") as f:
      f.write(b"Caf\xe9 on a corner.\n")
    with self.assertRaisesRegex(ValueError, r"urban1k: .*caption[/\\]2\.txt is "
                                r"not UTF-8 text \(line 1, byte b'\\xe9' at "
                                r"offset 3\)"):
      datasets.load_urban1k(self.base)

  def test_unpaired_files_are_listed_in_one_warning_and_counted(self):
    _write(os.path.join(self.base, "caption", "4.txt"), "No image for me.\n")
    _write_image(os.path.join(self.base, "image", "5.jpg"), fmt="JPEG")
    with self.assertLogs("absl", "WARNING") as logs:
      ds = datasets.load_urban1k(self.base)
    self.assertLen(logs.output, 1)
    self.assertIn("urban1k: 1 caption(s) without an image (4.txt) and 1 "
                  "image(s) without a caption (5.jpg); scoring 3 of the 5 "
                  "pairs found", logs.output[0])
    self.assertLen(ds.image_paths, 3)
    self.assertEqual(ds.pair_counts, {"pairs_scored": 3, "pairs_found": 5})
    _check_pairing(self, ds)

  def test_missing_images_of_a_caption_file_are_counted(self):
    root = os.path.dirname(synthetic.make_synthetic_dataset(
        os.path.join(os.path.dirname(self.base), "synth"), 4, image_size=32))
    rows = [json.loads(l) for l in open(os.path.join(root, "manifest.jsonl"))]
    os.remove(os.path.join(root, rows[1]["image"]))
    with self.assertLogs("absl", "WARNING") as logs:
      ds = datasets.load_dataset("synthetic_long", root)
    self.assertRegex(logs.output[0], r"synthetic: 1 caption\(s\) without an "
                     r"image \(.*\); scoring 3 of the 4 pairs found")
    self.assertEqual(ds.pair_counts, {"pairs_scored": 3, "pairs_found": 4})

  def test_the_report_records_pairs_scored_of_found(self):
    _write(os.path.join(self.base, "caption", "4.txt"), "No image for me.\n")
    ds = datasets.load_urban1k(self.base)
    workdir = _tempdir(self)
    config = config_base.base_config()
    config.data.tokenizer = "clip"
    config.eval.batch_size = 2
    # Features that need no model: pixels and token ids, cut to 8 numbers.
    image_fn = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)[:, :8]
    text_fn = lambda t: np.asarray(t, np.float32)[:, :8]
    model = mock.Mock(cfg=mock.Mock(context_length=77, vocab_size=49408,
                                    eot_token_id=None, image_size=16))
    mesh = mock.Mock()
    with mock.patch.object(run, "load_eval_sets", return_value=[ds]), \
        mock.patch.object(run, "embed_fns", return_value=(image_fn, text_fn)), \
        mock.patch.object(run.sharding, "num_batch_shards", return_value=1):
      results = run.evaluate(config, model, None, mesh,
                             tokenizers.get_tokenizer("clip", 77),
                             workdir=workdir, step=0)
    self.assertEqual((results[0]["pairs_scored"], results[0]["pairs_found"]),
                     (3, 4))
    with open(os.path.join(workdir, "eval_results.json")) as f:
      saved = json.load(f)["results"][0]
    self.assertEqual((saved["pairs_scored"], saved["pairs_found"]), (3, 4))


if __name__ == "__main__":
  absltest.main()
