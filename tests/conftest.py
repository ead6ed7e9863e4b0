"""pytest setup: 8 virtual CPU devices so sharding tests see a real mesh, and
one persistent XLA cache for the whole session.

Most test files train or evaluate the demo model (configs/demo.py) in-process
or in subprocesses (the CLI, the wheel, notebooks, two-process runs), and each
run builds its jitted step anew, so XLA compiled the same programs dozens of
times: on 2 cores compiles were most of the suite's CPU time. A cache folder
for the session (set before jax is imported, inherited by every subprocess)
turns each repeat into a read. A folder the caller already set is kept.

README's command runs two pytest workers (pytest-xdist `-n 2`; workers and
subprocesses inherit this environment, so they share the folder). JAX
writes a cache entry in place, so a process could read another's half
written entry (a warning on stderr, which the quiet-exit tests forbid, and a
recompile): a size limit turns on JAX's file lock around every read and
write.

Each worker runs about half the suite in one process, and compiled programs
and freed arrays piled up to 7-8 GB per worker (an OOM kill beside a
training job on the 24 GB machine): after each test file the worker drops
JAX's in-memory caches (the disk cache keeps the programs) and hands freed
memory back to the system.
"""
import atexit
import ctypes
import gc
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="fixclip_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(32 << 30))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position  (reads the env above)


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_file():
  yield
  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
