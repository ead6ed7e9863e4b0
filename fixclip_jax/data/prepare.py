"""Prepare: a JSONL manifest, ShareGPT4V's json or webdataset tars -> ArrayRecord shards.

  python -m fixclip_jax.data.prepare --src=train.jsonl --dst=/data/train_ar \
      --num_shards=64 [--image_root=/data/images] [--max_side=512]
  python -m fixclip_jax.data.prepare --dst=/data/sharegpt4v_ar \
      --src=/data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json

ShareGPT4V's captioner json (data/sharegpt4v.py; recognised by its name or
by holding a JSON list) is read without its first --holdout_first entries
(1000: the evaluation split sharegpt4v_1k, as Long-CLIP's train/sharegpt4v.py).

Reads every image once, checks it decodes, optionally shrinks it so its long
side is at most `max_side` (re-encoded: JPEG quality 95 if it was a JPEG, else
PNG), applies the caption filters (captions.filter_reason) to each caption,
and writes records (sources.encode_record: header {"key", "captions",
"short_caption"} + image bytes) round-robin into
`data-SSSSS-of-NNNNN.array_record`, plus `metadata.json`:

  count, num_input (the items read: a ShareGPT4V json's entries after the
      holdout), shards, shard_counts,
  skipped: {reason: n} over pipeline.SKIP_REASONS, in its order (the names
      the training metrics count bad data under): missing_file,
      bad_caption_encoding, unreadable_image, and, when no caption of an item
      passes the filters, empty_caption (blank) or caption_filter; tar shards
      also count keys without an image (missing_file) or caption
      (empty_caption) while being indexed,
  skipped_keys: {reason: [first keys]},
  caption_filter_reasons: {filter reason: n} (captions.REASONS: the first
      caption's rejecting filter of each item skipped for its captions),
  dropped_captions: {filter reason: n} (single captions removed from items
      that keep others),
  caption_words / caption_tokens: length statistics of the kept captions
      (tokens: the --tokenizer's, without SOT/EOT; with the share over 77
      and 248),
  prompts: {prompt_id: {"prompt": text, "count": n}} when manifest lines carry
      "prompt" / "prompt_id" (the MLLM prompt templates),
  source, source_format (jsonl | sharegpt4v | tar), holdout_first (the
      ShareGPT4V entries left out; the evaluation warns when a ShareGPT4V
      split it scores was not), max_side, filters.

Output is written through fileio.atomic_directory, so DST (a local path or
a URL) is either complete or absent.
"""
import collections
import concurrent.futures
import dataclasses
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
import numpy as np
from PIL import Image
import tqdm

from fixclip_jax import cli
from fixclip_jax import fileio
from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import sharegpt4v
from fixclip_jax.data import sources as sources_lib
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms

FLAGS = flags.FLAGS
METADATA_FORMAT = "fixclip_array_record_v1"
_DEFAULT_FILTERS = captions_lib.CaptionFilterConfig()
_MAX_KEYS_PER_REASON = 20
_CHUNK = 256  # items decoded concurrently (bounds memory)


def shard_name(i: int, n: int) -> str:
  return f"data-{i:05d}-of-{n:05d}.array_record"


def open_source(src: str, image_root: Optional[str] = None,
                holdout_first: int = sharegpt4v.EVAL_HOLDOUT
                ) -> sources_lib.Source:
  """ShareGPT4V's json (without its first `holdout_first` entries), a
  manifest (.jsonl/.json) or a tar glob/folder/list."""
  if sharegpt4v.is_captioner_json(src):
    return sources_lib.ShareGPT4VSource(src, image_root, holdout_first)
  if src.endswith((".jsonl", ".json")):
    return sources_lib.JsonlSource(src, image_root)
  return sources_lib.TarSource(src)


def source_format(source: sources_lib.Source) -> str:
  """metadata.json's source_format."""
  if isinstance(source, sources_lib.ShareGPT4VSource):
    return "sharegpt4v"
  return "jsonl" if isinstance(source, sources_lib.JsonlSource) else "tar"


def shrink_image(data: bytes, max_side: int) -> bytes:
  """Checks `data` decodes; re-encodes it only when its long side > max_side.

  Raises OSError/ValueError (PIL's errors) for an undecodable image.
  """
  img = Image.open(io.BytesIO(data))
  fmt = img.format
  img.load()
  if max_side <= 0 or max(img.size) <= max_side:
    return data
  scale = max_side / max(img.size)
  new_size = tuple(max(1, int(round(s * scale))) for s in img.size)
  img = transforms.to_rgb(img).resize(new_size, Image.BICUBIC)
  buf = io.BytesIO()
  if fmt == "JPEG":
    img.save(buf, format="JPEG", quality=95)
  else:
    img.save(buf, format="PNG")
  return buf.getvalue()


def _length_stats(values: Sequence[int], limits: Sequence[int] = ()
                  ) -> Dict[str, float]:
  if not values:
    return {"count": 0}
  v = np.asarray(values)
  stats = {"count": int(v.size), "mean": float(v.mean()), "min": int(v.min()),
           "p50": float(np.percentile(v, 50)),
           "p95": float(np.percentile(v, 95)), "max": int(v.max())}
  for limit in limits:
    stats[f"frac_over_{limit}"] = float((v > limit).mean())
  return stats


def _item_caption_reason(filter_reason: str) -> str:
  """The pipeline.SKIP_REASONS name of an item whose first caption was
  rejected by `filter_reason`: a blank caption is "empty_caption" to the
  pipeline (checked before any filter), any other rejection "caption_filter"."""
  return "empty_caption" if filter_reason == "empty" else "caption_filter"


def _process_item(source, index: int, max_side: int,
                  filter_config: Optional[captions_lib.CaptionFilterConfig]):
  """-> (record bytes | None, pipeline.SKIP_REASONS name | None, info dict).

  Checks in the pipeline's order: reading, captions, then the image.
  """
  try:
    rec = source.raw(index)
  except (OSError, sources_lib.BadRecordError, sources_lib.CaptionEncodingError) as e:
    # The same reasons as the training pipeline's (a bad line, a special or
    # unreadable file, a read timeout, ...): skipped and counted, never fatal.
    return None, pipeline.read_error_reason(e), {"key": source.key(index)}
  info = {"key": rec["key"], "prompt": rec.get("prompt"),
          "prompt_id": rec.get("prompt_id"), "dropped": []}
  kept = []
  for caption in rec["captions"]:
    reason = (captions_lib.filter_reason(caption, filter_config)
              if filter_config is not None else None)
    if reason is None:
      kept.append(caption)
    else:
      info["dropped"].append(reason)
  if not kept:
    info["filter_reason"] = info["dropped"][0]
    return None, _item_caption_reason(info["filter_reason"]), info
  try:
    image = shrink_image(rec["image"], max_side)
  except transforms.DECODE_ERRORS:
    return None, "unreadable_image", info
  header = {"key": rec["key"], "captions": kept,
            "short_caption": rec.get("short_caption")}
  info["captions"] = kept
  return sources_lib.encode_record(header, image), None, info


class _Tally:
  """What prepare() reports about the items it read (see metadata.json)."""

  def __init__(self, num_shards: int, source_skipped, tokenizer):
    # Every pipeline reason, zeros included, in the pipeline's order; skips
    # made while indexing the source (tar) use the same names.
    self.skipped = collections.Counter(dict.fromkeys(pipeline.SKIP_REASONS, 0))
    self.skipped.update(source_skipped)
    self.skipped_keys = collections.defaultdict(list)
    self.filter_reasons = collections.Counter()
    self.dropped = collections.Counter()
    self.prompts: Dict[str, Dict[str, Any]] = {}
    self.words, self.tokens = [], []
    self.shard_counts = [0] * num_shards
    self.count = 0
    self.tokenizer = tokenizer

  def skip(self, reason: str, info: Dict[str, Any]) -> None:
    self.skipped[reason] += 1
    if len(self.skipped_keys[reason]) < _MAX_KEYS_PER_REASON:
      self.skipped_keys[reason].append(info["key"])
    if "filter_reason" in info:
      self.filter_reasons[info["filter_reason"]] += 1

  def keep(self, info: Dict[str, Any]) -> int:
    """Counts a written item; returns its shard."""
    shard = self.count % len(self.shard_counts)
    self.shard_counts[shard] += 1
    self.count += 1
    self.dropped.update(info["dropped"])
    for caption in info["captions"]:
      self.words.append(len(captions_lib.words(caption)))
      if self.tokenizer is not None:
        self.tokens.append(len(self.tokenizer.encode(caption)))
    if info["prompt_id"] is not None or info["prompt"] is not None:
      pid = str(info["prompt_id"] if info["prompt_id"] is not None
                else info["prompt"])
      entry = self.prompts.setdefault(pid, {"prompt": info["prompt"],
                                            "count": 0})
      entry["count"] += 1
    return shard


def prepare(src: str, dst: str, num_shards: int, *,
            image_root: Optional[str] = None, max_side: int = 0,
            filter_config: Optional[captions_lib.CaptionFilterConfig] = (
                _DEFAULT_FILTERS),
            tokenizer=None, num_threads: int = 4,
            progress: bool = True,
            holdout_first: int = sharegpt4v.EVAL_HOLDOUT) -> Dict[str, Any]:
  """Writes DST (shards + metadata.json); returns the metadata dict.

  filter_config=None keeps every caption. tokenizer (with `.encode`) adds
  token-length statistics. holdout_first: ShareGPT4V entries left out (other
  sources ignore it). DST must not exist.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  # Before indexing the source, which can take long; atomic_directory checks
  # again when it starts.
  fileio.refuse_existing(dst, overwrite=False)
  source = open_source(src, image_root, holdout_first)
  source_skipped = getattr(source, "skipped", {})
  names = [shard_name(i, num_shards) for i in range(num_shards)]
  tally = _Tally(num_shards, source_skipped, tokenizer)
  with fileio.atomic_directory(dst) as tmp:
    writers = [array_record_module.ArrayRecordWriter(
        os.path.join(tmp, name), "group_size:1") for name in names]
    try:
      bar = tqdm.tqdm(total=len(source), desc="prepare", unit="img",
                      disable=not progress)
      with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, len(source), _CHUNK):
          indices = range(start, min(start + _CHUNK, len(source)))
          results = pool.map(
              lambda i: _process_item(source, i, max_side, filter_config),
              indices)
          for record, reason, info in results:
            bar.update(1)
            if record is None:
              tally.skip(reason, info)
            else:
              writers[tally.keep(info)].write(record)
      bar.close()
    finally:
      for w in writers:
        w.close()
    metadata = {
        "format": METADATA_FORMAT,
        "record_format": ("b'FXC1' | uint32 LE header length | JSON header "
                          "{key, captions, short_caption} | image bytes"),
        "count": tally.count,
        "num_input": len(source) + sum(source_skipped.values()),
        "num_shards": num_shards,
        "shards": names,
        "shard_counts": tally.shard_counts,
        "skipped": dict(tally.skipped),
        "skipped_total": sum(tally.skipped.values()),
        "skipped_keys": {k: v for k, v in sorted(tally.skipped_keys.items())},
        "caption_filter_reasons": dict(sorted(tally.filter_reasons.items())),
        "dropped_captions": dict(sorted(tally.dropped.items())),
        "caption_words": _length_stats(tally.words),
        "caption_tokens": (_length_stats(tally.tokens, (77, 248))
                           if tokenizer is not None else None),
        "prompts": tally.prompts,
        "source": src,
        "source_format": source_format(source),
        "holdout_first": (source.pairs.holdout_first
                          if isinstance(source, sources_lib.ShareGPT4VSource)
                          else None),
        "max_side": max_side,
        "filters": (dataclasses.asdict(filter_config)
                    if filter_config is not None else None),
    }
    with open(os.path.join(tmp, sources_lib.METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2)
  logging.info("Wrote %d examples to %s (skipped %s)", tally.count, dst,
               {k: n for k, n in metadata["skipped"].items() if n})
  return metadata


def define_flags():
  flags.DEFINE_string("src", None, "JSONL manifest, ShareGPT4V's captioner "
                      "json, or webdataset tar glob.")
  flags.DEFINE_string("dst", None, "Output folder (must not exist).")
  flags.DEFINE_integer("num_shards", 16, "Number of ArrayRecord shards.")
  flags.DEFINE_string("image_root", None,
                      "Root of relative manifest image paths "
                      "(default: the manifest's folder).")
  flags.DEFINE_integer("max_side", 0,
                       "Shrink images whose long side exceeds this (0: keep "
                       "the original bytes).")
  flags.DEFINE_bool("filter", True, "Apply the caption filters.")
  # Filter defaults: captions.CaptionFilterConfig, the one definition.
  flags.DEFINE_integer("min_words", _DEFAULT_FILTERS.min_words,
                       "Caption filter: minimum words.")
  flags.DEFINE_float("max_repeated_ngram_ratio",
                     _DEFAULT_FILTERS.max_repeated_ngram_ratio,
                     "Caption filter: repeated n-gram share.")
  flags.DEFINE_float("max_non_alpha_ratio",
                     _DEFAULT_FILTERS.max_non_alpha_ratio,
                     "Caption filter: non-letter character share.")
  flags.DEFINE_integer("max_word_length", _DEFAULT_FILTERS.max_word_length,
                       "Caption filter: longest word.")
  flags.DEFINE_string("tokenizer", "clip",
                      "Tokenizer for token statistics: 'clip' or a "
                      "SentencePiece .model path ('' to skip).")
  flags.DEFINE_integer("num_threads", 4, "Image decoding threads.")
  flags.DEFINE_integer("holdout_first", sharegpt4v.EVAL_HOLDOUT,
                       "ShareGPT4V json: leave out its first entries (1000: "
                       "the evaluation split sharegpt4v_1k; 0 = train on all).")


def main(argv: List[str]) -> None:
  cli.reject_positional_arguments(argv)
  if not FLAGS.src or not FLAGS.dst:
    raise app.UsageError("--src and --dst are required")
  filter_config = None
  if FLAGS.filter:
    filter_config = dataclasses.replace(
        _DEFAULT_FILTERS, min_words=FLAGS.min_words,
        max_repeated_ngram_ratio=FLAGS.max_repeated_ngram_ratio,
        max_non_alpha_ratio=FLAGS.max_non_alpha_ratio,
        max_word_length=FLAGS.max_word_length)
  tokenizer = None
  if FLAGS.tokenizer:
    tokenizer = tokenizers.get_tokenizer(FLAGS.tokenizer)
  metadata = prepare(FLAGS.src, FLAGS.dst, FLAGS.num_shards,
                     image_root=FLAGS.image_root, max_side=FLAGS.max_side,
                     filter_config=filter_config, tokenizer=tokenizer,
                     num_threads=FLAGS.num_threads,
                     holdout_first=FLAGS.holdout_first)
  print(json.dumps({k: metadata[k] for k in ("count", "skipped",
                                             "dropped_captions")}, indent=2))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
