"""Random-access data sources: (image, caption) examples for grain.

Every source has `__len__` and `__getitem__` (so grain can shuffle and shard by
index) and returns the same example dict:

  {"image": bytes (encoded PNG/JPEG/WebP), "caption": str,
   "short_caption": str | None, "key": str}

Kinds (`make_source(config)` picks one by `config.type`):
  jsonl         a manifest, one JSON object a line:
                {"image": path, "caption": "..." | "captions": ["...", ...],
                 "short_caption": "..." (optional), "key": "..." (optional)}
                relative image paths are under `image_root` (default: the
                manifest's folder).
  tar           webdataset shards as img2dataset writes them: `KEY.jpg|jpeg|
                png|webp` plus `KEY.json` (with "caption" or "captions") or
                `KEY.txt`; the shards are indexed once at construction.
  array_record  shards written by `fixclip_jax.data.prepare` (record format
                below).
  tfds          `tfds.data_source(name, split=..., data_dir=...)`.
  synthetic     rendered scenes held in memory (fixclip_jax.data.synthetic).
  sharegpt4v    ShareGPT4V's captioner json (data/sharegpt4v.py) without its
                first `holdout_first` entries (1000: the evaluation split).

Several captions per image: `get(index, epoch)` picks one with a generator
seeded by (seed, epoch, index), so the choice changes from epoch to epoch but
is reproducible, and does not depend on the host count or shuffle order. The
pipeline derives `epoch` from the position in its repeated stream
(position // examples_per_host_epoch). `__getitem__(index)` is `get(index, 0)`.

Bad examples: reading one raises, so the pipeline can skip it and count why
(pipeline.SKIP_REASONS); every message names the file / manifest line / key:
  FileNotFoundError     the image file does not exist
  UnreadableFileError   it exists but is no readable regular file: a directory,
                        a device or socket, a symlink loop, no permission, I/O
  ReadTimeoutError      the read did not finish within `read_timeout_s` (a FIFO
                        with no writer, a stalled network mount); the blocked
                        read stays on a daemon thread of a bounded pool, which
                        never holds up exit (ReadsStalledError, which is no
                        bad record, when reads keep timing out: see below)
  CaptionEncodingError  caption bytes that are not UTF-8
  BadRecordError        missing fields or wrong types ("image": 123, a
                        "short_caption" that is no string, a manifest line or
                        tar .json that is not JSON, a record without the magic)
A JSONL line's problems are found at construction, but only raised when that
example is read, so one bad line costs one example, not the run (a manifest
without a single usable line is an error at construction). `location(index)`
says where an example lives (for skip logs) without reading it.
"""
import collections
import functools
import glob as glob_lib
import io
import itertools
import json
import logging
import os
import queue
import stat
import struct
import tarfile
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from grain import sources as grain_sources
import numpy as np
from PIL import Image

from fixclip_jax.data import sharegpt4v
from fixclip_jax.data import synthetic

Example = Dict[str, Any]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SOURCE_TYPES = ("jsonl", "tar", "array_record", "tfds", "synthetic",
                "sharegpt4v")

# ArrayRecord record format ("FXC1"): b"FXC1" | uint32 little-endian N |
# N bytes of UTF-8 JSON header {"key", "captions", "short_caption", ...} |
# the encoded image bytes (the rest of the record).
RECORD_MAGIC = b"FXC1"


class CaptionEncodingError(ValueError):
  """A caption (or record header) whose bytes do not decode as UTF-8."""


class BadRecordError(ValueError):
  """A record with a missing field or a field of the wrong type."""


class UnreadableFileError(OSError):
  """An image path that exists but is no readable regular file."""


class ReadTimeoutError(OSError):
  """A read that did not finish within the source's read timeout."""


# ----------------------------------------------------------------------------
# Reads with a timeout. A read blocked in the kernel (open() of a FIFO, a hung
# NFS/FUSE mount) cannot be interrupted; it runs on a daemon thread of a
# bounded pool that the caller stops waiting for. A thread stuck in a read is
# lost to the pool until the read returns (a daemon, it never holds up exit),
# so: at most READ_POOL_SIZE threads per process, however many reads stall;
# a record whose previous read is still blocked fails at once (a FIFO read
# every epoch costs one thread, not one per epoch); and STALLED_READS_TO_STOP
# reads in a row that time out stop the stream (ReadsStalledError: the
# storage is stalled, which no skipping cures) within a few timeouts.

_POLL_S = 0.05  # how often a waiting read checks for abandon_reads()
READ_POOL_SIZE = 32  # read threads per process (grain's readers share them)
STALLED_READS_TO_STOP = 16  # timed-out reads in a row that end the stream


class ReadsStalledError(OSError):
  """Reads keep timing out: the stream stops (no bad record: not skipped)."""


class _ReadJob:
  """One read handed to the pool: fn's outcome, or cancelled by its waiter."""

  def __init__(self, fn: Callable[[], Any], key: Any):
    self.fn, self.key = fn, key
    self.done = threading.Event()
    self.outcome: Optional[tuple] = None  # (ok, value or exception)
    self.cancelled = False  # the waiter gave up: not started, or discarded
    self.started = False


class _ReadPool:
  """At most `size` daemon threads of this process taking reads from one
  queue. Remembers the keys (group, item) of reads still blocked after their
  waiter gave up, and counts per group (a Source) the reads in a row that
  timed out."""

  def __init__(self, size: int = READ_POOL_SIZE):
    self.pid = os.getpid()  # a forked child starts with no threads: new pool
    self.size = size
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self.threads = 0
    self._pending = 0  # jobs queued or running (stuck ones included)
    self.blocked: Dict[Any, _ReadJob] = {}  # key -> abandoned running job
    self.timeouts_in_a_row: Dict[Any, int] = collections.Counter()  # group ->

  def _work(self) -> None:
    while True:
      job = self._jobs.get()
      with self._lock:
        skip = job.cancelled  # timed out while queued: never started
        job.started = not skip
      if not skip:
        try:
          job.outcome = (True, job.fn())
        except BaseException as e:  # pylint: disable=broad-except  # re-raised by the waiter
          job.outcome = (False, e)
      with self._lock:  # with give_up's check: a job is blocked or done
        self._pending -= 1
        if self.blocked.get(job.key) is job:
          del self.blocked[job.key]  # the stalled read came back
        job.done.set()

  def submit(self, job: _ReadJob) -> None:
    with self._lock:
      self._pending += 1
      start = self._pending > self.threads and self.threads < self.size
      if start:
        self.threads += 1
    if start:
      threading.Thread(target=self._work, daemon=True,
                       name="fixclip-read").start()
    self._jobs.put(job)

  def give_up(self, job: _ReadJob, timed_out: bool = True) -> int:
    """The waiter of `job` stops waiting; returns its group's timeouts in a
    row."""
    group = job.key[0] if job.key is not None else None
    with self._lock:
      job.cancelled = True
      if job.started and not job.done.is_set() and job.key is not None:
        self.blocked[job.key] = job
      self.timeouts_in_a_row[group] += int(timed_out)
      return self.timeouts_in_a_row[group]

  def finished(self, job: _ReadJob) -> None:
    with self._lock:
      self.timeouts_in_a_row.pop(job.key[0] if job.key is not None else None,
                                 None)

  def is_blocked(self, key: Any) -> bool:
    with self._lock:
      return key is not None and key in self.blocked


_read_pool = _ReadPool()
_read_groups = itertools.count()  # Source._read_group
_abandon_generation = 0  # bumped by abandon_reads()


def read_pool_threads() -> int:
  """The read threads this process has started (at most READ_POOL_SIZE)."""
  return _read_pool.threads if _read_pool.pid == os.getpid() else 0


def abandon_reads() -> None:
  """Makes every timed read now waiting give up at once (ReadTimeoutError).

  A stopping train loop calls it, so the pipeline's reader threads are free
  and the process exits without waiting out a stuck read.
  """
  global _abandon_generation
  _abandon_generation += 1


def call_with_timeout(fn: Callable[[], Any], timeout_s: float,
                      where: Callable[[], str], key: Any = None) -> Any:
  """fn() on a pool thread; ReadTimeoutError naming where() after timeout_s
  (at once if the read of `key` = (group, item) before this one is still
  blocked), or ReadsStalledError once STALLED_READS_TO_STOP reads of the
  group in a row timed out."""
  global _read_pool
  if _read_pool.pid != os.getpid():
    _read_pool = _ReadPool(_read_pool.size)
  pool = _read_pool
  if pool.is_blocked(key):
    raise ReadTimeoutError(f"{where()}: its previous read, which timed out, "
                           "is still blocked (a FIFO or other special file? a "
                           "stalled mount?)")
  generation = _abandon_generation
  job = _ReadJob(fn, key)
  pool.submit(job)
  deadline = time.monotonic() + timeout_s
  while not job.done.wait(min(_POLL_S, max(deadline - time.monotonic(), 0.0))):
    if _abandon_generation != generation:
      pool.give_up(job, timed_out=False)
      raise ReadTimeoutError(f"{where()}: read abandoned (the run is stopping)")
    if time.monotonic() >= deadline:
      in_a_row = pool.give_up(job)
      message = (f"{where()}: read did not finish within data.read_timeout_s="
                 f"{timeout_s:g}s (a FIFO or other special file? a stalled "
                 "mount?)")
      if in_a_row >= STALLED_READS_TO_STOP:
        raise ReadsStalledError(
            f"{in_a_row} reads in a row did not finish within data."
            f"read_timeout_s={timeout_s:g}s ({len(pool.blocked)} of at most "
            f"{pool.size} read threads blocked); the last: {message}. The "
            "storage looks stalled: check the data path and its mount")
      raise ReadTimeoutError(message)
  pool.finished(job)
  ok, value = job.outcome
  if ok:
    return value
  raise value


def decode_caption(data: bytes, where: str) -> str:
  """UTF-8 bytes -> str; CaptionEncodingError naming `where` otherwise."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CaptionEncodingError(f"{where}: caption is not UTF-8 ({e})") from None


def encode_record(header: Mapping[str, Any], image: bytes) -> bytes:
  """One ArrayRecord record: magic, header length, JSON header, image bytes."""
  head = json.dumps(dict(header), ensure_ascii=False).encode("utf-8")
  return RECORD_MAGIC + struct.pack("<I", len(head)) + head + bytes(image)


def decode_record(record: bytes) -> tuple:
  """Inverse of encode_record: (header dict, image bytes); BadRecordError
  (CaptionEncodingError for non-UTF-8 header bytes) if it is not one."""
  if record[:4] != RECORD_MAGIC:
    raise BadRecordError(f"Not a fixclip record (magic {record[:4]!r}, "
                         f"expected {RECORD_MAGIC!r})")
  if len(record) < 8:
    raise BadRecordError(f"Record of {len(record)} bytes has no header length")
  (n,) = struct.unpack("<I", record[4:8])
  if len(record) < 8 + n:
    raise BadRecordError(f"Record of {len(record)} bytes is shorter than its "
                         f"{n}-byte header")
  header = decode_caption(record[8:8 + n], "record header")
  try:
    fields = json.loads(header)
  except json.JSONDecodeError as e:
    raise BadRecordError(f"Record header is not JSON ({e.msg})") from None
  if not isinstance(fields, dict):
    raise BadRecordError("Record header is not a JSON object")
  return fields, record[8 + n:]


def choose_caption(captions: Sequence[str], seed: int, epoch: int,
                   index: int) -> str:
  """One of several captions, fixed by (seed, epoch, index)."""
  if len(captions) == 1:
    return captions[0]
  rng = np.random.default_rng([seed, epoch, index])
  return captions[int(rng.integers(len(captions)))]


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _captions_of(record: Mapping[str, Any], where: str) -> List[str]:
  """The caption list of a manifest line / tar json / record header."""
  if "captions" in record:
    captions = record["captions"]
    if (not isinstance(captions, list) or not captions
        or not all(isinstance(c, str) for c in captions)):
      raise BadRecordError(f"{where}: field 'captions' must be a non-empty "
                           f"list of strings (found {_type_name(captions)})")
    return list(captions)
  if "caption" in record:
    if not isinstance(record["caption"], str):
      raise BadRecordError(f"{where}: field 'caption' must be a string "
                           f"(found {_type_name(record['caption'])})")
    return [record["caption"]]
  raise BadRecordError(f"{where}: missing field 'caption' (or 'captions')")


def _short_caption_of(record: Mapping[str, Any], where: str) -> Optional[str]:
  short = record.get("short_caption")
  if short is not None and not isinstance(short, str):
    raise BadRecordError(f"{where}: field 'short_caption' must be a string "
                         f"or null (found {_type_name(short)})")
  return short


def _checked(rec: Mapping[str, Any], where: Callable[[], str]
             ) -> Mapping[str, Any]:
  """`rec` if its fields have the types raw() promises, else BadRecordError
  naming where() (called only then: locations cost a little to format)."""
  image, captions = rec.get("image"), rec.get("captions")
  short = rec.get("short_caption")
  if (isinstance(image, (bytes, bytearray)) and isinstance(captions, list)
      and captions and all(isinstance(c, str) for c in captions)
      and (short is None or isinstance(short, str))):
    return rec
  if not isinstance(image, (bytes, bytearray)):
    raise BadRecordError(f"{where()}: image must be encoded bytes (found "
                         f"{_type_name(image)})")
  _captions_of(rec, where())
  _short_caption_of(rec, where())
  return rec


class Source:
  """Base: subclasses implement __len__ and raw(index) -> record dict.

  raw() returns {"image": bytes, "captions": [str, ...], "short_caption":
  str | None, "key": str} plus any extra fields of the input (prompt, ...).
  """

  seed: int = 0
  # Reads slower than this raise ReadTimeoutError (0 = wait forever); set by
  # make_source from data.read_timeout_s. Sources holding their examples in
  # memory set reads_storage = False: nothing of theirs can stall.
  read_timeout_s: float = 0.0
  reads_storage: bool = True
  _read_group: Optional[int] = None  # call_with_timeout's group of its reads

  def __len__(self) -> int:
    raise NotImplementedError

  def raw(self, index: int) -> Dict[str, Any]:
    raise NotImplementedError

  def key(self, index: int) -> str:
    """The example's key without reading its image."""
    return str(index)

  def location(self, index: int) -> str:
    """Where example `index` lives (file, line, shard, key), for logs."""
    return f"record {index} (key {self.key(index)!r})"

  def get(self, index: int, epoch: int = 0) -> Example:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    if self.read_timeout_s > 0 and self.reads_storage:
      if self._read_group is None:  # this object's reads (not id(): reused)
        self._read_group = next(_read_groups)
      rec = call_with_timeout(functools.partial(self.raw, index),
                              self.read_timeout_s,
                              functools.partial(self.location, index),
                              key=(self._read_group, index))
    else:
      rec = self.raw(index)
    rec = _checked(rec, functools.partial(self.location, index))
    return {
        "image": rec["image"],
        "caption": choose_caption(rec["captions"], self.seed, epoch, index),
        "short_caption": rec.get("short_caption"),
        "key": str(rec["key"]),
    }

  def __getitem__(self, index: int) -> Example:
    return self.get(int(index), 0)


def _file_kind(mode: int) -> str:
  for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                     (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"),
                     (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return kind
  return "not a regular file"


def _read_file(path: str, where: str) -> bytes:
  """The bytes of the regular file `path`; errors name it and `where`."""
  try:
    with open(path, "rb") as f:
      # fstat of what was opened (no race with a rename): a device such as
      # /dev/zero would otherwise be read forever.
      mode = os.fstat(f.fileno()).st_mode
      if not stat.S_ISREG(mode):
        raise UnreadableFileError(f"{path}: {_file_kind(mode)}, not an image "
                                  f"file ({where})")
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: image not found ({where})") from None
  except IsADirectoryError:
    raise UnreadableFileError(f"{path}: a directory, not an image file "
                              f"({where})") from None
  except UnreadableFileError:
    raise
  except OSError as e:  # ELOOP, EACCES, EIO, ENXIO (a socket), ...
    raise UnreadableFileError(f"{path}: cannot read it ({e.strerror or e}) "
                              f"({where})") from None


class JsonlSource(Source):
  """A JSONL manifest; all lines are parsed and checked at construction.

  A line with a problem (not UTF-8, not JSON, a missing or ill-typed field)
  keeps its place: reading that example raises (CaptionEncodingError /
  BadRecordError naming the line), so the pipeline skips and counts it.
  """

  def __init__(self, path: str, image_root: Optional[str] = None,
               seed: int = 0):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: manifest not found")
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self.seed = seed
    self.records = []
    # Binary lines, decoded one by one: a non-UTF-8 byte is a bad line whose
    # number the error names (text mode would fail without one).
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          self.records.append(self._parse_line(line, lineno))
    bad = [r for r in self.records if "error" in r]
    if bad and len(bad) == len(self.records):
      raise ValueError(f"{path}: no usable line ({len(bad)} bad, the first: "
                       f"{bad[0]['error'][1]})")
    if bad:
      logging.warning("%s: %d of %d lines are bad records, skipped when read; "
                      "the first: %s", path, len(bad), len(self.records),
                      bad[0]["error"][1])

  def _parse_line(self, raw_line: bytes, lineno: int) -> Dict[str, Any]:
    where = f"{self.path}:{lineno}"
    try:
      return self._record_of_line(raw_line, where, lineno)
    except CaptionEncodingError as e:
      error = ("encoding", str(e))
    except BadRecordError as e:
      error = ("record", str(e))
    return {"error": error, "line": lineno, "key": f"line {lineno}"}

  @staticmethod
  def _record_of_line(raw_line: bytes, where: str, lineno: int
                      ) -> Dict[str, Any]:
    try:
      # A byte-order mark (Windows editors write one) opens the first line.
      line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
      raise CaptionEncodingError(f"{where}: line is not UTF-8 ({e})") from None
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise BadRecordError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
      raise BadRecordError(f"{where}: expected a JSON object, found "
                           f"{_type_name(rec)}")
    if "image" not in rec:
      raise BadRecordError(f"{where}: missing field 'image'")
    if not isinstance(rec["image"], str) or not rec["image"]:
      raise BadRecordError(f"{where}: field 'image' must be a non-empty path "
                           f"string (found {json.dumps(rec['image'])})")
    # Only the fields we use are kept: manifests can have millions of lines.
    out = {"image": rec["image"], "captions": _captions_of(rec, where),
           "short_caption": _short_caption_of(rec, where),
           "key": str(rec.get("key", rec["image"])), "line": lineno}
    for name in ("prompt", "prompt_id"):  # MLLM prompt templates (prepare)
      if name in rec:
        out[name] = rec[name]
    return out

  def __len__(self) -> int:
    return len(self.records)

  def key(self, index: int) -> str:
    return self.records[index]["key"]

  def image_path(self, index: int) -> Optional[str]:
    """The image file of example `index` (None for a bad line)."""
    rec = self.records[index]
    return None if "error" in rec else os.path.join(self.image_root, rec["image"])

  def location(self, index: int) -> str:
    rec = self.records[index]
    if "error" in rec:
      return f"manifest {self.path}:{rec['line']}"
    return (f"{self.image_path(index)} (manifest {self.path}:"
            f"{rec['line']}, key {self.key(index)!r})")

  def raw(self, index: int) -> Dict[str, Any]:
    rec = dict(self.records[index])
    if "error" in rec:
      kind, message = rec["error"]
      raise (CaptionEncodingError if kind == "encoding" else BadRecordError)(
          message)
    rec["image"] = _read_file(self.image_path(index),
                              f"manifest {self.path}:{rec['line']}")
    return rec


def expand_paths(pattern: Union[str, Sequence[str]], suffix: str) -> List[str]:
  """A glob, a folder (all *suffix files in it), a comma list, or a list."""
  if isinstance(pattern, str):
    pattern = [p for p in pattern.split(",") if p]
  paths = []
  for p in pattern:
    if os.path.isdir(p):
      found = sorted(glob_lib.glob(os.path.join(p, "*" + suffix)))
    else:
      found = sorted(glob_lib.glob(p))
    if not found:
      raise FileNotFoundError(f"{p}: no {suffix} files match")
    paths.extend(found)
  return paths


def _split_member_name(name: str) -> tuple:
  """webdataset naming: key = path up to the first dot of the basename."""
  folder, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(folder, stem), ext.lower()


class TarSource(Source):
  """webdataset `.tar` shards, indexed once (member offsets + captions).

  Reads use os.pread on per-process file descriptors, so grain's reader
  threads can share them and the pickled source (index only) moves cheaply to
  worker processes. Keys with no image ("missing_file") or no caption
  ("empty_caption") are skipped and counted in `self.skipped` (reason ->
  count). A caption file that is not UTF-8, not JSON or of the wrong types
  keeps its key in the index; reading that example raises
  CaptionEncodingError / BadRecordError, so the pipeline skips (and counts)
  it instead of the whole shard failing.
  """

  def __init__(self, paths: Union[str, Sequence[str]], seed: int = 0):
    self.paths = expand_paths(paths, ".tar")
    self.seed = seed
    self.entries = []  # (shard index, image offset, image size, record)
    self.skipped: Dict[str, int] = {}
    for shard_index, path in enumerate(self.paths):
      self._index_shard(shard_index, path)
    self._fds: Dict[int, int] = {}

  def _index_shard(self, shard_index: int, path: str):
    groups: Dict[str, Dict[str, Any]] = {}
    order = []
    try:
      with tarfile.open(path, "r:") as tar:
        for member in tar:
          if not member.isfile():
            continue
          key, ext = _split_member_name(member.name)
          if key not in groups:
            groups[key] = {}
            order.append(key)
          if ext in IMAGE_EXTENSIONS:
            groups[key]["image"] = (member.offset_data, member.size)
          elif ext == "json":
            groups[key]["json"] = tar.extractfile(member).read()
          elif ext == "txt":
            groups[key]["txt"] = tar.extractfile(member).read()
    except tarfile.TarError as e:
      raise ValueError(f"{path}: not a readable tar file ({e})") from None
    for key in order:
      g = groups[key]
      rec = self._record_of_key(g, key, f"{path}:{key}")
      if "image" not in g or "captions" not in rec:
        # pipeline.SKIP_REASONS names, which prepare's report uses.
        reason = "missing_file" if "image" not in g else "empty_caption"
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        continue
      self.entries.append((shard_index, *g["image"], rec))
    if self.skipped:
      logging.info("%s: skipped %s", path, self.skipped)

  @staticmethod
  def _record_of_key(g: Dict[str, Any], key: str, where: str
                     ) -> Dict[str, Any]:
    """A key's record; its caption problems kept as rec["error"] = (kind,
    message), raised when the example is read (one key, not the shard)."""
    rec: Dict[str, Any] = {"key": key, "short_caption": None}
    try:
      if "json" in g:
        try:
          meta = json.loads(decode_caption(g["json"], where + ".json"))
        except json.JSONDecodeError as e:
          raise BadRecordError(f"{where}.json: invalid JSON ({e.msg})") from None
        if not isinstance(meta, dict):
          raise BadRecordError(f"{where}.json: expected a JSON object, found "
                               f"{_type_name(meta)}")
        if "caption" in meta or "captions" in meta:
          rec["captions"] = _captions_of(meta, where + ".json")
          rec["short_caption"] = _short_caption_of(meta, where + ".json")
      if "captions" not in rec and "txt" in g:
        rec["captions"] = [decode_caption(g["txt"], where + ".txt").strip()]
    except CaptionEncodingError as e:
      rec["captions"], rec["error"] = [], ("encoding", str(e))
    except BadRecordError as e:
      rec["captions"], rec["error"] = [], ("record", str(e))
    return rec

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"] = {}  # descriptors do not cross processes
    return state

  def _fd(self, shard_index: int) -> int:
    if shard_index not in self._fds:
      self._fds[shard_index] = os.open(self.paths[shard_index], os.O_RDONLY)
    return self._fds[shard_index]

  def __len__(self) -> int:
    return len(self.entries)

  def key(self, index: int) -> str:
    return self.entries[index][3]["key"]

  def location(self, index: int) -> str:
    return f"{self.paths[self.entries[index][0]]}:{self.key(index)}"

  def raw(self, index: int) -> Dict[str, Any]:
    shard_index, offset, size, rec = self.entries[index]
    if "error" in rec:
      kind, message = rec["error"]
      raise (CaptionEncodingError if kind == "encoding" else BadRecordError)(
          message)
    rec = dict(rec)
    rec["image"] = os.pread(self._fd(shard_index), size, offset)
    return rec


class ArrayRecordSource(Source):
  """Shards written by fixclip_jax.data.prepare (records: see encode_record)."""

  def __init__(self, paths: Union[str, Sequence[str]], seed: int = 0):
    self.paths = expand_paths(paths, ".array_record")
    self.seed = seed
    self._data = grain_sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._data)

  def location(self, index: int) -> str:
    return f"record {index} of {','.join(self.paths)}"

  def raw(self, index: int) -> Dict[str, Any]:
    try:
      header, image = decode_record(self._data[index])
    except CaptionEncodingError as e:
      raise CaptionEncodingError(f"{self.location(index)}: {e}") from None
    except BadRecordError as e:
      raise BadRecordError(f"{self.location(index)}: {e}") from None
    header["image"] = image
    header.setdefault("short_caption", None)
    header.setdefault("key", str(index))
    return header


def _lookup(record: Mapping[str, Any], path: str):
  """record["a"]["b"] for path "a/b" (TFDS features are nested dicts)."""
  value = record
  for part in path.split("/"):
    value = value[part]
  return value


def _as_text(value, where: str) -> str:
  if isinstance(value, np.ndarray):
    value = value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, bytes):
    return decode_caption(value, where)
  return str(value)


def _as_image_bytes(value) -> bytes:
  """Encoded bytes as they are; a decoded uint8 array is re-encoded as PNG."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    buf = io.BytesIO()
    Image.fromarray(value.squeeze(-1) if value.shape[-1] == 1 else value).save(
        buf, format="PNG")
    return buf.getvalue()
  if isinstance(value, np.ndarray):
    value = value.item()
  return bytes(value)


class TfdsSource(Source):
  """A TFDS dataset prepared in a random-access format (ArrayRecord).

  Images are read undecoded (tfds.decode.SkipDecoding). `caption_key` may be
  a "/"-path into nested features and may hold one caption or a list.
  """

  def __init__(self, name: str, split: str = "train",
               data_dir: Optional[str] = None, image_key: str = "image",
               caption_key: str = "caption", seed: int = 0):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # optional: tfds only
    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key, caption_key
    self.seed = seed
    self._data = tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False,
        decoders={image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._data)

  def location(self, index: int) -> str:
    return f"tfds {self.name}/{self.split}[{index}]"

  def raw(self, index: int) -> Dict[str, Any]:
    record = self._data[index]
    where = self.location(index)
    try:
      image = _lookup(record, self.image_key)
      caption = _lookup(record, self.caption_key)
    except KeyError as e:
      raise KeyError(f"{where}: missing feature {e}") from None
    if isinstance(caption, (list, tuple)) or (
        isinstance(caption, np.ndarray) and caption.ndim > 0):
      captions = [_as_text(c, where) for c in caption]
    else:
      captions = [_as_text(caption, where)]
    return {"image": _as_image_bytes(image), "captions": captions,
            "short_caption": None, "key": f"{self.split}/{index}"}


class InMemorySource(Source):
  """A list of records already in memory (tests, synthetic demos)."""

  reads_storage = False  # nothing to wait for

  def __init__(self, records: Sequence[Mapping[str, Any]], seed: int = 0):
    self.seed = seed
    self.records = []
    for i, rec in enumerate(records):
      out = dict(rec)
      out["captions"] = _captions_of(rec, f"record {i}")
      out.pop("caption", None)
      out.setdefault("short_caption", None)
      out.setdefault("key", str(i))
      self.records.append(out)

  def __len__(self) -> int:
    return len(self.records)

  def key(self, index: int) -> str:
    return self.records[index]["key"]

  def raw(self, index: int) -> Dict[str, Any]:
    return self.records[index]


class ShareGPT4VSource(Source):
  """ShareGPT4V's captioner json (data/sharegpt4v.py: one JSON list of
  {"id", "image", "conversations": [..., {"value": caption}]}) without its
  first `holdout_first` entries: 1000 is the evaluation split (sharegpt4v_1k),
  which Long-CLIP's train/sharegpt4v.py also leaves out of training.

  Example i is entry holdout_first + i. Images are under `image_root`
  (default: the json's folder). An entry without a usable image path or
  caption keeps its place: reading it raises BadRecordError naming the entry.
  """

  def __init__(self, path: str, image_root: Optional[str] = None,
               holdout_first: int = sharegpt4v.EVAL_HOLDOUT, seed: int = 0):
    self.pairs = sharegpt4v.read_pairs(path, holdout_first)  # FormatError
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self.seed = seed
    errors = self.pairs.errors
    if errors and len(errors) == len(self.pairs):
      raise ValueError(f"{path}: no usable entry ({len(errors)} bad, the "
                       f"first: {errors[min(errors)]})")
    if errors:
      logging.warning("%s: %d of %d entries are bad records, skipped when "
                      "read; the first: %s", path, len(errors),
                      len(self.pairs), errors[min(errors)])

  def __len__(self) -> int:
    return len(self.pairs)

  def key(self, index: int) -> str:
    return self.pairs.keys[index]

  def image_path(self, index: int) -> Optional[str]:
    """The image file of example `index` (None for a bad entry)."""
    if index in self.pairs.errors:
      return None
    return os.path.join(self.image_root, self.pairs.images[index])

  def image_paths(self) -> List[str]:
    """Every example's image file (bad entries left out)."""
    return [self.image_path(i) for i in range(len(self))
            if i not in self.pairs.errors]

  def location(self, index: int) -> str:
    entry = f"ShareGPT4V {self.path} entry {self.pairs.entry_index(index)}"
    if index in self.pairs.errors:
      return entry
    return f"{self.image_path(index)} ({entry}, key {self.key(index)!r})"

  def raw(self, index: int) -> Dict[str, Any]:
    if index in self.pairs.errors:
      raise BadRecordError(self.pairs.errors[index])
    image = _read_file(self.image_path(index), f"ShareGPT4V {self.path} "
                       f"entry {self.pairs.entry_index(index)}")
    return {"image": image, "captions": [self.pairs.captions[index]],
            "short_caption": None, "key": self.key(index)}


def make_source(data) -> Source:
  """The source named by `data.type`; data: the run config's `data` block
  (config_base.py), as every function below takes it."""
  source = _make_source(data)
  source.read_timeout_s = float(data.get("read_timeout_s", 0.0) or 0.0)
  return source


def _make_source(data) -> Source:
  kind = data.type
  seed = int(data.shuffle_seed)
  if kind == "jsonl":
    return JsonlSource(data.path, data.image_root or None, seed=seed)
  if kind == "tar":
    return TarSource(data.path, seed=seed)
  if kind == "array_record":
    return ArrayRecordSource(data.path, seed=seed)
  if kind == "tfds":
    return TfdsSource(data.path, split=data.tfds_split,
                      data_dir=data.tfds_data_dir or None,
                      image_key=data.tfds_image_key,
                      caption_key=data.tfds_caption_key, seed=seed)
  if kind == "sharegpt4v":
    return ShareGPT4VSource(
        data.path, data.image_root or None,
        holdout_first=data.get("holdout_first", sharegpt4v.EVAL_HOLDOUT),
        seed=seed)
  if kind == "synthetic":
    return InMemorySource(synthetic.synthetic_examples(
        data.synthetic_num, data.synthetic_image_size,
        data.synthetic_seed,
        late_detail_share=data.get("synthetic_late_detail_share",
                                   synthetic.DEFAULT_LATE_DETAIL_SHARE)),
        seed=seed)
  raise ValueError(f"Unknown data source type {kind!r}; known: {SOURCE_TYPES}")


# ----------------------------------------------------------------------------
# What the training data holds, for main.py (num_train_epochs) and the
# evaluation (images it also trains on), without building a pipeline.

METADATA_FILE = "metadata.json"  # prepare's record of the shards it wrote


def source_length(data) -> int:
  """len(make_source(data)), counted cheaply where it can be:
  a manifest's non-blank lines, the ShareGPT4V json parsed once."""
  if data.type == "jsonl":
    if not os.path.isfile(data.path):
      raise FileNotFoundError(f"{data.path}: manifest not found")
    with open(data.path, "rb") as f:
      return sum(1 for line in f if line.strip())
  return len(make_source(data))


def training_image_paths(data) -> Optional[List[str]]:
  """The image files of the training data (the `data` block) where its
  source names them (a JSONL manifest, the ShareGPT4V json); else None."""
  if data.type not in ("jsonl", "sharegpt4v"):
    return None
  source = _make_source(data)
  if isinstance(source, ShareGPT4VSource):
    return source.image_paths()
  return [p for p in (source.image_path(i) for i in range(len(source))) if p]


def prepared_metadata(data) -> List[Dict[str, Any]]:
  """The metadata.json of each folder holding the `data` block's ArrayRecord
  shards (prepare writes one per output folder); [] for other sources."""
  if data.type != "array_record":
    return []
  out = []
  for folder in sorted({os.path.dirname(p)
                        for p in expand_paths(data.path, ".array_record")}):
    path = os.path.join(folder, METADATA_FILE)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        meta = json.loads(f.read().decode("utf-8"))
      out.append(dict(meta, path=path) if isinstance(meta, dict) else {})
  return out


def sharegpt4v_holdout(data) -> Optional[tuple]:
  """(entries held out, the json) when the `data` block trains on ShareGPT4V's
  captioner json, directly or through shards prepared from it; else None."""
  if data.type == "sharegpt4v":
    return (int(data.get("holdout_first", sharegpt4v.EVAL_HOLDOUT)),
            data.path)
  for meta in prepared_metadata(data):
    if meta.get("source_format") == "sharegpt4v":
      return int(meta.get("holdout_first", 0)), meta.get("source", "")
  return None
