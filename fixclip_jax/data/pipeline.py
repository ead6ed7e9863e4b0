"""The grain input pipeline: source -> host shard -> shuffle -> decode/crop/
tokenise -> per-host batch -> (worker processes) -> checkpointable iterator.

Train stream (make_train_iterator), for host p of P:
  record ids 0..N-1 -> [p::P] -> shuffle(shuffle_seed), reshuffled each epoch
  -> repeat(num_epochs) -> load example at stream position i (epoch = i //
  per-host epoch length) -> optional drop (caption filters, bad images)
  -> batch(global_batch // P, drop_remainder) -> mp_prefetch(num_workers).
Per-example randomness (caption choice, crop) is seeded by (shuffle_seed,
epoch, record id), so a restored iterator (get_state/set_state) reproduces the
same batches, with or without worker processes.

Batches (numpy, per host):
  image       float32 [B, H, W, 3]  CLIP-normalised
  text_long   int32   [B, C]        the caption, C = text_context (248)
  text_short  int32   [B, Cs]       short caption (see below)
  index       int32   [B]           record id in the source (-1: eval padding)

Short captions (method.md §2): the data's own short caption when it has one
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
import math
from typing import Any, Dict, Optional, Tuple

import grain
import ml_collections
import numpy as np

from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import sources as sources_lib
from fixclip_jax.data import transforms

SHORT_CAPTION_POLICIES = ("provided", "first_sentence")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config section, every knob named once."""
  c = ml_collections.ConfigDict()
  # Where the examples come from (sources.make_source).
  c.type = "jsonl"  # jsonl | tar | array_record | tfds | synthetic
  c.path = ""  # manifest | shard glob/folder/comma list | tfds name
  c.image_root = ""  # jsonl: root of relative image paths ("" = manifest dir)
  c.tfds_split = "train"
  c.tfds_data_dir = ""
  c.tfds_image_key = "image"
  c.tfds_caption_key = "caption"  # "/"-path into nested features
  c.synthetic_num = 1024  # type=synthetic: scenes rendered in memory
  c.synthetic_image_size = 64
  c.synthetic_seed = 0
  # Images.
  c.image_size = 224
  c.transform = "resize_center_crop"  # | random_resized_crop (train only)
  c.rrc_scale = (0.9, 1.0)  # random_resized_crop area share range
  c.rrc_ratio = (3 / 4, 4 / 3)  # random_resized_crop aspect ratio range
  c.skip_bad_images = False  # drop undecodable images instead of raising
  # Text.
  c.text_context = 248  # long captions (Long-CLIP's stretched context)
  c.short_caption = "provided"  # | first_sentence
  c.short_context = 0  # 0 = text_context
  c.filter_captions = False  # drop examples failing captions.filter_reason
  c.filters = ml_collections.ConfigDict(
      {"min_words": 8, "ngram": 3, "max_repeated_ngram_ratio": 0.3,
       "max_non_alpha_ratio": 0.25, "max_word_length": 30})
  # Order and batching.
  c.global_batch = 256  # split evenly over hosts
  c.shuffle_seed = 0
  c.num_epochs = 0  # 0 = repeat forever
  # Throughput.
  c.num_workers = 0  # grain worker processes (0 = in this process)
  c.worker_buffer_size = 2  # batches each worker prepares ahead
  c.read_threads = 4  # threads loading examples in each process
  c.prefetch_buffer = 64  # examples those threads keep ready
  return c


def _host(process_index: Optional[int], process_count: Optional[int]
          ) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
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


class _ExampleProcessor:
  """Example dict -> features (shared by train and eval loaders)."""

  def __init__(self, config, tokenizer, train: bool):
    if config.short_caption not in SHORT_CAPTION_POLICIES:
      raise ValueError(f"data.short_caption={config.short_caption!r}; known: "
                       f"{SHORT_CAPTION_POLICIES}")
    if train and config.transform not in transforms.TRAIN_TRANSFORMS:
      raise ValueError(f"data.transform={config.transform!r}; known: "
                       f"{transforms.TRAIN_TRANSFORMS}")
    self.tokenizer = tokenizer
    self.train = train
    self.seed = int(config.shuffle_seed)
    self.image_size = int(config.image_size)
    self.transform = config.transform
    self.rrc_scale = tuple(config.rrc_scale)
    self.rrc_ratio = tuple(config.rrc_ratio)
    self.skip_bad_images = bool(config.skip_bad_images)
    self.text_context = int(config.text_context)
    self.short_context = int(config.short_context) or self.text_context
    self.short_policy = config.short_caption
    self.caption_filter = None
    if config.filter_captions:
      self.caption_filter = captions_lib.CaptionFilterConfig.from_mapping(
          config.filters.to_dict())

  def short_text(self, example) -> str:
    provided = example.get("short_caption") if self.short_policy == "provided" else None
    return captions_lib.short_caption(example["caption"], provided)

  def image(self, data: bytes, record_id: int, epoch: int) -> np.ndarray:
    img = transforms.decode_image(data)
    if not self.train:
      return transforms.clip_eval_transform(img, self.image_size)
    rng = np.random.default_rng([self.seed, epoch, record_id, 1])
    return transforms.clip_train_transform(
        img, self.image_size, rng, kind=self.transform, scale=self.rrc_scale,
        ratio=self.rrc_ratio)

  def __call__(self, example, record_id: int, epoch: int
               ) -> Optional[Dict[str, np.ndarray]]:
    if (self.caption_filter is not None and captions_lib.filter_reason(
        example["caption"], self.caption_filter) is not None):
      return None
    try:
      image = self.image(example["image"], record_id, epoch)
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises
      if self.skip_bad_images:
        return None
      raise ValueError(f"Cannot decode image of example {example['key']!r} "
                       f"(record {record_id}): {e}") from e
    return {
        "image": image.astype(np.float32),
        "text_long": self.tokenizer([example["caption"]],
                                    self.text_context)[0].astype(np.int32),
        "text_short": self.tokenizer([self.short_text(example)],
                                     self.short_context)[0].astype(np.int32),
        "index": np.int32(record_id),
    }


class _LoadTrainExample:
  """(stream position, record id) -> features or None (dropped)."""

  def __init__(self, source, processor: _ExampleProcessor, epoch_length: int):
    self.source = source
    self.processor = processor
    self.epoch_length = epoch_length

  def __call__(self, position: int, record_id: int):
    epoch = position // self.epoch_length
    example = self.source.get(int(record_id), epoch)
    return self.processor(example, int(record_id), epoch)


class _LoadEvalExample:
  """Host-local position -> features; past the host's share: a padding row."""

  def __init__(self, source, processor: _ExampleProcessor, process_index: int,
               process_count: int):
    self.source = source
    self.processor = processor
    self.process_index = process_index
    self.process_count = process_count

  def padding(self):
    s, ctx = self.processor.image_size, self.processor.text_context
    return {
        "image": np.zeros((s, s, 3), np.float32),
        "text_long": np.zeros((ctx,), np.int32),
        "text_short": np.zeros((self.processor.short_context,), np.int32),
        "index": np.int32(-1),
    }

  def __call__(self, position: int):
    record_id = self.process_index + int(position) * self.process_count
    if record_id >= len(self.source):
      return self.padding()
    features = self.processor(self.source.get(record_id, 0), record_id, 0)
    return self.padding() if features is None else features


def _is_kept(features) -> bool:
  return features is not None


def _finish(ds: grain.MapDataset, config, batch_size: int, drop_remainder: bool
            ) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=int(config.read_threads),
                           prefetch_buffer_size=int(config.prefetch_buffer))
  it_ds = ds.to_iter_dataset(read).batch(batch_size,
                                         drop_remainder=drop_remainder)
  if config.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.num_workers),
        per_worker_buffer_size=int(config.worker_buffer_size)))
  return it_ds


def make_train_dataset(config, tokenizer, *, source=None,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> grain.IterDataset:
  """The train IterDataset of this host (see the module docstring)."""
  process_index, process_count = _host(process_index, process_count)
  batch = per_host_batch_size(int(config.global_batch), process_count)
  source = source if source is not None else sources_lib.make_source(config)
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  epoch_length = len(ds)
  if epoch_length < batch:
    raise ValueError(f"Host {process_index} has {epoch_length} examples, "
                     f"fewer than one batch of {batch}")
  ds = ds.shuffle(seed=int(config.shuffle_seed))
  ds = ds.repeat(int(config.num_epochs) or None)
  processor = _ExampleProcessor(config, tokenizer, train=True)
  ds = ds.map_with_index(_LoadTrainExample(source, processor, epoch_length))
  ds = ds.filter(_is_kept)
  return _finish(ds, config, batch, drop_remainder=True)


def make_train_iterator(config, tokenizer, *, source=None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None
                        ) -> grain.DatasetIterator:
  """Iterator over this host's train batches; has get_state()/set_state()."""
  return iter(make_train_dataset(config, tokenizer, source=source,
                                 process_index=process_index,
                                 process_count=process_count))


def num_eval_batches(num_examples: int, global_batch: int,
                     process_count: int) -> int:
  """Same on every host, so multi-host eval steps stay in lockstep."""
  per_host = math.ceil(num_examples / process_count)
  return math.ceil(per_host / per_host_batch_size(global_batch, process_count))


def make_eval_dataset(config, tokenizer, *, source=None,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None
                      ) -> grain.IterDataset:
  """One ordered pass, eval transform, padded to whole batches (index -1).

  Host p gets records p, p+P, p+2P, ...; every host yields num_eval_batches
  batches. Caption filters drop nothing here (a filtered example becomes a
  padding row), so eval sets keep their size.
  """
  process_index, process_count = _host(process_index, process_count)
  batch = per_host_batch_size(int(config.global_batch), process_count)
  source = source if source is not None else sources_lib.make_source(config)
  num_batches = num_eval_batches(len(source), int(config.global_batch),
                                 process_count)
  processor = _ExampleProcessor(config, tokenizer, train=False)
  ds = grain.MapDataset.range(num_batches * batch).map(
      _LoadEvalExample(source, processor, process_index, process_count))
  return _finish(ds, config, batch, drop_remainder=True)


def make_eval_iterator(config, tokenizer, *, source=None,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> grain.DatasetIterator:
  return iter(make_eval_dataset(config, tokenizer, source=source,
                                process_index=process_index,
                                process_count=process_count))


def describe(config) -> Dict[str, Any]:
  """A small dict of the knobs that shape batches, for logs."""
  return {k: config[k] for k in ("type", "path", "image_size", "global_batch",
                                 "transform", "text_context", "short_caption",
                                 "num_workers")}
