"""`pip install` of the wheel, then the demo, embed and the README's Python
API example from another directory: what a user of the package gets (issue 16).

The wheel is built from the checkout and installed into a fresh venv that sees
the test environment's dependencies but not the checkout (tests/wheel_env.py).
"""
import os
import re
import shutil
import subprocess
import tempfile
import zipfile

from absl.testing import absltest

from tests import wheel_env

try:
  import tomllib  # Python >= 3.11
except ModuleNotFoundError:
  tomllib = None

_REPO = wheel_env.REPO
# The demo, shrunk to a few seconds: 2 steps, a 16-scene evaluation.
_SMALL_DEMO = ["--config.num_train_steps=2", "--config.log_every=1",
               "--config.data.global_batch=8", "--config.data.synthetic_num=32",
               "--config.eval.synthetic_num=16", "--config.eval.batch_size=8",
               "--config.checkpoint_every=2", "--config.eval_every=2",
               "--config.pretrain77.steps=2"]


def readme_api_example() -> str:
  """The first python code block after README's "## Python API" heading."""
  with open(os.path.join(_REPO, "README.md")) as f:
    text = f.read()
  section = text.split("## Python API", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def package_dirs() -> set:
  """Package names of the checkout: fixclip_jax/**/ with __init__.py, + configs."""
  found = {"fixclip_jax.configs"}
  root = os.path.join(_REPO, "fixclip_jax")
  for parent, _, files in os.walk(root):
    if "__init__.py" in files:
      rel = os.path.relpath(parent, _REPO)
      found.add(rel.replace(os.sep, "."))
  return found


class PackageTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.wheel = wheel_env.build_wheel(os.path.join(cls.tmp, "dist"))
    cls.python = wheel_env.fresh_env(os.path.join(cls.tmp, "env"))
    wheel_env.install(cls.python, cls.wheel)
    cls.bin = os.path.dirname(cls.python)
    cls.cwd = os.path.join(cls.tmp, "elsewhere")  # not the checkout
    os.makedirs(cls.cwd)
    cls.env = wheel_env.clean_env(JAX_PLATFORMS="cpu")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _run(self, *cmd, timeout=600):
    return subprocess.run(list(cmd), cwd=self.cwd, env=self.env,
                          capture_output=True, text=True, timeout=timeout)

  def test_wheel_holds_every_package_configs_and_vocabulary(self):
    names = zipfile.ZipFile(self.wheel).namelist()
    packages = {os.path.dirname(n).replace("/", ".") for n in names
                if n.endswith(".py") and n.startswith("fixclip_jax/")}
    self.assertEqual(packages, package_dirs())
    if tomllib is not None:
      with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
      self.assertEqual(listed, package_dirs())
    configs = {os.path.basename(n)[:-3] for n in names
               if n.startswith("fixclip_jax/configs/")}
    self.assertEqual(configs, {os.path.splitext(n)[0] for n in
                               os.listdir(os.path.join(_REPO, "configs"))
                               if n.endswith(".py")})
    self.assertIn("fixclip_jax/data/bpe_simple_vocab_16e6.txt.gz", names)
    # Every console script is installed.
    for name in ("train", "convert", "embed", "prepare", "synthetic", "caption",
                 "bench", "data-bench", "tokenizer-bench", "ablate"):
      self.assertTrue(os.path.isfile(os.path.join(self.bin, f"fixclip-{name}")), name)

  def test_demo_embed_and_api_from_the_installed_wheel(self):
    where = self._run(self.python, "-c", "import fixclip_jax, fixclip_jax.cli; "
                      "print(fixclip_jax.__file__)")
    self.assertEqual(where.returncode, 0, where.stderr[-3000:])
    self.assertTrue(where.stdout.startswith(os.path.join(self.tmp, "env")), where.stdout)

    workdir = os.path.join(self.tmp, "fixclip_demo")
    train = self._run(os.path.join(self.bin, "fixclip-train"), "--config=demo",
                      f"--workdir={workdir}", *_SMALL_DEMO)
    self.assertEqual(train.returncode, 0, train.stderr[-3000:])
    lines = train.stdout.strip().splitlines()
    print(f"[package] fixclip-train stdout ({len(lines)} lines):\n" + train.stdout)
    self.assertLess(len(lines), 30)
    self.assertTrue(lines[0].startswith("Config demo: tiny model"), lines[0])
    self.assertEqual(lines[-1], f"Report: {workdir}/eval_results.md")
    self.assertIn("| CLIP-77 (start) | 2 | synthetic-long |", train.stdout)
    self.assertIn("| tiny | 2 | synthetic-long77 |", train.stdout)
    self.assertNotRegex(train.stdout + train.stderr, r"(?m)^I\d{4} ")

    texts = os.path.join(self.cwd, "texts.txt")
    with open(texts, "w") as f:
      f.write("a red circle\na blue square on a white background\n")
    out = os.path.join(self.cwd, "features.npz")
    embed = self._run(os.path.join(self.bin, "fixclip-embed"),
                      f"--checkpoint={workdir}", f"--texts={texts}",
                      f"--images={workdir}/eval_data/*/images/*.png", f"--out={out}",
                      "--batch_size=8")
    self.assertEqual(embed.returncode, 0, embed.stderr[-3000:])
    self.assertIn(f"Wrote {out}: 2 text and 16 image features", embed.stdout)

    example = readme_api_example().replace("/tmp/fixclip_demo", workdir)
    api = self._run(self.python, "-c", example + "\nprint('shapes', "
                    "image_features.shape, text_features.shape)\n")
    self.assertEqual(api.returncode, 0, api.stderr[-3000:])
    self.assertIn("shapes (8, 64) (2, 64)", api.stdout)
    print("[package] README Python API example output:\n" + api.stdout)

  def test_user_errors_are_one_line_with_status_2(self):
    workdir = os.path.join(self.tmp, "bad")
    train = os.path.join(self.bin, "fixclip-train")
    cases = {
        "--config.optim.lrr=0.1": "--config.optim.lrr: no such config key (did you "
                                  "mean optim.lr?)",
        "--config.num_train_steps=many": "--config.num_train_steps=many",
        "--mode=evaluate": "--mode=evaluate: value should be one of",
        "--config=no_such_config": "names: clip_b16, demo, fixclip_b16",
    }
    for arg, message in cases.items():
      proc = self._run(train, f"--workdir={workdir}", arg)
      self.assertEqual(proc.returncode, 2, (arg, proc.stderr[-2000:]))
      self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
      self.assertTrue(proc.stderr.startswith("fixclip-train: error: "), proc.stderr)
      self.assertIn(message, proc.stderr)
    self.assertFalse(os.path.exists(workdir))  # nothing written
    missing = self._run(os.path.join(self.bin, "fixclip-embed"),
                        f"--checkpoint={workdir}", "--texts=nowhere.txt",
                        "--out=x.npz")
    self.assertEqual(missing.returncode, 2, missing.stderr[-2000:])
    self.assertIn("--texts=nowhere.txt: no such file", missing.stderr)
    help_text = self._run(train, "--help")  # (absl exits 1 after --help)
    self.assertIn("docs/method.md", help_text.stdout)
    self.assertIn("--config=NAME|PATH", help_text.stdout)


if __name__ == "__main__":
  absltest.main()
