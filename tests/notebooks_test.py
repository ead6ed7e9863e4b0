"""The Colab notebooks (notebooks/) run headless from top to bottom, against
the installed package as a Colab user gets it.

The kernel runs in a fresh venv that has the dependencies but not fixclip_jax
(tests/wheel_env.py): the notebooks' first cell installs it, from the wheel
built from this checkout (FIXCLIP_PACKAGE, where Colab uses the repository
URL), and every notebook runs in a temporary directory outside the checkout,
loading configs by name from the installed package. Each notebook is executed
with nbclient after a cell that shrinks its "parameters" cell (as papermill
injects parameters) so all three take a few minutes of CPU. Any cell error
fails the test; the notebooks assert their own numbers too (e.g. notebook 01's
PyTorch-vs-JAX feature errors), and the tests check the files and figures they
leave behind.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict
from unittest import mock

from absl.testing import absltest
import nbclient
import nbformat

from tests import wheel_env

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = os.path.join(_REPO, "notebooks")
_CONVERT = "01_convert_and_compare.ipynb"
_TRAIN = "02_train_tiny_fixclip.ipynb"
_SEARCH = "03_search_images.ipynb"
_CELL_TIMEOUT_S = 300
_KERNEL = "fixclip-wheel"

# The small CI setting of each notebook's parameters cell.
_SMALL = {
    _CONVERT: {"BATCH": 2},
    _TRAIN: {"PRETRAIN_STEPS": 4, "NUM_STEPS": 6, "BATCH": 8, "NUM_TRAIN_SCENES": 64,
             "NUM_EVAL_SCENES": 16, "NUM_EXAMPLES": 2},
    _SEARCH: {"NUM_IMAGES": 12, "QUERY_SCENE": 2, "TOP_K": 3},
}


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(_NOTEBOOKS, name), as_version=4)


def _parameters_index(nb) -> int:
  found = [i for i, c in enumerate(nb.cells)
           if "parameters" in c.metadata.get("tags", [])]
  if len(found) != 1:
    raise AssertionError(f"expected one cell tagged 'parameters', found {len(found)}")
  return found[0]


def _with_parameters(nb, overrides: Dict[str, object]):
  """Inserts an assignment cell after the parameters cell. Every name must be
  assigned in that cell, so a renamed parameter cannot go silently unshrunk."""
  index = _parameters_index(nb)
  source = nb.cells[index].source
  for name in overrides:
    if not re.search(rf"^{name}\s*=", source, re.M):
      raise AssertionError(f"parameter {name} is not assigned in the parameters cell")
  cell = nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


class WheelKernel:
  """A Jupyter kernel in a fresh venv without fixclip_jax, whose notebooks
  install it from a wheel of this checkout (FIXCLIP_PACKAGE)."""

  def __init__(self, root: str):
    self.wheel = wheel_env.build_wheel(os.path.join(root, "dist"))
    self.python = wheel_env.fresh_env(os.path.join(root, "env"))
    self.jupyter_path = os.path.join(root, "jupyter")
    spec_dir = os.path.join(self.jupyter_path, "kernels", _KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
      json.dump({"argv": [self.python, "-m", "ipykernel_launcher", "-f",
                          "{connection_file}"],
                 "display_name": "fixclip_jax wheel", "language": "python"}, f)

  def installed_package(self) -> str:
    """Where the kernel's python imports fixclip_jax from ("" if it cannot)."""
    proc = subprocess.run(
        [self.python, "-c", "import importlib.util as u; "
         "s = u.find_spec('fixclip_jax'); print(s.origin if s else '')"],
        capture_output=True, text=True, env=wheel_env.clean_env(), cwd="/")
    return proc.stdout.strip()

  def execute(self, name: str, workdir: str, overrides=None) -> nbformat.NotebookNode:
    nb = _with_parameters(_read(name), overrides if overrides is not None
                          else _SMALL[name])
    client = nbclient.NotebookClient(
        nb, timeout=_CELL_TIMEOUT_S, kernel_name=_KERNEL,
        resources={"metadata": {"path": workdir}})
    # The kernel stays on the CPU and cannot see this checkout.
    env = {"JUPYTER_PATH": self.jupyter_path, "FIXCLIP_PACKAGE": self.wheel,
           "JAX_PLATFORMS": "cpu"}
    with mock.patch.dict(os.environ, env):
      os.environ.pop("PYTHONPATH", None)
      client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _stdout(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs
                 if o.output_type == "stream" and o.get("name") == "stdout")


def _num_images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells
             if c.cell_type == "code" for o in c.outputs)


class StaticTest(absltest.TestCase):

  def test_clean_and_colab_ready(self):
    for name in (_CONVERT, _TRAIN, _SEARCH):
      nb = _read(name)
      nbformat.validate(nb)
      code = [c for c in nb.cells if c.cell_type == "code"]
      self.assertTrue(all(not c.outputs and c.execution_count is None for c in code),
                      f"{name}: commit notebooks without outputs")
      # First cell: install from the repository only where fixclip_jax is missing.
      install = code[0].source
      self.assertIn('REPO_URL = "https://github.com/', install)
      self.assertIn('find_spec("fixclip_jax") is None', install)
      self.assertIn("pip install", install)
      self.assertIn('os.environ.get("FIXCLIP_PACKAGE")', install)
      # Configs come from the package, not from a checkout or a download.
      source = "".join(c.source for c in code)
      self.assertNotIn("configs/", source)
      self.assertNotIn("urlretrieve", source)
      self.assertEqual(nb.metadata.kernelspec.name, "python3")
      _parameters_index(nb)


class RunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.kernel = WheelKernel(cls.root)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def tearDown(self):
    # Whichever notebook ran first installed the wheel into the kernel's venv.
    self.assertTrue(self.kernel.installed_package().startswith(
        os.path.join(self.root, "env")), self.kernel.installed_package())
    super().tearDown()

  def test_convert_and_compare(self):
    with tempfile.TemporaryDirectory() as tmp:
      nb = self.kernel.execute(_CONVERT, tmp)
    out = _stdout(nb)
    errors = {m.group(1).strip(): float(m.group(2)) for m in
              re.finditer(r"^(.+?)\s+max rel error (\S+)$", out, re.M)}
    self.assertSameElements(errors, ["open_clip image", "open_clip text", "HF image",
                                     "HF text", "open_clip reloaded image",
                                     "HF reloaded text"])
    for name, err in errors.items():
      self.assertLess(err, 1e-4, name)

  def test_train_then_search_with_the_trained_model(self):
    small = _SMALL[_TRAIN]
    with tempfile.TemporaryDirectory() as tmp:
      nb = self.kernel.execute(_TRAIN, tmp)
      with open(os.path.join(tmp, "fixclip_demo_run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual(max(r["step"] for r in rows if "loss" in r), small["NUM_STEPS"])
      with open(os.path.join(tmp, "fixclip_demo_run", "eval_results.json")) as f:
        protocols = {r["protocol"] for r in json.load(f)["results"]}
      self.assertEqual(protocols, {"synthetic-late", "synthetic-long",
                                   "synthetic-long77", "synthetic-short"})
      with open(os.path.join(tmp, "fixclip_demo_run", "eval_results.json")) as f:
        models = {r["model"] for r in json.load(f)["results"]}
      self.assertEqual(models, {"tiny", "CLIP-77 (start)"})
      self.assertTrue(os.path.isfile(os.path.join(tmp, "fixclip_demo_model",
                                                  "model_config.json")))
      self.assertGreaterEqual(_num_images(nb), 2)  # loss curve, retrieval examples
      self.assertIn(f"of {small['NUM_EVAL_SCENES']} scenes", _stdout(nb))

      nb = self.kernel.execute(_SEARCH, tmp)
    out = _stdout(nb)
    self.assertIn("Using the trained checkpoint fixclip_demo_model", out)
    self.assertRegex(out, rf"the described scene is match #\d+ of {_SMALL[_SEARCH]['NUM_IMAGES']}")
    self.assertEqual(_num_images(nb), 1)

  def test_search_without_a_checkpoint_converts_a_random_model(self):
    with tempfile.TemporaryDirectory() as tmp:
      nb = self.kernel.execute(_SEARCH, tmp, dict(_SMALL[_SEARCH], QUERY="a red star and a blue "
                                       "square on a white background", TOP_K=2))
      self.assertTrue(os.path.isdir(os.path.join(tmp, "random_longclip_tiny")))
    out = _stdout(nb)
    self.assertIn("converted a random model (longclip layout)", out)
    self.assertNotIn("described scene", out)  # a free-text query has no target
    self.assertRegex(out, r"#1 \d+\.png score")


if __name__ == "__main__":
  absltest.main()
