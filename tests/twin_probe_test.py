"""Tests for fixclip_jax.tools.twin_probe."""
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from fixclip_jax import api
from fixclip_jax import checkpoint
from fixclip_jax.data import synthetic
from fixclip_jax.models import clip
from fixclip_jax.models.sizes import get_config
from fixclip_jax.tools import twin_probe

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TwinProbeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.data = os.path.join(cls.root, "twins")
    # Every pair a late twin.
    synthetic.make_synthetic_dataset(cls.data, 6, image_size=32, seed=0,
                                     late_detail_share=1.0)
    cls.models = {}
    for context in (77, 248):
      cfg = get_config("tiny", context_length=context)
      params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(0)))
      path = os.path.join(cls.root, f"model{context}")
      checkpoint.save_model(path, params, cfg)
      cls.models[context] = path

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_a_77_token_reader_cannot_tell_twins_apart_and_248_can(self):
    pairs = twin_probe.twin_pairs(self.data, 10)
    self.assertLen(pairs, 3)
    cut = twin_probe.probe(api.load(self.models[77]), pairs)
    self.assertAlmostEqual(cut["text_cos_mean"], 1.0, places=5)
    self.assertAlmostEqual(cut["text_cos_min"], 1.0, places=5)
    full = twin_probe.probe(api.load(self.models[248]), pairs)
    self.assertLess(full["text_cos_min"], 0.99999)
    # Images of twins differ whatever the text context.
    self.assertLess(cut["image_cos_min"], 0.99999)
    self.assertEqual(cut["margin_positive"], 0.0)  # ties are not wins

  def test_detail_probes_change_the_first_shape_and_see_it(self):
    for detail in twin_probe.DETAILS:
      changes = twin_probe.detail_changes(self.data, 4, detail)
      self.assertLen(changes, 4)
      for scene, changed in changes:
        key = {"size": "size", "place": "cell"}[detail]
        self.assertNotEqual(scene["objects"][0][key],
                            changed["objects"][0][key])
        self.assertEqual(scene["objects"][1:], changed["objects"][1:])
        cells = [o["cell"] for o in changed["objects"]]
        self.assertLen(set(cells), len(cells))      # still one shape a cell
        if detail == "size":                        # one word
          words = synthetic.describe_scene(scene).split()
          other = synthetic.describe_scene(changed).split()
          self.assertEqual(sum(a != b for a, b in zip(words, other)), 1)
      # A 77-token model sees the change in both towers (cos < 1); the same
      # scene twice gives exactly 1.
      model = api.load(self.models[77])
      seen = twin_probe.detail_probe(model, changes, 32)
      self.assertLess(seen["text_cos"], 0.99999)
      self.assertLess(seen["image_cos"], 0.99999)
      same = twin_probe.detail_probe(model, [(a, a) for a, _ in changes], 32)
      self.assertAlmostEqual(same["text_cos"], 1.0, places=5)
      self.assertAlmostEqual(same["image_cos"], 1.0, places=5)

  def test_pairs_without_twins_or_manifest_are_one_line_errors(self):
    no_twins = os.path.join(self.root, "no_twins")
    synthetic.make_synthetic_dataset(no_twins, 4, image_size=16,
                                     late_detail_share=0.0)
    with self.assertRaisesRegex(Exception, "no late-twin pairs"):
      twin_probe.twin_pairs(no_twins, 5)
    with self.assertRaisesRegex(Exception, "no manifest.jsonl"):
      twin_probe.twin_pairs(self.root, 5)

  def test_cli_prints_one_row_per_model(self):
    out = subprocess.run(
        [sys.executable, "-m", "fixclip_jax.tools.twin_probe",
         f"--data={self.data}", f"--runs={self.models[77]},{self.models[248]}",
         "--pairs=2"], check=True, cwd=_REPO, capture_output=True, text=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    self.assertLen(rows, 3)                     # header + two models
    self.assertIn("| 1.0000 (1.0000) |", rows[1])
    self.assertIn("size text cos | size image cos | place text cos | "
                  "place image cos |", rows[0])
    self.assertLen(rows[1].split("|"), 11)
    self.assertTrue(rows[2].startswith(f"| {self.models[248]} | 2 |"))


if __name__ == "__main__":
  absltest.main()
