"""Tests for fixclip_jax.data.synthetic."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from fixclip_jax.data import captions
from fixclip_jax.data import synthetic

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tempdir(test: absltest.TestCase) -> str:
  """A fresh folder removed after the test (works without parsed flags)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class SyntheticTest(absltest.TestCase):

  def test_deterministic_given_seed_and_index(self):
    a = synthetic.synthetic_examples(5, image_size=48, seed=3)
    b = synthetic.synthetic_examples(8, image_size=48, seed=3)[:5]
    c = synthetic.synthetic_examples(5, image_size=48, seed=4)
    for x, y in zip(a, b):
      self.assertEqual(x["image"], y["image"])
      self.assertEqual(x["caption"], y["caption"])
    self.assertNotEqual([x["caption"] for x in a], [x["caption"] for x in c])

  def test_examples_are_distinct(self):
    examples = synthetic.synthetic_examples(50, image_size=32)
    self.assertLen({e["caption"] for e in examples}, 50)
    self.assertLen({e["image"] for e in examples}, 50)

  def test_caption_content(self):
    for ex in synthetic.synthetic_examples(20, image_size=32, seed=1):
      caption, short = ex["caption"], ex["short_caption"]
      objects = ex["scene"]["objects"]
      self.assertLen(objects, 4)
      self.assertEqual(short, captions.first_sentence(caption))
      self.assertBetween(len(caption.split()), 60, 150)
      # The short caption names the salient (largest) object and nothing else.
      first = objects[0]
      self.assertIn(f"{first['size']} {first['colour']} {first['shape']}", short)
      sizes = list(synthetic.SIZES)
      self.assertEqual(sizes.index(first["size"]),
                       max(sizes.index(o["size"]) for o in objects))
      for obj in objects[1:]:
        self.assertNotIn(obj["colour"], short.split())
        self.assertIn(f"{obj['size']} {obj['colour']} {obj['shape']} in "
                      f"{synthetic.POSITIONS[obj['cell']]}", caption)

  def test_image_shows_the_described_objects(self):
    ex = synthetic.synthetic_example(7, image_size=90, seed=0)
    img = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"))
    self.assertEqual(img.shape, (90, 90, 3))
    for obj in ex["scene"]["objects"]:
      row, col = divmod(obj["cell"], 3)
      centre = img[int((row + 0.5) * 30), int((col + 0.5) * 30)]
      np.testing.assert_array_equal(centre, synthetic.COLOURS[obj["colour"]])

  def test_make_synthetic_dataset(self):
    dst = os.path.join(_tempdir(self), "shapes")
    manifest = synthetic.make_synthetic_dataset(dst, 4, image_size=32, seed=2)
    with open(manifest) as f:
      lines = [json.loads(line) for line in f]
    self.assertLen(lines, 4)
    expected = synthetic.synthetic_examples(4, image_size=32, seed=2)
    for line, ex in zip(lines, expected):
      with open(os.path.join(dst, line["image"]), "rb") as f:
        self.assertEqual(f.read(), ex["image"])
      self.assertEqual(line["caption"], ex["caption"])
    with self.assertRaisesRegex(FileExistsError, "shapes"):
      synthetic.make_synthetic_dataset(dst, 4)
    self.assertEqual(sorted(os.listdir(os.path.dirname(dst))), ["shapes"])

  def test_cli(self):
    dst = os.path.join(_tempdir(self), "cli")
    subprocess.run([sys.executable, "-m", "fixclip_jax.data.synthetic",
                    "--num=3", f"--dst={dst}", "--image_size=16"],
                   check=True, cwd=_REPO, capture_output=True)
    self.assertLen(os.listdir(os.path.join(dst, "images")), 3)


if __name__ == "__main__":
  absltest.main()
