"""`fixclip-convert` exports of a FIX-CLIP model, as a user runs them (issue 26).

--to=hf and --to=hf_text treat FIX-CLIP's extras (regional prompts, mask
token, GTA heads) alike: both write without them and say so in one warning
line; neither needs --drop_extra. Without PyTorch (the base install), a .pt
source or destination is one error line naming the extra, before anything is
read or written; .safetensors needs no torch. "Without PyTorch" is a real
subprocess in which `import torch` fails (sys.modules["torch"] = None).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import safetensors.numpy

from fixclip_jax import checkpoint
from fixclip_jax import convert
from fixclip_jax import layouts
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the CLI as `python -m fixclip_jax.convert ARGS`, torch unimportable.
_NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
             "runpy.run_module('fixclip_jax.convert', run_name='__main__', "
             "alter_sys=True)")


def _convert(*args: str, torch: bool = True) -> subprocess.CompletedProcess:
  head = ([sys.executable, "-m", "fixclip_jax.convert"] if torch
          else [sys.executable, "-c", _NO_TORCH])
  return subprocess.run(head + list(args), cwd=_ROOT, capture_output=True,
                        text=True, timeout=300)


def _warnings(stderr: str):
  """absl's warning lines (W<month><day> ...)."""
  return [l for l in stderr.splitlines() if l[:1] == "W" and l[1:5].isdigit()]


class ExportCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    # A FIX-CLIP model as the demo trains it (248 tokens, two position
    # tables, prompts, mask token, GTA heads on both towers).
    cls.cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                               num_prompts=2, mask_token=True, gta_groups=2)
    cls.params = jax.device_get(clip.init_params(cls.cfg, jax.random.PRNGKey(3)))
    cls.model = os.path.join(cls.tmp, "fixclip_model")
    checkpoint.save_model(cls.model, cls.params, cls.cfg)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_hf_and_hf_text_drop_the_extras_alike_with_one_warning(self):
    extras = [r.torch_keys[0] for r in layouts.fixclip_rules(self.cfg)]
    self.assertNotEmpty(extras)
    for to, effect in (("hf", "image features are plain CLIP's"),
                       ("hf_text", "no feature changes")):
      with self.subTest(to):
        dst = os.path.join(self.tmp, f"out_{to}")
        proc = _convert(f"--src={self.model}", f"--dst={dst}", f"--to={to}")
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn(f"Wrote {dst} ({to})", proc.stdout)
        warned = [l for l in _warnings(proc.stderr) if "FIX-CLIP" in l]
        self.assertLen(warned, 1, proc.stderr)
        self.assertRegex(warned[0], "without FIX-CLIP's regional prompts "
                         r"\(2 per prompted layer\), mask token, 2 GTA head")
        self.assertIn(effect, warned[0])
        with open(os.path.join(dst, "model.safetensors"), "rb") as f:
          keys = set(safetensors.numpy.load(f.read()))
        self.assertFalse({k for k in keys if "fixclip" in k or "gta" in k
                          or "prompt" in k or "mask_token" in k}, keys)
        with open(os.path.join(dst, "config.json")) as f:
          text = json.load(f)
        text = text.get("text_config", text)
        self.assertEqual(text["max_position_embeddings"], 248)
    # Both wrote the same text tower: the extras changed nothing there.
    def text_tower(name):
      with open(os.path.join(self.tmp, name, "model.safetensors"), "rb") as f:
        return {k: v for k, v in safetensors.numpy.load(f.read()).items()
                if k.startswith("text_model.") or k == "text_projection.weight"}
    full, text_only = text_tower("out_hf"), text_tower("out_hf_text")
    self.assertEqual(sorted(full), sorted(text_only))
    for k in full:
      np.testing.assert_array_equal(full[k], text_only[k], err_msg=k)
    # The openai layout keeps them (fixclip.* keys) unless --drop_extra.
    for drop, expected in ((False, set(extras)), (True, set())):
      dst = os.path.join(self.tmp, f"out_{drop}.safetensors")
      proc = _convert(f"--src={self.model}", f"--dst={dst}", "--to=openai",
                      *(["--drop_extra"] if drop else []))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      with open(dst, "rb") as f:
        keys = set(safetensors.numpy.load(f.read()))
      self.assertEqual({k for k in keys if k.startswith("fixclip.")}, expected)

  def test_pt_without_torch_is_one_line_naming_the_extra(self):
    pt = os.path.join(self.tmp, "model.pt")
    convert.save_openai(pt, self.params, self.cfg)  # torch is here, in the test
    for args, what in (
        ([f"--src={self.model}", f"--dst={self.tmp}/no_torch.pt", "--to=openai"],
         "writing a .pt file"),
        ([f"--src={pt}", f"--dst={self.tmp}/no_torch_model"],
         "reading a PyTorch file")):
      with self.subTest(what):
        proc = _convert(*args, torch=False)
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        lines = proc.stderr.strip().splitlines()
        self.assertLen(lines, 1, proc.stderr)
        self.assertIn(what, lines[0])
        self.assertIn("needs PyTorch, which is not installed: pip install "
                      "'fixclip_jax[torch]'", lines[0])
        self.assertTrue(lines[0].startswith("fixclip_jax.convert: error: "), lines[0])
        self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse([n for n in os.listdir(self.tmp) if n.startswith("no_torch")])
    # The torch-free paths work in the same torch-less interpreter.
    dst = os.path.join(self.tmp, "torch_free.safetensors")
    proc = _convert(f"--src={self.model}", f"--dst={dst}", "--to=openai",
                    torch=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertTrue(os.path.isfile(dst))


if __name__ == "__main__":
  absltest.main()
