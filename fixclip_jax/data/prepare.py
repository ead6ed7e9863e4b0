"""Prepare: a JSONL manifest or webdataset tars -> ArrayRecord shards.

  python -m fixclip_jax.data.prepare --src=train.jsonl --dst=/data/train_ar \
      --num_shards=64 [--image_root=/data/images] [--max_side=512]

Reads every image once, checks it decodes, optionally shrinks it so its long
side is at most `max_side` (re-encoded: JPEG quality 95 if it was a JPEG, else
PNG), applies the caption filters (captions.filter_reason) to each caption,
and writes records (sources.encode_record: header {"key", "captions",
"short_caption"} + image bytes) round-robin into
`data-SSSSS-of-NNNNN.array_record`, plus `metadata.json`:

  count, num_input, shards, shard_counts,
  skipped: {reason: n} (missing_image, corrupt_image, missing_caption and the
      caption filter reasons when every caption of an item fails),
  skipped_keys: {reason: [first keys]}, dropped_captions: {reason: n} (single
      captions removed from items that keep others),
  caption_words / caption_tokens: length statistics of the kept captions
      (tokens: CLIP BPE, without SOT/EOT; with the share over 77 and 248),
  prompts: {prompt_id: {"prompt": text, "count": n}} when manifest lines carry
      "prompt" / "prompt_id" (the MLLM prompt templates),
  source, max_side, filters.

Output is built in a temporary folder next to DST and renamed at the end, so
DST is either complete or absent.
"""
import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tqdm

from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import sources as sources_lib

FLAGS = flags.FLAGS
METADATA_FORMAT = "fixclip_array_record_v1"
_MAX_KEYS_PER_REASON = 20
_CHUNK = 256  # items decoded concurrently (bounds memory)


def shard_name(i: int, n: int) -> str:
  return f"data-{i:05d}-of-{n:05d}.array_record"


def open_source(src: str, image_root: Optional[str] = None
                ) -> sources_lib.Source:
  """A manifest (.jsonl/.json) or a tar glob/folder/list."""
  if src.endswith((".jsonl", ".json")):
    return sources_lib.JsonlSource(src, image_root)
  return sources_lib.TarSource(src)


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
  img = img.convert("RGB").resize(new_size, Image.BICUBIC)
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


def _process_item(source, index: int, max_side: int,
                  filter_config: Optional[captions_lib.CaptionFilterConfig]):
  """-> (record bytes | None, skip reason | None, per-item info dict)."""
  try:
    rec = source.raw(index)
  except FileNotFoundError:
    return None, "missing_image", {"key": source.key(index)}
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
    return None, info["dropped"][0], info
  try:
    image = shrink_image(rec["image"], max_side)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None, "corrupt_image", info
  header = {"key": rec["key"], "captions": kept,
            "short_caption": rec.get("short_caption")}
  info["captions"] = kept
  return sources_lib.encode_record(header, image), None, info


def prepare(src: str, dst: str, num_shards: int, *,
            image_root: Optional[str] = None, max_side: int = 0,
            filter_config: Optional[captions_lib.CaptionFilterConfig] = (
                captions_lib.CaptionFilterConfig()),
            tokenizer=None, num_threads: int = 4,
            progress: bool = True) -> Dict[str, Any]:
  """Writes DST (shards + metadata.json); returns the metadata dict.

  filter_config=None keeps every caption. tokenizer (with `.encode`) adds
  token-length statistics. DST must not exist.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  dst = os.path.abspath(dst)
  if os.path.exists(dst):
    raise FileExistsError(f"{dst}: already exists")
  source = open_source(src, image_root)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  names = [shard_name(i, num_shards) for i in range(num_shards)]
  writers = []
  try:
    writers = [array_record_module.ArrayRecordWriter(
        os.path.join(tmp, name), "group_size:1") for name in names]
    skipped = collections.Counter(getattr(source, "skipped", {}))
    skipped_keys = collections.defaultdict(list)
    dropped = collections.Counter()
    prompts: Dict[str, Dict[str, Any]] = {}
    words, tokens = [], []
    shard_counts = [0] * num_shards
    count = 0
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
            skipped[reason] += 1
            if len(skipped_keys[reason]) < _MAX_KEYS_PER_REASON:
              skipped_keys[reason].append(info["key"])
            continue
          dropped.update(info["dropped"])
          writers[count % num_shards].write(record)
          shard_counts[count % num_shards] += 1
          count += 1
          for caption in info["captions"]:
            words.append(len(captions_lib.words(caption)))
            if tokenizer is not None:
              tokens.append(len(tokenizer.encode(caption)))
          if info["prompt_id"] is not None or info["prompt"] is not None:
            pid = str(info["prompt_id"] if info["prompt_id"] is not None
                      else info["prompt"])
            entry = prompts.setdefault(pid, {"prompt": info["prompt"],
                                             "count": 0})
            entry["count"] += 1
    bar.close()
    for w in writers:
      w.close()
    writers = []
    metadata = {
        "format": METADATA_FORMAT,
        "record_format": ("b'FXC1' | uint32 LE header length | JSON header "
                          "{key, captions, short_caption} | image bytes"),
        "count": count,
        "num_input": len(source) + sum(getattr(source, "skipped", {}).values()),
        "num_shards": num_shards,
        "shards": names,
        "shard_counts": shard_counts,
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "skipped_keys": {k: v for k, v in sorted(skipped_keys.items())},
        "dropped_captions": dict(sorted(dropped.items())),
        "caption_words": _length_stats(words),
        "caption_tokens": (_length_stats(tokens, (77, 248))
                           if tokenizer is not None else None),
        "prompts": prompts,
        "source": src,
        "max_side": max_side,
        "filters": (dataclasses.asdict(filter_config)
                    if filter_config is not None else None),
    }
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
      json.dump(metadata, f, indent=2)
    os.rename(tmp, dst)
  except BaseException:
    for w in writers:
      w.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Wrote %d examples to %s (skipped %s)", count, dst,
               metadata["skipped"])
  return metadata


def define_flags():
  flags.DEFINE_string("src", None, "JSONL manifest, or webdataset tar glob.")
  flags.DEFINE_string("dst", None, "Output folder (must not exist).")
  flags.DEFINE_integer("num_shards", 16, "Number of ArrayRecord shards.")
  flags.DEFINE_string("image_root", None,
                      "Root of relative manifest image paths "
                      "(default: the manifest's folder).")
  flags.DEFINE_integer("max_side", 0,
                       "Shrink images whose long side exceeds this (0: keep "
                       "the original bytes).")
  flags.DEFINE_bool("filter", True, "Apply the caption filters.")
  flags.DEFINE_integer("min_words", 8, "Caption filter: minimum words.")
  flags.DEFINE_float("max_repeated_ngram_ratio", 0.3,
                     "Caption filter: repeated 3-gram share.")
  flags.DEFINE_float("max_non_alpha_ratio", 0.25,
                     "Caption filter: non-letter character share.")
  flags.DEFINE_integer("max_word_length", 30, "Caption filter: longest word.")
  flags.DEFINE_string("tokenizer", "clip",
                      "Tokenizer for token statistics ('' to skip).")
  flags.DEFINE_integer("num_threads", 4, "Image decoding threads.")


def main(argv: List[str]) -> None:
  del argv
  if not FLAGS.src or not FLAGS.dst:
    raise app.UsageError("--src and --dst are required")
  filter_config = None
  if FLAGS.filter:
    filter_config = captions_lib.CaptionFilterConfig(
        min_words=FLAGS.min_words,
        max_repeated_ngram_ratio=FLAGS.max_repeated_ngram_ratio,
        max_non_alpha_ratio=FLAGS.max_non_alpha_ratio,
        max_word_length=FLAGS.max_word_length)
  tokenizer = None
  if FLAGS.tokenizer:
    from fixclip_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizer = tokenizers.get_tokenizer(FLAGS.tokenizer)
  metadata = prepare(FLAGS.src, FLAGS.dst, FLAGS.num_shards,
                     image_root=FLAGS.image_root, max_side=FLAGS.max_side,
                     filter_config=filter_config, tokenizer=tokenizer,
                     num_threads=FLAGS.num_threads)
  print(json.dumps({k: metadata[k] for k in ("count", "skipped",
                                             "dropped_captions")}, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
