"""The grain train pipeline: source -> host shard -> shuffle -> decode/crop/
tokenise -> per-host batch -> (worker processes) -> checkpointable iterator.

The knobs are the run config's `data` block (named, with their defaults, in
config_base.py); the functions here take that block, as `data`.
Evaluation does not come through here: evaluation/retrieval.py embeds the
benchmarks itself.

Train stream (make_train_iterator), for host p of P:
  record ids 0..N-1 -> [p::P] -> shuffle(shuffle_seed), reshuffled each epoch
  -> repeat(num_epochs) -> load example at stream position i (epoch = i //
  per-host epoch length): features, or a SkippedExample marker for bad data
  -> CarrySkips (drops markers, counts them on the next kept example)
  -> batch(global_batch // P, drop_remainder) -> mp_prefetch(num_workers).
Per-example randomness (caption choice, crop) is seeded by (shuffle_seed,
epoch, record id), so a restored iterator (get_state/set_state) reproduces the
same batches, with or without worker processes.

Batches (numpy, per host):
  image       uint8   [B, H, W, 3]  resized/cropped pixels; the train step
                                    normalises them on the device
                                    (pixels.py: bit-identical to the eval
                                    transform, 4x less to send and hold)
  text_long   int32   [B, C]        the caption, C = text_context (248)
  text_short  int32   [B, Cs]       short caption (see below)
  index       int32   [B]           record id in the source
  skipped     int32   [B, R]        bad examples skipped, R = len(SKIP_REASONS)
  truncated   int32   [B, 2]        1 where the caption (column 0) or the short
                                    caption (column 1) was longer than its
                                    context and cut (the end token kept)

Bad data never stops a train run (unless data.raise_on_bad_data, for
debugging). An example is skipped, for the first problem found (reading the
source, then the cheap caption checks, then decoding the image), when its
image file is missing ("missing_file"), its image path is no readable
regular file ("unreadable_file": a directory, a device, a symlink loop, no
permission, an I/O error), its read takes longer than data.read_timeout_s
("read_timeout": a FIFO, a stalled mount; the read is abandoned on a thread
of a bounded pool, sources.py; reads that keep timing out are a stalled
storage, not bad data: sources.ReadsStalledError stops the stream), its
record has missing or ill-typed fields ("bad_record": "image":
123, a "short_caption" that is no string, a manifest line that is not JSON,
any other error reading it), its image does not decode ("unreadable_image":
truncated or corrupt bytes, unknown format), has more than
data.max_image_pixels pixels even at the smallest scale a JPEG (1/8) or JPEG
2000 decodes at, or a side or aspect ratio whose image_size crop would
(check_shape: a 20000x1 PNG; both on the header, before decoding)
("image_too_large"; other formats decode at full size only),
its caption is empty or blank ("empty_caption"), its caption bytes are not
UTF-8 ("bad_caption_encoding"), its caption (or provided short caption) has
more than data.max_caption_chars characters ("caption_too_long"; truncation
to the token context is normal, this catches runaway MLLM output), or, with
data.filter_captions, a caption filter rejects it ("caption_filter"). Each
skip is logged with where it is (file, manifest line, shard key; absl, the
first SKIP_LOG_FIRST per reason and process, then every SKIP_LOG_EVERY-th) and
counted: the count rides on the next kept example's `skipped` row, so the
column sums of a batch's `skipped` are the examples skipped per reason since
the previous batch of this host (with worker processes: since that worker's
previous batch; the sum over batches is the same). At the end of a finite
stream (num_epochs > 0) skips riding on the dropped remainder, or after the
last kept example, are only logged. The pending counts are iterator state,
so get_state/set_state stay exact. More than max_consecutive_skips bad
examples in a row raise (a wrong image_root is not bad data).

Short captions (docs/method.md §2): the data's own short caption when it has one
and `short_caption == "provided"`, else the first sentence of the caption
(`short_caption == "first_sentence"` always uses the first sentence). They are
tokenised at `short_context`, which defaults to text_context: the text tower is
shared by both branches and its positional table is 248 long, so one length
keeps one compiled text-tower shape; set 77 to save text compute.

Worker processes (num_workers > 0) are spawned by grain: the caller must have
parsed absl flags (app.run, or flags.FLAGS(argv) in tests) and run under an
`if __name__ == "__main__"` guard; all map functions here are module-level
classes, so they pickle.
"""
import collections
import io
import json
import queue
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from absl import logging
import grain
# The shared-memory arrays of grain's worker processes (BackgroundBatches.close).
from grain._src.python.ipc import shared_memory_array
import jax
import numpy as np
from PIL import Image

from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import sources as sources_lib
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms

SHORT_CAPTION_POLICIES = ("provided", "first_sentence")

# Why a train example was skipped; the columns of a batch's `skipped` array.
SKIP_REASONS = ("unreadable_image", "missing_file", "empty_caption",
                "bad_caption_encoding", "caption_too_long", "caption_filter",
                "unreadable_file", "bad_record", "read_timeout",
                "image_too_large")
SKIP_LOG_FIRST = 10  # every skip is logged up to this many per reason...
SKIP_LOG_EVERY = 1000  # ...then every this-many-th
CLOSE_WAIT_S = 0.5  # BackgroundBatches.close waits this long for its thread (one put poll)
# BackgroundBatches.truncated: captions and short captions cut, examples taken.
TRUNCATION_COUNTS = ("text_long", "text_short", "examples")


def _host(process_index: Optional[int], process_count: Optional[int]
          ) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def per_host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"data.global_batch={global_batch} is not divisible by "
                     f"the number of hosts ({process_count})")
  return global_batch // process_count


class SkippedExample(NamedTuple):
  """Stands in the stream for a bad example (see the module docstring)."""
  reason: str  # one of SKIP_REASONS
  where: str  # file / shard / key of the example
  detail: str  # the error message


class BadExampleError(ValueError):
  """Raised instead of skipping when data.raise_on_bad_data is set."""


class ImageTooLargeError(ValueError):
  """An image with more pixels than data.max_image_pixels allows."""


JPEG_SCALES = (2, 4, 8)  # the reductions libjpeg decodes at (PIL's draft)


def check_shape(width: int, height: int, max_pixels: int,
                image_size: int = 0) -> None:
  """ImageTooLargeError for a header whose sides or aspect ratio cannot be
  made an image_size crop within max_pixels (0: no limit).

  The eval crop resizes the short side to image_size, so an image with
  aspect ratio A becomes image_size^2 * A pixels: a 143-byte 20000x1 PNG
  (20000 pixels, under any pixel cap) would become 224 x 4.48M = 1e9 pixels.
  Hence A <= max_pixels / image_size^2 (797 for 224 px and 40M), and each side
  <= max_pixels / image_size (implied by the two bounds; named first as the
  clearer message). Checked on the header, before anything is decoded.
  image_size 0 (no crop size known) or max_pixels 0: no bound.
  """
  if not max_pixels or not image_size:
    return
  long_side, short_side = max(width, height), max(min(width, height), 1)
  size = int(image_size)
  max_side = max_pixels // size
  if long_side > max_side:
    raise ImageTooLargeError(
        f"{width}x{height}: a side of {long_side} pixels > data.max_image_"
        f"pixels / data.image_size = {max_pixels} / {size} = {max_side}")
  max_aspect = max_pixels / size ** 2
  if long_side / short_side > max_aspect:
    raise ImageTooLargeError(
        f"{width}x{height}: aspect ratio {long_side / short_side:.1f} > data."
        f"max_image_pixels / data.image_size^2 = {max_aspect:.1f} (its "
        f"{size}-pixel crop would resize it to "
        f"{size * long_side // short_side}x{size} pixels)")


def decode_oversized(data: bytes, max_pixels: int, image_size: int = 0
                     ) -> Optional[Image.Image]:
  """None if `data` holds at most max_pixels pixels (decode it as usual).

  Else the image decoded at the largest scale within the limit, as RGB: a
  JPEG at 1/2, 1/4 or 1/8 (libjpeg's DCT scaling, PIL's draft), a JPEG 2000
  at 1/2 .. 1/32 (its resolution levels, PIL's reduce); ImageTooLargeError if
  no scale fits or the format decodes at full size only (PNG, WebP, ...), or
  if a side or the aspect ratio is too large for an image_size crop
  (check_shape). Only the header is parsed before that decision.
  """
  if not max_pixels:
    return None
  img = Image.open(io.BytesIO(data))
  width, height = img.size
  check_shape(width, height, max_pixels, image_size)
  if width * height <= max_pixels:
    return None
  if img.format == "JPEG":
    for factor in JPEG_SCALES:
      if -(-width // factor) * -(-height // factor) <= max_pixels:
        img.draft("RGB", (width // factor, height // factor))
        if img.size[0] * img.size[1] <= max_pixels:
          img.load()
          return transforms.to_rgb(img)
  if img.format == "JPEG2000":
    for level in range(1, 6):
      power = 1 << level
      if (((width + power // 2) // power) * ((height + power // 2) // power)
          <= max_pixels):
        img.reduce = level  # decode that resolution level only
        img.load()
        return transforms.to_rgb(img)
  how = ("even at the smallest scale" if img.format in ("JPEG", "JPEG2000")
         else f"({img.format}: only JPEG and JPEG 2000 decode reduced)")
  raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels > "
                           f"data.max_image_pixels={max_pixels} {how}")


class SkipLog:
  """Rate-limited absl log of skipped examples: the first `first` per reason,
  then every `every`-th. Thread-safe (grain's reader threads share it)."""

  def __init__(self, first: int = SKIP_LOG_FIRST, every: int = SKIP_LOG_EVERY):
    self.first, self.every = first, every
    self.counts = collections.Counter()
    self._lock = threading.Lock()

  def reset(self):
    with self._lock:
      self.counts.clear()

  def __call__(self, skip: SkippedExample) -> bool:
    """Counts `skip`; logs it when due. Returns whether it was logged."""
    with self._lock:
      self.counts[skip.reason] += 1
      n = self.counts[skip.reason]
    if n > self.first and n % self.every:
      return False
    logging.warning("Skipped example (%s, #%d of this reason in this process)"
                    ": %s: %s", skip.reason, n, skip.where, skip.detail)
    return True


# One log per process (grain worker processes each get their own).
SKIP_LOG = SkipLog()


# Errors of sources.py, whose messages say what they are.
_NAMED_READ_ERRORS = (OSError, sources_lib.CaptionEncodingError,
                      sources_lib.BadRecordError)


def read_error_reason(error: BaseException) -> str:
  """The SKIP_REASONS name of an error reading one record (Source.get/raw)."""
  if isinstance(error, FileNotFoundError):
    return "missing_file"
  if isinstance(error, sources_lib.ReadTimeoutError):
    return "read_timeout"
  if isinstance(error, OSError):  # sources.UnreadableFileError, pread, ...
    return "unreadable_file"
  if isinstance(error, sources_lib.CaptionEncodingError):
    return "bad_caption_encoding"
  return "bad_record"  # sources.BadRecordError, or an odd TFDS feature, ...


class _ExampleProcessor:
  """Example dict -> features, or a SkippedExample."""

  def __init__(self, data, tokenizer):
    if data.short_caption not in SHORT_CAPTION_POLICIES:
      raise ValueError(f"data.short_caption={data.short_caption!r}; known: "
                       f"{SHORT_CAPTION_POLICIES}")
    if data.transform not in transforms.TRAIN_TRANSFORMS:
      raise ValueError(f"data.transform={data.transform!r}; known: "
                       f"{transforms.TRAIN_TRANSFORMS}")
    self.tokenizer = tokenizer
    self.seed = int(data.shuffle_seed)
    self.image_size = int(data.image_size)
    self.transform = data.transform
    self.rrc_scale = tuple(data.rrc_scale)
    self.rrc_ratio = tuple(data.rrc_ratio)
    self.rrc_jpeg_draft = bool(data.rrc_jpeg_draft)
    self.max_image_pixels = int(data.get("max_image_pixels", 0) or 0)
    self.raise_on_bad_data = bool(data.raise_on_bad_data)
    self.max_caption_chars = int(data.max_caption_chars)
    self.text_context = int(data.text_context)
    self.short_context = int(data.short_context) or self.text_context
    self.short_policy = data.short_caption
    self.caption_filter = None
    if data.filter_captions:
      self.caption_filter = captions_lib.CaptionFilterConfig.from_mapping(
          data.filters.to_dict())

  def short_text(self, example) -> str:
    provided = example.get("short_caption") if self.short_policy == "provided" else None
    return captions_lib.short_caption(example["caption"], provided)

  def image(self, data: bytes, record_id: int, epoch: int) -> np.ndarray:
    """uint8 [S, S, 3], not normalised (the step normalises on the device).

    An image over data.max_image_pixels is decoded reduced first
    (decode_oversized), then transformed like any other; one whose side or
    aspect ratio would make the crop exceed it is skipped undecoded.
    """
    reduced = decode_oversized(data, self.max_image_pixels, self.image_size)
    if self.transform == "random_resized_crop":
      rng = np.random.default_rng([self.seed, epoch, record_id, 1])
      if reduced is not None:
        return np.asarray(transforms.random_resized_crop(
            reduced, self.image_size, rng, self.rrc_scale, self.rrc_ratio),
                          np.uint8)
      return np.asarray(transforms.decode_random_resized_crop(
          data, self.image_size, rng, self.rrc_scale, self.rrc_ratio,
          draft=self.rrc_jpeg_draft), np.uint8)
    # resize_center_crop, the default (Long-CLIP's recipe): CLIP's exact
    # preprocessing, full-size decode.
    return transforms.clip_eval_crop(
        reduced if reduced is not None else transforms.decode_image(data),
        self.image_size)

  def caption_problem(self, example) -> Optional[Tuple[str, str]]:
    """(skip reason, detail) for a caption that is bad data, else None."""
    caption = example["caption"]
    if not caption.strip():
      return "empty_caption", "the caption is empty"
    provided = example.get("short_caption") or ""
    longest = max(len(caption), len(provided))
    if longest > self.max_caption_chars:
      return "caption_too_long", (f"{longest} characters > data."
                                  f"max_caption_chars={self.max_caption_chars}")
    if self.caption_filter is not None:
      reason = captions_lib.filter_reason(caption, self.caption_filter)
      if reason is not None:
        return "caption_filter", f"rejected by the {reason!r} filter"
    return None

  def skip(self, reason: str, where: str, detail: str,
           error: Optional[BaseException] = None) -> SkippedExample:
    """The marker of a bad example; logged, or raised if so configured."""
    if self.raise_on_bad_data:
      raise BadExampleError(f"Bad example ({reason}) at {where}: {detail} "
                            "(data.raise_on_bad_data=True)") from error
    skip = SkippedExample(reason, where, detail)
    SKIP_LOG(skip)
    return skip

  def __call__(self, example, record_id: int, epoch: int, where: str
               ) -> Union[Dict[str, np.ndarray], SkippedExample]:
    problem = self.caption_problem(example)
    if problem is not None:
      reason, detail = problem
      return self.skip(reason, where, detail)
    try:
      image = self.image(example["image"], record_id, epoch)
    except ImageTooLargeError as e:
      return self.skip("image_too_large", where, str(e), e)
    except Image.DecompressionBombError as e:  # over PIL's own limit
      return self.skip("image_too_large", where, str(e), e)
    except transforms.DECODE_ERRORS as e:
      return self.skip("unreadable_image", where,
                       f"cannot decode the image: {e}", e)
    except Exception as e:  # pylint: disable=broad-except
      # Malformed files make PIL raise more than DECODE_ERRORS (struct.error,
      # IndexError, ...): still one bad image, not a dead run.
      return self.skip("unreadable_image", where, f"cannot decode the image: "
                       f"{type(e).__name__}: {e}", e)
    text_long, long_cut = self.tokens(example["caption"], self.text_context)
    text_short, short_cut = self.tokens(self.short_text(example),
                                        self.short_context)
    return {
        "image": np.asarray(image, np.uint8),  # no copy if uint8
        "text_long": text_long,
        "text_short": text_short,
        "index": np.int32(record_id),
        "truncated": np.asarray([long_cut, short_cut], np.int32),
    }

  def tokens(self, text: str, context: int) -> Tuple[np.ndarray, bool]:
    """(int32 [context] ids of `text`, whether it was cut to fit)."""
    rows, cut = tokenizers.tokenize_counting_cuts(self.tokenizer, [text], context)
    return rows[0], bool(cut[0])

  def load(self, source, record_id: int, epoch: int
           ) -> Union[Dict[str, np.ndarray], SkippedExample]:
    """Reads and processes one example; bad data -> SkippedExample."""
    where = source.location(record_id)
    try:
      example = source.get(record_id, epoch)
    except sources_lib.ReadsStalledError:
      raise  # the storage, not this record: skipping cannot help
    except Exception as e:  # pylint: disable=broad-except
      # Any error of one record is that record's problem; a systematic one
      # still stops the run through data.max_consecutive_skips.
      reason = read_error_reason(e)
      detail = str(e) if isinstance(e, _NAMED_READ_ERRORS) else (
          f"{type(e).__name__}: {e}")
      return self.skip(reason, where, detail, e)
    return self(example, record_id, epoch, where)


class _LoadTrainExample:
  """(stream position, record id) -> features or SkippedExample."""

  def __init__(self, source, processor: _ExampleProcessor, epoch_length: int):
    self.source = source
    self.processor = processor
    self.epoch_length = epoch_length

  def __call__(self, position: int, record_id: int):
    epoch = position // self.epoch_length
    return self.processor.load(self.source, int(record_id), epoch)


class CarrySkipsIterDataset(grain.IterDataset):
  """Drops SkippedExample markers; each kept example gets `skipped`: int32
  [len(SKIP_REASONS)], the markers dropped since the previous kept example.

  The pending counts are part of the iterator state, so a restored iterator
  yields exactly what an uninterrupted one would. Module-level: it pickles
  into grain's worker processes.
  """

  def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int):
    super().__init__(parent)
    self.max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> "CarrySkipsIterator":
    return CarrySkipsIterator(self._parent.__iter__(),
                              self.max_consecutive_skips)

  def __str__(self) -> str:
    return "CarrySkipsIterDataset"


class CarrySkipsIterator(grain.DatasetIterator):
  """The iterator of CarrySkipsIterDataset."""

  def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
    super().__init__(parent)
    self.max_consecutive_skips = max_consecutive_skips
    self._pending = np.zeros((len(SKIP_REASONS),), np.int32)

  def __next__(self) -> Dict[str, np.ndarray]:
    consecutive = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, SkippedExample):
        break
      self._pending[SKIP_REASONS.index(element.reason)] += 1
      consecutive += 1
      if consecutive > self.max_consecutive_skips:
        counts = dict(zip(SKIP_REASONS, self._pending.tolist()))
        raise ValueError(
            f"{consecutive} bad examples in a row (data.max_consecutive_skips="
            f"{self.max_consecutive_skips}), last at {element.where}: "
            f"{element.detail}; pending skip counts {counts}. Is the data "
            "path/image_root right?")
    element = dict(element)
    element["skipped"], self._pending = self._pending, np.zeros_like(
        self._pending)
    return element

  def get_state(self) -> Dict[str, Any]:
    return {"parent": self._parent.get_state(),
            "pending_skips": self._pending.tolist()}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = np.asarray(state["pending_skips"], np.int32)

  def __str__(self) -> str:
    return "CarrySkipsIterator"


def skip_counts(skipped: np.ndarray) -> Dict[str, int]:
  """A batch's `skipped` [B, R] (or summed [R]) -> {reason: count}."""
  totals = np.asarray(skipped).reshape(-1, len(SKIP_REASONS)).sum(axis=0)
  return {reason: int(n) for reason, n in zip(SKIP_REASONS, totals)}


def _batch_and_prefetch(ds: grain.IterDataset, data,
                        batch_size: int) -> grain.IterDataset:
  it_ds = ds.batch(batch_size, drop_remainder=True)
  if data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data.num_workers),
        per_worker_buffer_size=int(data.worker_buffer_size)))
  return it_ds


def _to_iter(ds: grain.MapDataset, data) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=int(data.read_threads),
                           prefetch_buffer_size=int(data.prefetch_buffer))
  return ds.to_iter_dataset(read)


def make_train_dataset(data, tokenizer, *, source=None,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> grain.IterDataset:
  """The train IterDataset of this host (see the module docstring)."""
  process_index, process_count = _host(process_index, process_count)
  batch = per_host_batch_size(int(data.global_batch), process_count)
  source = source if source is not None else sources_lib.make_source(data)
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  epoch_length = len(ds)
  if epoch_length < batch:
    raise ValueError(f"Host {process_index} has {epoch_length} examples, "
                     f"fewer than one batch of {batch}")
  ds = ds.shuffle(seed=int(data.shuffle_seed))
  ds = ds.repeat(int(data.num_epochs) or None)
  processor = _ExampleProcessor(data, tokenizer)
  ds = ds.map_with_index(_LoadTrainExample(source, processor, epoch_length))
  it_ds = CarrySkipsIterDataset(_to_iter(ds, data),
                                int(data.max_consecutive_skips))
  return _batch_and_prefetch(it_ds, data, batch)


def make_train_iterator(data, tokenizer, *, source=None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None
                        ) -> grain.DatasetIterator:
  """Iterator over this host's train batches; has get_state()/set_state()."""
  return iter(make_train_dataset(data, tokenizer, source=source,
                                 process_index=process_index,
                                 process_count=process_count))


def own_memory(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The batch in this process's own memory. Worker processes hand batches
  over in shared memory (grain's SharedMemoryArray, an ndarray subclass),
  which grain frees once the last reference is gone: copied here, none
  outlives the fetch, so none is left at exit. Plain arrays pass as they are."""
  return {k: v if type(v) is np.ndarray else np.array(v)  # pylint: disable=unidiomatic-typecheck
          for k, v in batch.items()}


def wait_for_shared_memory_release() -> None:
  """Waits for grain's queued shared-memory frees (it unlinks dropped arrays
  on a one-thread pool; a free still queued at exit is reported by Python's
  resource_tracker as a leak). Without that pool (no worker processes, or
  another grain version) there is nothing to wait for."""
  pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    pool.apply(int)  # runs after the frees queued before it


class BackgroundBatches:
  """The train loop's batch iterator: `next(stop)` can give up while a batch
  is stuck (a signal arrived), and the saved state is where the loop is.

  A daemon thread takes batches from `iterator` one ahead of the loop, so a
  read that never returns holds up neither the loop nor the process's exit.
  The state (get_state/set_state, JSON bytes: grain's checkpoint handler
  saves it as it saves a DataLoader iterator) is the position after the last
  batch the loop took, plus this host's skip totals per SKIP_REASONS and its
  counts of captions cut to their context (`truncated`, with the examples
  taken), which so continue across resumes. The first cut caption of a run
  is reported once, in one warning line.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator
    self._state = iterator.get_state()
    self._batches = queue.Queue(maxsize=1)
    self._thread: Optional[threading.Thread] = None
    self._closed = False
    self.skip_totals = np.zeros(len(SKIP_REASONS), np.int64)
    # Captions cut to their context: {"text_long", "text_short", "examples"}.
    self.truncated = dict.fromkeys(TRUNCATION_COUNTS, 0)
    self._truncation_reported = False

  def _fetch(self) -> None:
    while not self._closed:
      try:
        batch = own_memory(next(self._iterator))
        item = (batch, self._iterator.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except  # StopIteration too: raised in next()
        item = (None, None, e)
      if not self._put(item) or item[2] is not None:
        return

  def _put(self, item, poll_s: float = 0.1) -> bool:
    """Queues `item`; False (item dropped) once closed: a thread blocked on
    a full queue would hold its batch's shared memory (worker processes
    send batches in it) past the end of the process, which Python then
    reports as leaked."""
    while not self._closed:
      try:
        self._batches.put(item, timeout=poll_s)
        return True
      except queue.Full:
        continue
    return False

  def next(self, stop: Callable[[], bool] = lambda: False,
           poll_s: float = 0.1) -> Optional[Dict[str, np.ndarray]]:
    """The next batch; None as soon as stop() is true (checked every poll_s
    while waiting). Errors of the pipeline are raised here."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._fetch, daemon=True,
                                      name="fixclip-batches")
      self._thread.start()
    while not stop():
      try:
        batch, state, error = self._batches.get(timeout=poll_s)
      except queue.Empty:
        continue
      if error is not None:
        self._closed = True
        raise error
      self._state = state
      self.skip_totals += np.asarray(batch["skipped"]).sum(0)
      self._count_truncated(batch)
      return batch
    return None

  def _count_truncated(self, batch: Dict[str, np.ndarray]) -> None:
    cut = np.asarray(batch["truncated"]).sum(0)                     # [2]
    self.truncated["text_long"] += int(cut[0])
    self.truncated["text_short"] += int(cut[1])
    self.truncated["examples"] += len(batch["truncated"])
    if cut.any() and not self._truncation_reported:
      self._truncation_reported = True
      logging.warning(
          "Captions longer than the text context are cut to it, end token "
          "kept, as CLIP and Long-CLIP train: %d of the first %d captions at "
          "%d tokens (data.text_context), %d short captions at %d "
          "(data.short_context); the metrics count them (data/truncated_long, "
          "data/truncated_short). To keep more of each caption, train a longer "
          "context (model.context_length) or shorten the captions.",
          self.truncated["text_long"], self.truncated["examples"],
          batch["text_long"].shape[1], self.truncated["text_short"],
          batch["text_short"].shape[1])

  def __next__(self) -> Dict[str, np.ndarray]:
    return self.next()

  def __iter__(self) -> "BackgroundBatches":
    return self

  def __enter__(self) -> "BackgroundBatches":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False

  def get_state(self) -> bytes:
    return json.dumps({
        "pipeline": self._state,
        "skip_totals": dict(zip(SKIP_REASONS, self.skip_totals.tolist())),
        "truncated": self.truncated,
    }).encode()

  def set_state(self, state: bytes) -> None:
    if self._thread is not None:
      raise RuntimeError("BackgroundBatches.set_state after the first batch")
    state = json.loads(state)
    if "pipeline" not in state:  # saved before skip totals were kept
      state = {"pipeline": state}
    self._iterator.set_state(state["pipeline"])
    self._state = state["pipeline"]
    totals = state.get("skip_totals", {})
    self.skip_totals = np.array([int(totals.get(r, 0)) for r in SKIP_REASONS],
                                np.int64)
    cut = state.get("truncated", {})  # absent: saved before they were counted
    self.truncated = {k: int(cut.get(k, 0)) for k in TRUNCATION_COUNTS}

  def start_prefetch(self) -> None:
    """(grain's checkpoint handler calls it after a restore; the thread starts
    at the first batch.)"""

  def close(self) -> None:
    """Stops fetching: waiting reads give up (sources.abandon_reads) and the
    pipeline's reader threads and worker processes are shut down, so the
    process can exit at once even with a read stuck for good."""
    self._closed = True
    # Closing first cancels the queued reads, so none starts after the
    # running ones are abandoned.
    self._iterator.close()
    sources_lib.abandon_reads()
    # The batches not taken are dropped now, while grain can still free
    # their shared memory (no resource_tracker "leaked shared_memory"
    # warning at exit); a thread stuck in a read is not waited for.
    if self._thread is not None:
      self._thread.join(timeout=CLOSE_WAIT_S)
    while True:
      try:
        self._batches.get_nowait()
      except queue.Empty:
        break
    wait_for_shared_memory_release()
