"""A fresh Python environment with fixclip_jax installed from its wheel, for
the tests that check what a user of `pip install` gets (package_test.py,
notebooks_test.py).

The environment is a venv made from the test interpreter whose sys.path also
holds that interpreter's installed packages (the dependencies) through a
folder of links to them, leaving out fixclip_jax itself (an editable install
of the checkout). So `pip install fixclip_jax-*.whl` in it resolves every
dependency locally (no network) and installs the package for real, and
`import fixclip_jax` there can only find the wheel's copy.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = ("fixclip_jax", "__editable__", "__editable___fixclip_jax")


# What a wheel is built from (pyproject.toml names the rest).
_SOURCES = ("pyproject.toml", "README.md", "fixclip_jax", "configs")


def build_wheel(out_dir: str) -> str:
  """`pip wheel --no-deps` of the checkout into out_dir; the wheel's path.

  It builds from a copy of the sources: setuptools leaves build/ in the tree
  it builds, whose stale files could end up in a later wheel.
  """
  source = os.path.join(out_dir, "source")
  for name in _SOURCES:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(source, name),
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      os.makedirs(source, exist_ok=True)
      shutil.copy(src, source)
  cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out_dir]
  if importlib.util.find_spec("setuptools") is not None:
    cmd.append("--no-build-isolation")  # the installed setuptools: no download
  # (Otherwise pip fetches setuptools from PyPI into an isolated build env.)
  subprocess.run(cmd + [source], check=True, capture_output=True, text=True,
                 timeout=600)
  (wheel,) = glob.glob(os.path.join(out_dir, "fixclip_jax-*.whl"))
  return wheel


def _link_dependencies(farm: str) -> None:
  """farm/NAME -> each entry of this interpreter's site-packages but ours."""
  os.makedirs(farm)
  site = sysconfig.get_paths()["purelib"]
  for name in os.listdir(site):
    if name.startswith(_OWN) or name.endswith(".pth"):
      continue
    os.symlink(os.path.join(site, name), os.path.join(farm, name))


def fresh_env(root: str) -> str:
  """A venv under root seeing our dependencies but not fixclip_jax; its python."""
  venv = os.path.join(root, "venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv],
                 check=True, capture_output=True, text=True, timeout=300)
  python = os.path.join(venv, "bin", "python")
  site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip()
  farm = os.path.join(root, "dependencies")
  _link_dependencies(farm)
  with open(os.path.join(site, "fixclip_test_dependencies.pth"), "w") as f:
    f.write(farm + "\n")
  return python


def install(python: str, wheel: str) -> None:
  """pip install --no-deps the wheel into the venv of `python`."""
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheel],
                 check=True, capture_output=True, text=True, timeout=600)


def clean_env(**extra) -> dict:
  """os.environ without what would point Python at the checkout."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(extra)
  return env
