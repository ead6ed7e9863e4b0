"""Tests for fixclip_jax.data.prepare."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl.testing import absltest
from PIL import Image

from fixclip_jax.data import captions
from fixclip_jax.data import pipeline
from fixclip_jax.data import prepare
from fixclip_jax.data import sources
from fixclip_jax.data import tokenizers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = [
    "A large red circle sits in the middle of a plain white picture frame.",
    "Two small green squares are placed side by side near the lower edge.",
    "A tall blue triangle points upward above a thin yellow horizontal line.",
]
REPETITIVE = ("A cat on a mat, a cat on a mat, a cat on a mat, a cat on a mat, "
              "a cat on a mat.")
TOO_SHORT = "A cat."


def _tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _nonzero(counts):
  return {k: n for k, n in counts.items() if n}


def _write_tar(path: str, members) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def write_fixture(root: str) -> str:
  """3 good items, then a corrupt image, a repetitive caption, a too-short one,
  a missing image, and one multi-caption item with one too-short caption."""
  lines = []
  for i, caption in enumerate(GOOD):
    name = f"good{i}.png"
    Image.new("RGB", (100, 50), (40 * i, 0, 0)).save(os.path.join(root, name))
    lines.append({"image": name, "caption": caption, "key": f"good{i}",
                  "prompt_id": i % 2, "prompt": f"Describe the image ({i % 2})."})
  with open(os.path.join(root, "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n but then garbage")
  lines.append({"image": "corrupt.png", "caption": GOOD[0], "key": "corrupt"})
  lines.append({"image": "good0.png", "caption": REPETITIVE, "key": "rep"})
  lines.append({"image": "good1.png", "caption": TOO_SHORT, "key": "short"})
  lines.append({"image": "gone.png", "caption": GOOD[0], "key": "gone"})
  lines.append({"image": "good2.png", "captions": [GOOD[2], TOO_SHORT],
                "key": "multi"})
  os.makedirs(os.path.join(root, "dir.png"))
  lines.append({"image": "dir.png", "caption": GOOD[0], "key": "dir"})
  lines.append({"image": 123, "caption": GOOD[0], "key": "number"})
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(line) for line in lines) + "\n")
  return path


class PrepareTest(absltest.TestCase):

  def test_metadata_counts_and_skip_reasons(self):
    root = _tempdir(self)
    manifest = write_fixture(root)
    dst = os.path.join(root, "out")
    tok = tokenizers.get_tokenizer("clip")
    meta = prepare.prepare(manifest, dst, num_shards=2, tokenizer=tok,
                           progress=False)
    self.assertEqual(meta["count"], 4)  # good0..2 + multi
    self.assertEqual(meta["num_input"], 10)
    # A directory as image and a non-string image field are skipped and
    # counted under the pipeline's reasons, never fatal.
    self.assertEqual(_nonzero(meta["skipped"]), {
        "unreadable_image": 1, "missing_file": 1, "caption_filter": 2,
        "unreadable_file": 1, "bad_record": 1})
    self.assertEqual(meta["skipped_total"], 6)
    self.assertEqual(meta["skipped_keys"]["caption_filter"], ["rep", "short"])
    self.assertEqual(meta["skipped_keys"]["missing_file"], ["gone"])
    self.assertEqual(meta["caption_filter_reasons"],
                     {"repetitive": 1, "too_short": 1})
    self.assertEqual(meta["dropped_captions"], {"too_short": 1})
    self.assertEqual(meta["shard_counts"], [2, 2])
    self.assertEqual(meta["prompts"], {
        "0": {"prompt": "Describe the image (0).", "count": 2},
        "1": {"prompt": "Describe the image (1).", "count": 1}})
    kept = GOOD + [GOOD[2]]
    self.assertEqual(meta["caption_words"]["count"], 4)
    self.assertEqual(meta["caption_words"]["max"],
                     max(len(c.split()) for c in kept))
    self.assertEqual(meta["caption_tokens"]["max"],
                     max(len(tok.encode(c)) for c in kept))
    self.assertEqual(meta["caption_tokens"]["frac_over_77"], 0.0)
    # What is on disk: the shards, metadata.json, nothing left behind.
    self.assertEqual(sorted(os.listdir(dst)), [
        "data-00000-of-00002.array_record", "data-00001-of-00002.array_record",
        "metadata.json"])
    with open(os.path.join(dst, "metadata.json")) as f:
      self.assertEqual(json.load(f)["count"], 4)
    self.assertFalse([n for n in os.listdir(root) if ".tmp-" in n])
    src = sources.ArrayRecordSource(dst)
    keys = sorted(src[i]["key"] for i in range(len(src)))
    self.assertEqual(keys, ["good0", "good1", "good2", "multi"])
    multi = [i for i in range(len(src)) if src[i]["key"] == "multi"][0]
    self.assertEqual(src.raw(multi)["captions"], [GOOD[2]])
    good0 = [i for i in range(len(src)) if src[i]["key"] == "good0"][0]
    with open(os.path.join(root, "good0.png"), "rb") as f:
      self.assertEqual(src[good0]["image"], f.read())  # max_side=0 keeps bytes

  def test_without_filters_keeps_captions(self):
    root = _tempdir(self)
    meta = prepare.prepare(write_fixture(root), os.path.join(root, "out"), 1,
                           filter_config=None, progress=False)
    self.assertEqual(meta["count"], 6)
    self.assertEqual(_nonzero(meta["skipped"]),
                     {"unreadable_image": 1, "missing_file": 1,
                      "unreadable_file": 1, "bad_record": 1})

  def test_custom_filter_thresholds(self):
    root = _tempdir(self)
    meta = prepare.prepare(
        write_fixture(root), os.path.join(root, "out"), 1,
        filter_config=captions.CaptionFilterConfig(min_words=1), progress=False)
    self.assertNotIn("too_short", meta["caption_filter_reasons"])

  def test_max_side_shrinks_and_keeps_format(self):
    root = _tempdir(self)
    Image.new("RGB", (100, 50), (0, 0, 200)).save(os.path.join(root, "a.jpg"))
    Image.new("RGB", (30, 20), (0, 200, 0)).save(os.path.join(root, "b.png"))
    manifest = os.path.join(root, "m.jsonl")
    with open(manifest, "w") as f:
      for name in ("a.jpg", "b.png"):
        f.write(json.dumps({"image": name, "caption": GOOD[0], "key": name}) + "\n")
    dst = os.path.join(root, "out")
    prepare.prepare(manifest, dst, 1, max_side=40, progress=False)
    src = sources.ArrayRecordSource(dst)
    images = {src[i]["key"]: Image.open(io.BytesIO(src[i]["image"]))
              for i in range(2)}
    self.assertEqual(images["a.jpg"].size, (40, 20))
    self.assertEqual(images["a.jpg"].format, "JPEG")
    self.assertEqual(images["b.png"].size, (30, 20))  # small: untouched
    self.assertEqual(images["b.png"].format, "PNG")

  def test_tar_input(self):
    root = _tempdir(self)
    _write_tar(os.path.join(root, "0.tar"), [
        ("k0.png", _encode(Image.new("RGB", (8, 8)), "PNG")),
        ("k0.txt", GOOD[1].encode()),
        ("k1.txt", GOOD[2].encode())])
    meta = prepare.prepare(os.path.join(root, "*.tar"),
                           os.path.join(root, "out"), 1, progress=False)
    self.assertEqual(meta["count"], 1)
    self.assertEqual(_nonzero(meta["skipped"]), {"missing_file": 1})
    self.assertEqual(meta["num_input"], 2)

  def test_skip_reasons_are_the_pipelines(self):
    """prepare's report counts bad data under the names training does."""
    root = _tempdir(self)
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    _write_tar(os.path.join(root, "0.tar"), [
        ("good.png", png), ("good.txt", GOOD[0].encode()),
        ("latin1.png", png), ("latin1.txt", "caf\xe9 au lait".encode("latin-1")),
        ("blank.png", png), ("blank.txt", b"   "),
        ("nocaption.png", png)])
    meta = prepare.prepare(os.path.join(root, "*.tar"),
                           os.path.join(root, "out"), 1, progress=False)
    self.assertEqual(list(meta["skipped"]), list(pipeline.SKIP_REASONS))
    self.assertEqual(_nonzero(meta["skipped"]), {
        "bad_caption_encoding": 1, "empty_caption": 2})
    self.assertEqual(meta["skipped_keys"]["bad_caption_encoding"], ["latin1"])
    self.assertEqual(meta["count"], 1)
    manifest_meta = prepare.prepare(
        write_fixture(root), os.path.join(root, "out2"), 1, progress=False)
    self.assertEqual(list(manifest_meta["skipped"]),
                     list(pipeline.SKIP_REASONS))

  def test_bad_inputs_leave_nothing(self):
    root = _tempdir(self)
    manifest = write_fixture(root)
    with self.assertRaisesRegex(FileNotFoundError, "nope.jsonl"):
      prepare.prepare(os.path.join(root, "nope.jsonl"),
                      os.path.join(root, "out"), 1, progress=False)
    with self.assertRaisesRegex(ValueError, "num_shards"):
      prepare.prepare(manifest, os.path.join(root, "out"), 0, progress=False)
    self.assertFalse(os.path.exists(os.path.join(root, "out")))
    os.mkdir(os.path.join(root, "exists"))
    with self.assertRaisesRegex(FileExistsError, "exists"):
      prepare.prepare(manifest, os.path.join(root, "exists"), 1, progress=False)
    self.assertFalse([n for n in os.listdir(root) if ".tmp-" in n])

  def test_cli(self):
    root = _tempdir(self)
    manifest = write_fixture(root)
    dst = os.path.join(root, "cli_out")
    result = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.data.prepare", f"--src={manifest}",
         f"--dst={dst}", "--num_shards=1", "--tokenizer="],
        cwd=_REPO, capture_output=True, text=True, check=True)
    self.assertEqual(json.loads(result.stdout)["count"], 4)
    self.assertTrue(os.path.exists(os.path.join(dst, "metadata.json")))


if __name__ == "__main__":
  absltest.main()
