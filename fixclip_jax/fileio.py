"""Every file and directory this package writes goes through here.

Paths are local paths or URLs (`gs://bucket/run`, anything `etils.epath`
reads); they are checked with the same library they are written with, so a
`gs://` workdir works wherever a local one does.

Writes are atomic: the content goes to a temporary name next to the
destination and is renamed into place only when complete, so an interrupted
write never leaves a half-written file or directory behind, and a failed one
leaves an existing destination as it was. A URL is staged in a local
temporary folder and copied up when the block succeeds; an object store
replaces each object whole, but a directory is uploaded file by file, so only
a failure *inside* the block is guaranteed to leave a remote directory as it
was.

Temporary names start with "." and end with the destination's own name, so
they are hidden and keep its extension (libraries that pick a format from it,
e.g. PIL or matplotlib, write the right one). They are created with mode
0666 / 0777 under the user's umask, so the result gets the usual 0644 / 0755,
not the 0600 / 0700 of `tempfile`.
"""
import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Union
import uuid

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def path(p: PathLike) -> epath.Path:
  """An epath.Path for a local path or a URL."""
  return epath.Path(p)


def is_url(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def absolute(p: PathLike) -> str:
  """An absolute local path; URLs are returned as they are."""
  p = os.fspath(p)
  return p if is_url(p) else os.path.abspath(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def refuse_existing(p: PathLike, overwrite: bool) -> None:
  """FileExistsError naming `p` when it exists and overwrite is off."""
  if not overwrite and exists(p):
    raise FileExistsError(f"{os.fspath(p)} already exists; not overwriting it")


def _temporary_sibling(dst: str, kind: str = "tmp") -> str:
  """A fresh hidden name next to the local path `dst`, ending with its name."""
  name = os.path.basename(dst)
  return os.path.join(os.path.dirname(dst), f".{kind}-{uuid.uuid4().hex[:12]}.{name}")


@contextlib.contextmanager
def _staged_upload(dst: str) -> Iterator[str]:
  """A local path named like the URL `dst`, in a folder removed afterwards."""
  with tempfile.TemporaryDirectory(prefix="fixclip-upload-") as staging:
    yield os.path.join(staging, dst.rstrip("/").rsplit("/", 1)[-1])


@contextlib.contextmanager
def atomic_file(dst: PathLike, overwrite: bool = True) -> Iterator[str]:
  """Yields a local path to write `dst`'s content to; it becomes `dst` when
  the block succeeds and is removed when it raises."""
  refuse_existing(dst, overwrite)
  dst = absolute(dst)
  if is_url(dst):
    with _staged_upload(dst) as tmp:
      yield tmp
      makedirs(path(dst).parent)
      path(tmp).copy(path(dst), overwrite=True)
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = _temporary_sibling(dst)
  # O_EXCL: the name is ours alone; mode 0666 is then reduced by the umask.
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  try:
    yield tmp
    os.replace(tmp, dst)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise


def atomic_write(dst: PathLike, data: Union[bytes, str],
                 overwrite: bool = True) -> None:
  """Writes bytes (or UTF-8 text) to `dst` atomically."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_file(dst, overwrite) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


@contextlib.contextmanager
def atomic_directory(dst: PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a local temporary directory that becomes `dst` when the block
  succeeds (replacing it only with overwrite) and is deleted when it raises."""
  refuse_existing(dst, overwrite)
  dst = absolute(dst)
  if is_url(dst):
    with _staged_upload(dst) as tmp:
      os.mkdir(tmp)
      yield tmp
      target = path(dst)
      if target.exists():
        target.rmtree()
      _copy_tree(tmp, target)
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = _temporary_sibling(dst)
  os.mkdir(tmp, 0o777)  # reduced by the umask
  try:
    yield tmp
    _rename_over(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _rename_over(src: str, dst: str) -> None:
  """Renames the directory `src` to `dst`, replacing a directory there.

  POSIX cannot rename a directory onto a non-empty one: the old one is moved
  aside first, and moved back if the second rename fails.
  """
  if not os.path.lexists(dst):
    os.rename(src, dst)
    return
  old = _temporary_sibling(dst, "old")
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)
    raise
  if os.path.isdir(old) and not os.path.islink(old):
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.remove(old)


def _copy_tree(local: str, target: epath.Path) -> None:
  target.mkdir(parents=True, exist_ok=True)
  for name in sorted(os.listdir(local)):
    src = os.path.join(local, name)
    if os.path.isdir(src):
      _copy_tree(src, target / name)
    else:
      path(src).copy(target / name, overwrite=True)
