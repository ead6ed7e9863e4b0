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
from fixclip_jax.data import tokenizers

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
      # Long-CLIP's rule (method.md §2), written out, and the pipeline's.
      self.assertEqual(short, caption.replace("\n", " ").split(". ")[0])
      self.assertEqual(short, captions.first_sentence(caption))
      self.assertIn("\n", caption)  # paragraph break, as in ShareGPT4V
      self.assertBetween(len(caption.split()), 100, 180)
      # The short caption is a global summary: every shape, no sizes or places.
      for obj in objects:
        self.assertIn(f"{obj['colour']} {obj['shape']}", short)
        self.assertIn(f"{obj['size']} {obj['colour']} {obj['shape']} in "
                      f"{synthetic.POSITIONS[obj['cell']]}", caption)
        self.assertNotIn(f"{obj['size']} {obj['colour']}", short)
      self.assertNotIn("corner", short)
      # Salience order: larger shapes are described first.
      sizes = list(synthetic.SIZES)
      if not ex["scene"]["late_twin"]:
        ranks = [sizes.index(o["size"]) for o in objects]
        self.assertEqual(ranks, sorted(ranks, reverse=True))

  def test_late_twins_differ_only_after_token_77(self):
    tok = tokenizers.get_tokenizer("clip")
    examples = synthetic.synthetic_examples(120, image_size=32, seed=5)
    num_twins = 0
    for a, b in zip(examples[0::2], examples[1::2]):
      self.assertEqual(a["scene"]["late_twin"], b["scene"]["late_twin"])
      cut_a, cut_b = tok([a["caption"], b["caption"]], 77)
      full_a, full_b = tok([a["caption"], b["caption"]], 248)
      for full in (full_a, full_b):  # nothing is cut at 248 tokens
        self.assertLess(int((full > 0).sum()), 248)
      self.assertFalse(np.array_equal(full_a, full_b))
      self.assertNotEqual(a["image"], b["image"])
      if a["scene"]["late_twin"]:
        num_twins += 1
        # What a 77-token text tower reads is the same; the summary too.
        np.testing.assert_array_equal(cut_a, cut_b)
        self.assertEqual(a["short_caption"], b["short_caption"])
        early = synthetic.EARLY_OBJECTS
        self.assertEqual(a["scene"]["objects"][:early],
                         b["scene"]["objects"][:early])
        self.assertNotEqual(
            [o["cell"] for o in a["scene"]["objects"][early:]],
            [o["cell"] for o in b["scene"]["objects"][early:]])
      else:
        self.assertFalse(np.array_equal(cut_a, cut_b))
    self.assertBetween(num_twins, 15, 45)  # late_detail_share 0.5 of 60 pairs

  def test_late_detail_share(self):
    def twins(share, num_objects=4):
      return [synthetic.scene_for_index(i, 7, num_objects, share)["late_twin"]
              for i in range(0, 200, 2)]
    self.assertEqual(sum(twins(0.0)), 0)
    self.assertEqual(sum(twins(1.0)), 100)
    low, high = twins(0.3), twins(0.7)
    self.assertBetween(sum(low), 15, 45)
    self.assertBetween(sum(high), 55, 85)
    # A larger share keeps every twin pair of a smaller one.
    self.assertTrue(all(h for l, h in zip(low, high) if l))
    # Two shapes are all early: no twins.
    self.assertEqual(sum(twins(1.0, num_objects=2)), 0)
    with self.assertRaisesRegex(ValueError, "late_detail_share"):
      synthetic.scene_for_index(0, late_detail_share=1.5)

  def test_a_twin_family_is_one_scene_and_distinct_late_twins(self):
    size = 16
    family = [synthetic.scene_for_index(i, 3, 4, 1.0, late_family_size=size)
              for i in range(size, 2 * size)]  # the second family
    early = synthetic.EARLY_OBJECTS
    self.assertTrue(all(s["late_twin"] for s in family))
    self.assertLen({synthetic.summary_sentence(s) for s in family}, 1)
    self.assertTrue(all(s["objects"][:early] == family[0]["objects"][:early]
                        for s in family))
    late = {tuple((o["cell"], o["size"]) for o in s["objects"][early:])
            for s in family}
    self.assertLen(late, size)                  # no two members alike
    # The next family is another scene.
    self.assertNotEqual(
        synthetic.scene_for_index(2 * size, 3, 4, 1.0, size)["objects"][:early],
        family[0]["objects"][:early])
    # Without twins a family is `size` fresh scenes.
    fresh = [synthetic.scene_for_index(i, 3, 4, 0.0, size) for i in range(size)]
    self.assertLen({synthetic.summary_sentence(s) for s in fresh}, size)

  def test_a_family_larger_than_the_late_layouts_is_an_error(self):
    # Three shapes: one late shape, 7 cells x 3 sizes = 21 layouts at most.
    with self.assertRaisesRegex(ValueError, "late_family_size=30"):
      synthetic.scene_for_index(29, 0, 3, 1.0, late_family_size=30)
    with self.assertRaisesRegex(ValueError, "late_family_size=1 "):
      synthetic.scene_for_index(0, late_family_size=1)

  def test_image_shows_the_described_objects(self):
    for index in (6, 7):  # a late twin pair (late_detail_share=1)
      ex = synthetic.synthetic_example(index, image_size=90, seed=0,
                                       late_detail_share=1.0)
      self.assertTrue(ex["scene"]["late_twin"])
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
    subprocess.run([sys.executable, "-m", "fixclip_jax.data.make_synthetic",
                    "--num=4", f"--dst={dst}", "--image_size=16",
                    "--late_detail_share=1"],
                   check=True, cwd=_REPO, capture_output=True)
    self.assertLen(os.listdir(os.path.join(dst, "images")), 4)
    with open(os.path.join(dst, "manifest.jsonl")) as f:
      self.assertTrue(all(json.loads(line)["scene"]["late_twin"] for line in f))


if __name__ == "__main__":
  absltest.main()
