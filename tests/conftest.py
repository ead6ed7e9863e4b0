"""pytest setup: 8 virtual CPU devices so sharding tests see a real mesh, and
one persistent XLA cache for the whole session.

Most test files train or evaluate the demo model (configs/demo.py) in-process
or in subprocesses (the CLI, the wheel, notebooks, two-process runs), and each
run builds its jitted step anew, so XLA compiled the same programs dozens of
times: on 2 cores compiles were most of the suite's CPU time. A cache folder
for the session (set before jax is imported, inherited by every subprocess)
turns each repeat into a read. A folder the caller already set is kept.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="fixclip_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
