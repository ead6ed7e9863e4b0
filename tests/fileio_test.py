"""fileio: atomic writes of files and directories, on local paths and URLs.

URLs: etils.epath has no `file://` scheme (epath.Path("file://...") is a
KeyError), so the remote cases run on `gs://` paths whose epath backend
(fsspec) is pointed at an in-memory fsspec filesystem: the same epath calls a
real bucket gets, with no network.
"""
import contextlib
import os
import shutil
import stat
import tempfile
from unittest import mock

from absl.testing import absltest
from etils import epath
from etils.epath import backend as epath_backend
import fsspec
from fsspec.implementations import memory

from fixclip_jax import fileio


class _Failure(Exception):
  """Raised inside a write block by the tests."""


class FakeBucketFileSystem(memory.MemoryFileSystem):
  """An in-memory filesystem that answers for gs:// paths."""
  protocol = ("gs",)
  cachable = False

  def __init__(self):
    super().__init__()
    # MemoryFileSystem keeps its files in class attributes: one store each.
    self.store = {}
    self.pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      path = path[len("gs://"):]
    return memory.MemoryFileSystem._strip_protocol(path)


@contextlib.contextmanager
def fake_bucket():
  """gs:// paths read and written in memory; yields the filesystem."""
  bucket = FakeBucketFileSystem()
  local = fsspec.filesystem("file")

  def filesystem(p):
    return bucket if os.fspath(p).startswith("gs://") else local

  # With TensorFlow installed epath would use tf.io.gfile for gs://.
  with mock.patch.dict(os.environ, {"EPATH_USE_TF": "false"}), \
       mock.patch.object(epath_backend.fsspec_backend, "fs", filesystem):
    yield bucket


@contextlib.contextmanager
def umask(mask):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def _mode(p):
  return stat.S_IMODE(os.stat(p).st_mode)


def _write(folder, name, text):
  os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
  with open(os.path.join(folder, name), "w") as f:
    f.write(text)


def _tree(root):
  """{relative path: content} of every file under root."""
  files = {}
  for parent, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(parent, name)) as f:
        files[os.path.relpath(os.path.join(parent, name), root)] = f.read()
  return files


class LocalTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def _path(self, *names):
    return os.path.join(self.root, *names)

  def test_atomic_write_content_parents_and_no_temp_left(self):
    dst = self._path("a", "b", "x.json")
    fileio.atomic_write(dst, '{"k": "\u00e9"}')
    with open(dst, encoding="utf-8") as f:
      self.assertEqual(f.read(), '{"k": "\u00e9"}')
    fileio.atomic_write(dst, b"\x00\x01")  # bytes, overwriting by default
    with open(dst, "rb") as f:
      self.assertEqual(f.read(), b"\x00\x01")
    self.assertEqual(os.listdir(self._path("a", "b")), ["x.json"])

  def test_atomic_file_keeps_the_extension(self):
    # Libraries that pick a format from the name (PIL, matplotlib) see it.
    with fileio.atomic_file(self._path("plot.png")) as tmp:
      self.assertTrue(tmp.endswith("plot.png"), tmp)
      self.assertTrue(os.path.basename(tmp).startswith("."), tmp)
      self.assertEqual(os.path.dirname(tmp), self.root)  # same filesystem
      with open(tmp, "wb") as f:
        f.write(b"png")
    self.assertEqual(os.listdir(self.root), ["plot.png"])

  def test_raising_block_leaves_file_untouched_and_no_temp(self):
    dst = self._path("x.txt")
    fileio.atomic_write(dst, "old")
    with self.assertRaises(_Failure):
      with fileio.atomic_file(dst) as tmp:
        with open(tmp, "w") as f:
          f.write("half of the new")
        raise _Failure()
    with open(dst) as f:
      self.assertEqual(f.read(), "old")
    self.assertEqual(os.listdir(self.root), ["x.txt"])

  def test_refuse_existing(self):
    dst = self._path("x.txt")
    fileio.refuse_existing(dst, overwrite=False)  # absent: fine
    fileio.atomic_write(dst, "old")
    fileio.refuse_existing(dst, overwrite=True)
    with self.assertRaisesRegex(FileExistsError, "x.txt"):
      fileio.refuse_existing(dst, overwrite=False)
    with self.assertRaisesRegex(FileExistsError, "x.txt"):
      fileio.atomic_write(dst, "new", overwrite=False)
    with open(dst) as f:
      self.assertEqual(f.read(), "old")
    self.assertEqual(os.listdir(self.root), ["x.txt"])

  def test_atomic_directory_new_and_overwritten(self):
    dst = self._path("out", "model")
    with fileio.atomic_directory(dst) as tmp:
      self.assertFalse(os.path.exists(dst))  # nothing visible before the end
      _write(tmp, "params/a", "1")
      _write(tmp, "config.json", "{}")
    self.assertEqual(_tree(dst), {"params/a": "1", "config.json": "{}"})
    with self.assertRaisesRegex(FileExistsError, "model"):
      with fileio.atomic_directory(dst):
        pass
    with fileio.atomic_directory(dst, overwrite=True) as tmp:
      _write(tmp, "b", "2")
    self.assertEqual(_tree(dst), {"b": "2"})
    self.assertEqual(os.listdir(self._path("out")), ["model"])

  def test_raising_block_leaves_directory_untouched_and_no_temp(self):
    dst = self._path("model")
    with fileio.atomic_directory(dst) as tmp:
      _write(tmp, "a", "old")
    with self.assertRaises(_Failure):
      with fileio.atomic_directory(dst, overwrite=True) as tmp:
        _write(tmp, "a", "new")
        _write(tmp, "b", "new")
        raise _Failure()
    self.assertEqual(_tree(dst), {"a": "old"})
    self.assertEqual(os.listdir(self.root), ["model"])

  def test_failed_final_rename_restores_the_old_directory(self):
    dst = self._path("model")
    with fileio.atomic_directory(dst) as tmp:
      _write(tmp, "a", "old")
    real_rename = os.rename
    calls = []

    def rename_failing_second_time(src, target):
      calls.append(target)
      if len(calls) == 2:  # the first moves the old one aside
        raise OSError("disk trouble")
      return real_rename(src, target)

    with mock.patch.object(fileio.os, "rename", rename_failing_second_time):
      with self.assertRaisesRegex(OSError, "disk trouble"):
        with fileio.atomic_directory(dst, overwrite=True) as tmp:
          _write(tmp, "a", "new")
    self.assertEqual(_tree(dst), {"a": "old"})
    self.assertEqual(os.listdir(self.root), ["model"])

  def test_permissions_follow_the_umask(self):
    with umask(0o022):
      fileio.atomic_write(self._path("f.txt"), "x")
      with fileio.atomic_directory(self._path("d")) as tmp:
        _write(tmp, "inner.txt", "y")
        script = os.path.join(tmp, "run.sh")
        _write(tmp, "run.sh", "#!/bin/sh\n")
        os.chmod(script, 0o755)
    self.assertEqual(_mode(self._path("f.txt")), 0o644)
    self.assertEqual(_mode(self._path("d")), 0o755)
    self.assertEqual(_mode(self._path("d", "inner.txt")), 0o644)
    # What the block chose itself is kept.
    self.assertEqual(_mode(self._path("d", "run.sh")), 0o755)
    with umask(0o077):
      fileio.atomic_write(self._path("private.txt"), "x")
    self.assertEqual(_mode(self._path("private.txt")), 0o600)

  def test_checks_and_absolute(self):
    fileio.makedirs(self._path("d", "e"))
    fileio.atomic_write(self._path("d", "f"), "x")
    self.assertTrue(fileio.isdir(self._path("d", "e")))
    self.assertFalse(fileio.isfile(self._path("d", "e")))
    self.assertTrue(fileio.isfile(self._path("d", "f")))
    self.assertFalse(fileio.exists(self._path("nope")))
    self.assertEqual(fileio.read_text(self._path("d", "f")), "x")
    self.assertEqual(fileio.absolute("rel/x"), os.path.join(os.getcwd(), "rel/x"))
    self.assertEqual(fileio.absolute("gs://b/x"), "gs://b/x")


class UrlTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.bucket = self.enter_context(fake_bucket())

  def _objects(self):
    return sorted(self.bucket.store)

  def test_file_url_is_not_an_epath_scheme(self):
    # Why the tests below use a fake bucket rather than file:// URLs.
    with self.assertRaises(KeyError):
      epath.Path("file:///tmp/x")

  def test_atomic_write_and_checks(self):
    fileio.atomic_write("gs://b/run/eval.json", "hello")
    self.assertEqual(self._objects(), ["/b/run/eval.json"])  # no temp objects
    self.assertEqual(epath.Path("gs://b/run/eval.json").read_text(), "hello")
    self.assertTrue(fileio.isfile("gs://b/run/eval.json"))
    self.assertTrue(fileio.isdir("gs://b/run"))
    self.assertFalse(fileio.exists("gs://b/run/other.json"))
    fileio.atomic_write(epath.Path("gs://b/run/eval.json"), b"again")
    self.assertEqual(fileio.read_text("gs://b/run/eval.json"), "again")
    with self.assertRaisesRegex(FileExistsError, "gs://b/run/eval.json"):
      fileio.atomic_write("gs://b/run/eval.json", "no", overwrite=False)
    self.assertEqual(fileio.read_text("gs://b/run/eval.json"), "again")

  def test_raising_block_leaves_object_untouched(self):
    fileio.atomic_write("gs://b/x.txt", "old")
    with self.assertRaises(_Failure):
      with fileio.atomic_file("gs://b/x.txt") as tmp:
        self.assertFalse(fileio.is_url(tmp))  # written locally, copied up
        with open(tmp, "w") as f:
          f.write("new")
        raise _Failure()
    self.assertEqual(fileio.read_text("gs://b/x.txt"), "old")
    self.assertEqual(self._objects(), ["/b/x.txt"])

  def test_atomic_directory(self):
    with fileio.atomic_directory("gs://b/run/model") as tmp:
      _write(tmp, "config.json", "{}")
      _write(tmp, "params/a", "1")
      self.assertFalse(fileio.exists("gs://b/run/model"))
    self.assertEqual(self._objects(), ["/b/run/model/config.json",
                                       "/b/run/model/params/a"])
    self.assertEqual(fileio.read_text("gs://b/run/model/params/a"), "1")
    with self.assertRaisesRegex(FileExistsError, "gs://b/run/model"):
      with fileio.atomic_directory("gs://b/run/model"):
        pass
    with self.assertRaises(_Failure):
      with fileio.atomic_directory("gs://b/run/model", overwrite=True) as tmp:
        _write(tmp, "b", "2")
        raise _Failure()
    self.assertEqual(self._objects(), ["/b/run/model/config.json",
                                       "/b/run/model/params/a"])
    with fileio.atomic_directory("gs://b/run/model", overwrite=True) as tmp:
      _write(tmp, "b", "2")
    self.assertEqual(self._objects(), ["/b/run/model/b"])


if __name__ == "__main__":
  absltest.main()
