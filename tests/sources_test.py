"""Tests for fixclip_jax.data.sources on tiny fixtures."""
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import threading
import time

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax import config_base
from fixclip_jax.data import prepare
from fixclip_jax.data import sources
from fixclip_jax.data import tokenizers


def _tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _data_config(**overrides):
  """config.data with its defaults (config_base), as make_source gets it."""
  c = config_base.base_config().data
  c.update(overrides)
  return c


def _png(colour, size=(8, 6)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(colour) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
  return buf.getvalue()


CAPTIONS = ["A red square on a plain background. It is small and bright.",
            "A green square seen from above. Nothing else is visible there.",
            "A blue square, drawn with flat colour. The edges are sharp."]
MULTI = ["first caption of the image", "second caption of the image",
         "third caption of the image"]


def write_manifest(root: str, lines=None, name="manifest.jsonl") -> str:
  """Three PNGs: a relative path, a nested path, an absolute path."""
  os.makedirs(os.path.join(root, "img", "sub"), exist_ok=True)
  files = [os.path.join("img", "a.png"), os.path.join("img", "sub", "b.png"),
           os.path.join(root, "img", "c.png")]
  for path, colour in zip(files, ((255, 0, 0), (0, 255, 0), (0, 0, 255))):
    with open(os.path.join(root, path), "wb") as f:
      f.write(_png(colour))
  if lines is None:
    lines = [{"image": files[0], "caption": CAPTIONS[0]},
             {"image": files[1], "caption": CAPTIONS[1],
              "short_caption": "green", "key": "k1"},
             {"image": files[2], "captions": MULTI}]
  path = os.path.join(root, name)
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return path


class JsonlSourceTest(absltest.TestCase):

  def test_reads_examples(self):
    root = _tempdir(self)
    src = sources.JsonlSource(write_manifest(root))
    self.assertLen(src, 3)
    ex = src[0]
    self.assertEqual(set(ex), {"image", "caption", "short_caption", "key"})
    with open(os.path.join(root, "img", "a.png"), "rb") as f:
      self.assertEqual(ex["image"], f.read())
    self.assertEqual(ex["caption"], CAPTIONS[0])
    self.assertIsNone(ex["short_caption"])
    self.assertEqual(src[1]["short_caption"], "green")
    self.assertEqual(src[1]["key"], "k1")
    self.assertEqual(np.asarray(Image.open(io.BytesIO(src[2]["image"])))[0, 0]
                     .tolist(), [0, 0, 255])

  def test_image_root(self):
    root = _tempdir(self)
    write_manifest(root)
    elsewhere = _tempdir(self)
    manifest = os.path.join(elsewhere, "m.jsonl")
    with open(manifest, "w") as f:
      f.write(json.dumps({"image": "img/a.png", "caption": "x"}) + "\n")
    with self.assertRaisesRegex(FileNotFoundError, "m.jsonl:1"):
      sources.JsonlSource(manifest)[0]  # pylint: disable=expression-not-assigned
    self.assertEqual(sources.JsonlSource(manifest, image_root=root)[0]["image"],
                     _png((255, 0, 0)))

  def test_caption_choice_is_deterministic_per_epoch(self):
    root = _tempdir(self)
    manifest = write_manifest(root)
    src = sources.JsonlSource(manifest, seed=5)
    again = sources.JsonlSource(manifest, seed=5)
    chosen = [src.get(2, epoch)["caption"] for epoch in range(12)]
    self.assertEqual(chosen, [again.get(2, e)["caption"] for e in range(12)])
    self.assertGreater(len(set(chosen)), 1)  # epochs see different captions
    self.assertTrue(set(chosen) <= set(MULTI))
    other_seed = sources.JsonlSource(manifest, seed=6)
    self.assertNotEqual(chosen, [other_seed.get(2, e)["caption"]
                                 for e in range(12)])
    # Single-caption examples never change.
    self.assertEqual({src.get(0, e)["caption"] for e in range(5)}, {CAPTIONS[0]})

  def test_errors_name_file_line_and_field(self):
    root = _tempdir(self)
    with self.assertRaisesRegex(FileNotFoundError, "nope.jsonl"):
      sources.JsonlSource(os.path.join(root, "nope.jsonl"))
    good = {"image": "img/a.png", "caption": "c"}
    # A bad line costs its example, not the run: it raises when read.
    src = sources.JsonlSource(write_manifest(root, [
        good, "{not json", {"caption": "c"}, {"image": "img/a.png"},
        {"image": None, "caption": "c"}, {"image": 123, "caption": "c"},
        {"image": "img/a.png", "caption": "c", "short_caption": 5},
        {"image": "img/a.png", "caption": ["list"]}, "[1, 2]"], "bad.jsonl"))
    self.assertLen(src, 9)
    self.assertEqual(src[0]["caption"], "c")
    for index, pattern in ((1, "bad.jsonl:2: invalid JSON"),
                           (2, "bad.jsonl:3: missing field 'image'"),
                           (3, "bad.jsonl:4: missing field 'caption'"),
                           (4, "bad.jsonl:5: field 'image' must be a non-empty "
                               "path string \\(found null\\)"),
                           (5, "bad.jsonl:6: field 'image' .*found 123"),
                           (6, "bad.jsonl:7: field 'short_caption' must be a "
                               "string or null \\(found int\\)"),
                           (7, "bad.jsonl:8: field 'caption' must be a string"),
                           (8, "bad.jsonl:9: expected a JSON object")):
      with self.assertRaisesRegex(sources.BadRecordError, pattern):
        src[index]  # pylint: disable=pointless-statement
      self.assertEqual(src.location(index),
                       f"manifest {os.path.join(root, 'bad.jsonl')}:{index + 1}")
    missing = write_manifest(root, [good, {"image": "img/zz.png", "caption": "c"}],
                             "mi.jsonl")
    src = sources.JsonlSource(missing)
    with self.assertRaisesRegex(FileNotFoundError, r"zz\.png.*mi\.jsonl:2"):
      src[1]  # pylint: disable=pointless-statement
    with self.assertRaises(IndexError):
      src[2]  # pylint: disable=pointless-statement

  def test_a_manifest_without_a_usable_line_fails_at_once(self):
    root = _tempdir(self)
    path = write_manifest(root, ["{oops", {"caption": "no image"}], "all.jsonl")
    with self.assertRaisesRegex(ValueError, r"all\.jsonl: no usable line \(2 "
                                r"bad, the first: .*all\.jsonl:1: invalid JSON"):
      sources.JsonlSource(path)

  def test_non_utf8_line_is_a_bad_record(self):
    root = _tempdir(self)
    path = write_manifest(root, name="latin1.jsonl")
    with open(path, "ab") as f:
      f.write(b'{"image": "img/a.png", "caption": "caf\xe9"}\n')
    src = sources.JsonlSource(path)
    self.assertLen(src, 4)
    with self.assertRaisesRegex(sources.CaptionEncodingError,
                                r"latin1\.jsonl:4: line is not UTF-8"):
      src[3]  # pylint: disable=pointless-statement

  def test_image_paths_that_are_no_regular_file(self):
    root = _tempdir(self)
    os.makedirs(os.path.join(root, "dir.png"))
    os.symlink("loop_b.png", os.path.join(root, "loop_a.png"))
    os.symlink("loop_a.png", os.path.join(root, "loop_b.png"))
    lines = [{"image": "dir.png", "caption": "c"},
             {"image": "loop_a.png", "caption": "c"},
             {"image": "/dev/zero", "caption": "c"}]
    src = sources.JsonlSource(write_manifest(root, lines, "special.jsonl"))
    for index, pattern in ((0, r"dir\.png: a directory, not an image file "
                               r"\(manifest .*special\.jsonl:1\)"),
                           (1, r"loop_a\.png: cannot read it \(Too many levels "
                               r"of symbolic links\)"),
                           (2, r"/dev/zero: a character device, not an image")):
      with self.assertRaisesRegex(sources.UnreadableFileError, pattern):
        src[index]  # pylint: disable=pointless-statement

  def test_a_read_that_does_not_finish_times_out(self):
    root = _tempdir(self)
    fifo, fifo2 = os.path.join(root, "stuck.png"), os.path.join(root, "s2.png")
    os.mkfifo(fifo)  # open() blocks until a writer comes: a stalled read
    os.mkfifo(fifo2)  # (a blocked record's next read fails at once)
    src = sources.JsonlSource(write_manifest(
        root, [{"image": "stuck.png", "caption": "c"},
               {"image": "s2.png", "caption": "c"}], "fifo.jsonl"))
    src.read_timeout_s = 0.3
    try:
      start = time.monotonic()
      with self.assertRaisesRegex(sources.ReadTimeoutError,
                                  r"stuck\.png.*fifo\.jsonl:1.*within "
                                  r"data\.read_timeout_s=0\.3s"):
        src[0]  # pylint: disable=pointless-statement
      self.assertLess(time.monotonic() - start, 3)
      # A stopping run abandons reads that wait, without their timeout.
      src.read_timeout_s = 600
      threading.Timer(0.3, sources.abandon_reads).start()
      start = time.monotonic()
      with self.assertRaisesRegex(sources.ReadTimeoutError, "abandoned"):
        src[1]  # pylint: disable=pointless-statement
      self.assertLess(time.monotonic() - start, 5)
    finally:
      _release_fifo(fifo)
      _release_fifo(fifo2)
    # Without a timeout, sources read in the calling thread as before.
    src = sources.JsonlSource(write_manifest(root))
    self.assertEqual(src[0]["caption"], CAPTIONS[0])

  def test_location_names_image_manifest_line_and_key(self):
    root = _tempdir(self)
    src = sources.JsonlSource(write_manifest(root))
    self.assertEqual(src.location(1),
                     f"{os.path.join(root, 'img', 'sub', 'b.png')} (manifest "
                     f"{os.path.join(root, 'manifest.jsonl')}:2, key 'k1')")


def _release_fifo(path: str) -> None:
  """Lets a reader blocked in open(path) go: a writer comes and leaves."""
  try:
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
  except OSError:  # no reader left
    pass


def write_tar(path: str, members) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


class TarSourceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
    write_tar(os.path.join(self.root, "00000.tar"), [
        ("000000000.jpg", _jpeg((255, 0, 0))),
        ("000000000.json", json.dumps({"caption": "red jpeg", "url": "u"}).encode()),
        ("000000000.txt", b"ignored when the json has a caption"),
        ("000000001.png", _png((0, 255, 0))),
        ("000000001.txt", "green png caption\n".encode()),
        ("000000002.json", json.dumps({"caption": "no image"}).encode()),
        ("000000003.webp", _png((1, 2, 3))),
    ])
    write_tar(os.path.join(self.root, "00001.tar"), [
        ("sub/000010000.png", _png((0, 0, 255))),
        ("sub/000010000.json", json.dumps(
            {"captions": ["a", "b"], "short_caption": "blue"}).encode()),
    ])

  def test_indexes_shards(self):
    src = sources.TarSource(os.path.join(self.root, "*.tar"), seed=1)
    self.assertLen(src, 3)
    # Named as pipeline.SKIP_REASONS (prepare reports them).
    self.assertEqual(src.skipped, {"missing_file": 1, "empty_caption": 1})
    self.assertEqual(src[0]["image"], _jpeg((255, 0, 0)))
    self.assertEqual(src[0]["caption"], "red jpeg")
    self.assertEqual(src[0]["key"], "000000000")
    self.assertEqual(src[1]["image"], _png((0, 255, 0)))
    self.assertEqual(src[1]["caption"], "green png caption")
    self.assertEqual(src[2]["short_caption"], "blue")
    self.assertEqual(src[2]["key"], "sub/000010000")
    self.assertIn(src[2]["caption"], ["a", "b"])

  def test_folder_and_pickle(self):
    src = sources.TarSource(self.root)
    src[0]  # pylint: disable=pointless-statement  (opens a descriptor)
    copy = pickle.loads(pickle.dumps(src))
    self.assertEqual(copy[1]["image"], src[1]["image"])

  def test_errors(self):
    with self.assertRaisesRegex(FileNotFoundError, "nothing"):
      sources.TarSource(os.path.join(self.root, "nothing*.tar"))
    bad = os.path.join(self.root, "bad.tar")
    with open(bad, "wb") as f:
      f.write(b"definitely not a tar archive" * 40)
    with self.assertRaisesRegex(ValueError, "bad.tar"):
      sources.TarSource(bad)
    write_tar(os.path.join(self.root, "badjson.tar"), [
        ("k.png", _png((0, 0, 0))), ("k.json", b"{oops"),
        ("t.png", _png((0, 0, 0))), ("t.json", b'{"caption": 5}'),
        ("ok.png", _png((0, 0, 0))), ("ok.txt", b"fine")])
    src = sources.TarSource(os.path.join(self.root, "badjson.tar"))
    self.assertLen(src, 3)  # the bad keys fail when read, not the shard
    with self.assertRaisesRegex(sources.BadRecordError,
                                r"badjson\.tar:k\.json: invalid JSON"):
      src[0]  # pylint: disable=pointless-statement
    with self.assertRaisesRegex(sources.BadRecordError,
                                r"badjson\.tar:t\.json: field 'caption' must "
                                r"be a string \(found int\)"):
      src[1]  # pylint: disable=pointless-statement
    self.assertEqual(src[2]["caption"], "fine")

  def test_non_utf8_captions_fail_the_example_not_the_shard(self):
    shard = os.path.join(self.root, "latin1.tar")
    write_tar(shard, [
        ("ok.png", _png((0, 0, 0))), ("ok.txt", b"fine caption"),
        ("t.png", _png((1, 0, 0))), ("t.txt", b"caf\xe9 cr\xe8me"),
        ("j.png", _png((2, 0, 0))), ("j.json", b'{"caption": "\xff\xfe"}'),
    ])
    src = sources.TarSource(shard)
    self.assertLen(src, 3)  # indexed; reading the bad ones raises
    self.assertEqual(src[0]["caption"], "fine caption")
    with self.assertRaisesRegex(sources.CaptionEncodingError,
                                r"latin1\.tar:t\.txt: caption is not UTF-8"):
      src[1]  # pylint: disable=pointless-statement
    with self.assertRaisesRegex(sources.CaptionEncodingError,
                                r"latin1\.tar:j\.json: caption is not UTF-8"):
      src[2]  # pylint: disable=pointless-statement
    self.assertEqual(src.location(1), f"{shard}:t")
    self.assertEqual(src.key(2), "j")

class ArrayRecordSourceTest(absltest.TestCase):

  def test_record_round_trip(self):
    header = {"key": "k", "captions": ["ü caption"], "short_caption": None}
    rec = sources.encode_record(header, b"\x89PNGbytes")
    self.assertEqual(sources.decode_record(rec), (header, b"\x89PNGbytes"))
    with self.assertRaisesRegex(sources.BadRecordError, "magic"):
      sources.decode_record(b"XXXX" + rec[4:])
    with self.assertRaisesRegex(sources.BadRecordError, "shorter than"):
      sources.decode_record(rec[:12])
    with self.assertRaisesRegex(sources.BadRecordError, "not JSON"):
      sources.decode_record(sources.RECORD_MAGIC + b"\x03\x00\x00\x00{x}")
    latin1 = sources.RECORD_MAGIC + b"\x05\x00\x00\x00caf\xe9x" + b"img"
    with self.assertRaises(sources.CaptionEncodingError):
      sources.decode_record(latin1)

  def test_decode_caption(self):
    self.assertEqual(sources.decode_caption("ü".encode(), "w"), "ü")
    with self.assertRaisesRegex(sources.CaptionEncodingError, "^tfds x/y"):
      sources.decode_caption(b"\xff", "tfds x/y")

  def test_reads_prepared_shards(self):
    root = _tempdir(self)
    manifest = write_manifest(root)
    dst = os.path.join(root, "ar")
    prepare.prepare(manifest, dst, num_shards=2, filter_config=None,
                    progress=False)
    src = sources.ArrayRecordSource(dst, seed=5)
    jsonl = sources.JsonlSource(manifest, seed=5)
    self.assertLen(src, 3)
    by_key = {src[i]["key"]: i for i in range(len(src))}
    for i in range(3):
      j = by_key[jsonl[i]["key"]]
      self.assertEqual(src[j]["image"], jsonl[i]["image"])
      self.assertEqual(src[j]["short_caption"], jsonl[i]["short_caption"])
    multi = by_key[jsonl[2]["key"]]
    self.assertEqual({src.get(multi, e)["caption"] for e in range(12)},
                     {jsonl.get(2, e)["caption"] for e in range(12)})
    copy = pickle.loads(pickle.dumps(src))
    self.assertEqual(copy[0], src[0])


def _build_tiny_tfds(data_dir: str, image_dir: str) -> None:
  """A 3-example TFDS dataset in ArrayRecord format (no TensorFlow needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class FixclipTinyCaps(tfds.core.GeneratorBasedBuilder):
    # A one-part module name makes TFDS skip looking for checksum files next
    # to the builder's code (that lookup needs `importlib_resources`, absent
    # from the env).
    __module__ = "fixclip_tiny_caps"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "meta": {"caption": tfds.features.Text()},
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        path = os.path.join(image_dir, f"{i}.png")
        with open(path, "wb") as f:
          f.write(_png((i * 60, 0, 0)))
        # A path keeps TFDS from re-encoding (which would need TensorFlow).
        yield i, {"image": path, "meta": {"caption": f"caption {i}"}}

  FixclipTinyCaps(data_dir=data_dir,
                  file_format="array_record").download_and_prepare()


class TfdsSourceTest(absltest.TestCase):

  def test_reads_tfds_data_source(self):
    root = _tempdir(self)
    _build_tiny_tfds(os.path.join(root, "tfds"), root)
    config = _data_config(
        type="tfds", path="fixclip_tiny_caps", tfds_split="train",
        tfds_data_dir=os.path.join(root, "tfds"), tfds_image_key="image",
        tfds_caption_key="meta/caption")
    src = sources.make_source(config)
    self.assertIsInstance(src, sources.TfdsSource)
    self.assertLen(src, 3)
    got = sorted((src[i]["caption"], src[i]["image"]) for i in range(3))
    self.assertEqual(got, [(f"caption {i}", _png((i * 60, 0, 0)))
                           for i in range(3)])
    config.tfds_caption_key = "meta/nope"
    with self.assertRaisesRegex(KeyError, "fixclip_tiny_caps/train"):
      sources.make_source(config)[0]  # pylint: disable=expression-not-assigned


class MakeSourceTest(absltest.TestCase):

  def test_by_type(self):
    root = _tempdir(self)
    manifest = write_manifest(root)
    config = _data_config(type="jsonl", path=manifest)
    self.assertIsInstance(sources.make_source(config), sources.JsonlSource)
    config.type = "synthetic"
    config.synthetic_num = 3
    config.synthetic_image_size = 16
    src = sources.make_source(config)
    self.assertLen(src, 3)
    self.assertEqual(set(src[0]), {"image", "caption", "short_caption", "key"})
    config.type = "csv"
    with self.assertRaisesRegex(ValueError, "csv"):
      sources.make_source(config)

  def test_synthetic_late_detail_share_is_a_knob(self):
    # Pair (0, 1): independent scenes at share 0, late twins at share 1
    # (the same first 77 tokens, different captions).
    config = _data_config(type="synthetic", synthetic_num=2, synthetic_image_size=16)
    tokenizer = tokenizers.get_tokenizer("clip", context_length=248)
    for share, twins in ((0.0, False), (1.0, True)):
      config.synthetic_late_detail_share = share
      src = sources.make_source(config)
      captions = [src[i]["caption"] for i in (0, 1)]
      first77 = tokenizer(captions)[:, :77]
      self.assertNotEqual(captions[0], captions[1])
      self.assertEqual(bool((first77[0] == first77[1]).all()), twins, share)


if __name__ == "__main__":
  absltest.main()
