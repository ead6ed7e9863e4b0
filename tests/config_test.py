"""config_base: configs load light, and the data section names its knobs once."""
import glob
import json
import os
import subprocess
import sys

from absl.testing import absltest

from fixclip_jax import config_base
from fixclip_jax.data import captions

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The input pipeline's dependencies: a config must not need them to load.
_HEAVY = ("grain", "PIL", "tensorflow")

_LOAD_EVERY_CONFIG = """
import glob, json, os, sys
from fixclip_jax import config_base
for path in sorted(glob.glob(os.path.join("configs", "*.py"))):
  config_base.load_config_file(path)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


class ConfigImportTest(absltest.TestCase):

  def test_loading_every_config_imports_no_data_pipeline(self):
    self.assertNotEmpty(glob.glob(os.path.join(_ROOT, "configs", "*.py")))
    proc = subprocess.run([sys.executable, "-c", _LOAD_EVERY_CONFIG],
                          cwd=_ROOT, capture_output=True, text=True,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    self.assertIn("fixclip_jax", loaded)  # the probe did run
    self.assertEqual(sorted(loaded & set(_HEAVY)), [])


class DataSectionTest(absltest.TestCase):

  def test_filter_defaults_are_the_caption_filters(self):
    filters = config_base.base_config().data.filters.to_dict()
    self.assertEqual(filters, captions.filter_thresholds())
    # The config's thresholds are exactly what CaptionFilterConfig takes.
    self.assertEqual(captions.CaptionFilterConfig.from_mapping(filters),
                     captions.CaptionFilterConfig())

  def test_tokenizer_knob_defaults_to_clip(self):
    self.assertEqual(config_base.base_config().data.tokenizer, "clip")


if __name__ == "__main__":
  absltest.main()
