"""Input pipeline throughput: decode + random-resized-crop + tokenise.

  python -m fixclip_jax.tools.data_bench [--num=512] [--image_size=224] \
      [--num_workers=0,1,2] [--source=synthetic|PATH/manifest.jsonl] \
      [--format=jpeg|png] [--render_size=512] [--jpeg_draft=true,false] \
      [--json=/tmp/data_bench.json]

What is timed is the train pipeline itself (pipeline.make_train_iterator):
read the file, decode, random-resized-crop to image_size (bicubic), CLIP
normalisation, tokenise the long caption (248 tokens) and the short one, batch;
with num_workers > 0 in grain worker processes. The first batch is not timed
(worker start-up, buffers filling); then `num` images are. One row per
(num_workers, jpeg_draft): images/s overall, per process doing the work
(num_workers, or 1 in-process), and per CPU-second of this process and its
workers over the timed window (the per-core rate; on a machine shared with
other jobs wall time also counts waiting for a core, CPU time much less).

A second table breaks one in-process, single-threaded pass into stages (CPU
ms per image), so it says what dominates.

--source=synthetic renders scenes (fixclip_jax.data.synthetic) at
render_size px, adds mild Gaussian pixel noise (sigma 12) so that JPEGs have a
photo-like size (~95 KB at 512 px, quality 90; flat renders would be ~20 KB and
decode 2.5x faster than photos), and writes them as JPEG or PNG files with a
JSONL manifest to a temporary folder, so decoding is real. A manifest path
benchmarks that dataset instead.
"""
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from typing import Any, Dict, Iterator, Optional, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax.data import pipeline
from fixclip_jax.data import sources as sources_lib
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms

FORMATS = ("jpeg", "png")
NOISE_SIGMA = 12.0  # pixel noise of the synthetic images (see docstring)


def _noisy_scene(index: int, render_size: int, seed: int) -> Dict[str, Any]:
  """synthetic example `index`, its image as an RGB uint8 array with noise."""
  ex = synthetic.synthetic_example(index, render_size, seed)
  pixels = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"),
                      np.float32)
  rng = np.random.default_rng([seed, index, 7])
  pixels += rng.normal(0.0, NOISE_SIGMA, pixels.shape)
  ex["pixels"] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  return ex


def write_bench_dataset(dst: str, num: int, render_size: int = 512,
                        fmt: str = "jpeg", seed: int = 0) -> str:
  """Writes DST/images/*.{jpg,png} + DST/manifest.jsonl; returns the manifest.

  DST must not exist; it is built in a temporary folder and renamed.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}; known: {FORMATS}")
  ext = "jpg" if fmt == "jpeg" else "png"
  kwargs = {"quality": 90} if fmt == "jpeg" else {}

  def records():
    for i in range(num):
      ex = _noisy_scene(i, render_size, seed)
      buf = io.BytesIO()
      Image.fromarray(ex["pixels"]).save(buf, format=fmt.upper(), **kwargs)
      yield (f"images/{i:06d}.{ext}", buf.getvalue(),
             {"caption": ex["caption"], "short_caption": ex["short_caption"],
              "key": ex["key"]})

  return synthetic.write_manifest_dataset(dst, records())


@contextlib.contextmanager
def _dataset(source: str, num_files: int, render_size: int, fmt: str
             ) -> Iterator[str]:
  """The manifest to read: `source` itself, or a temporary synthetic one."""
  if source != "synthetic":
    if not os.path.isfile(source):
      raise FileNotFoundError(f"{source}: manifest not found (--source takes "
                              "'synthetic' or a JSONL manifest path)")
    yield source
    return
  with tempfile.TemporaryDirectory(prefix="fixclip-data-bench-",
                                   ignore_cleanup_errors=True) as root:
    yield write_bench_dataset(os.path.join(root, "data"), num_files,
                              render_size, fmt)


def bench_data_config(manifest: str, image_size: int, num_workers: int,
                      batch: int, jpeg_draft: bool = True,
                      read_threads: Optional[int] = None):
  """The train data config that is timed (defaults as training uses them)."""
  c = config_base.base_config().data
  c.type, c.path = "jsonl", manifest
  c.image_size = image_size
  c.transform = "random_resized_crop"
  c.rrc_jpeg_draft = jpeg_draft
  c.global_batch = batch
  c.num_epochs = 0  # repeat: `num` may exceed the number of files
  c.num_workers = num_workers
  if read_threads is not None:
    c.read_threads = read_threads
  return c


def process_tree_cpu_s() -> Optional[float]:
  """CPU seconds (user + system, all threads) of this process and its live
  descendants (grain's workers), from /proc; None where there is no /proc."""
  tick = os.sysconf("SC_CLK_TCK")
  total, pending = 0.0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      with open(f"/proc/{pid}/stat") as f:
        # Fields after the ")" closing the command name: state is the 1st,
        # utime and stime (in ticks) the 12th and 13th.
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          pending.extend(int(child) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
      continue  # exited meanwhile
    except OSError:
      return None
  return total


def measure_pipeline(config, tokenizer, num: int) -> Dict[str, Any]:
  """Times `num` images (after one untimed batch) of the train iterator."""
  batch = int(config.global_batch)
  num_batches = max(1, -(-num // batch))
  it = pipeline.make_train_iterator(config, tokenizer, process_index=0,
                                    process_count=1)
  try:
    next(it)  # untimed: worker start-up, buffers filling
    # CPU of this process and the workers over the timed window: the workers'
    # buffers are full at its start and again at its end, so the work done
    # in it is the work of the batches consumed in it.
    cpu0, load0 = process_tree_cpu_s(), os.getloadavg()[0]
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    seconds = time.perf_counter() - start
    cpu1 = process_tree_cpu_s()
  finally:
    if hasattr(it, "close"):
      it.close()
  images = num_batches * batch
  processes = max(1, int(config.num_workers))
  cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
  # /proc counts clock ticks (10 ms): a shorter window gives no usable rate.
  enough_cpu = cpu is not None and cpu >= 5 / os.sysconf("SC_CLK_TCK")
  return {
      "num_workers": int(config.num_workers),
      "read_threads": int(config.read_threads),
      "jpeg_draft": bool(config.rrc_jpeg_draft),
      "batch": batch,
      "images": images,
      "seconds": seconds,
      "images_per_s": images / seconds,
      "images_per_s_per_process": images / seconds / processes,
      "cpu_s": cpu,
      "images_per_cpu_s": images / cpu if enough_cpu else None,
      "load_avg_1m": [load0, os.getloadavg()[0]],
  }


def _best_ms(fn, items: Sequence[Any], repeats: int = 3) -> float:
  """Best-of-`repeats` mean CPU time of fn over items, ms per item.

  This thread's CPU time, not wall time: on a machine shared with other
  jobs, wall time also counts waiting for a core.
  """
  best = float("inf")
  for _ in range(repeats):
    start = time.thread_time()
    for item in items:
      fn(item)
    best = min(best, (time.thread_time() - start) / len(items))
  return best * 1e3


def measure_stages(manifest: str, image_size: int, tokenizer,
                   num: int = 32) -> Dict[str, float]:
  """CPU ms per image of each stage, in this process, single-threaded."""
  src = sources_lib.JsonlSource(manifest)
  ids = list(range(min(num, len(src))))
  examples = [src[i] for i in ids]
  data = [ex["image"] for ex in examples]
  decoded = [transforms.decode_image(d) for d in data]
  config = config_base.base_config().data
  scale, ratio = tuple(config.rrc_scale), tuple(config.rrc_ratio)
  rng = lambda i: np.random.default_rng([0, 0, i, 1])
  crops = [transforms.random_resized_crop(img, image_size, rng(i), scale, ratio)
           for i, img in zip(ids, decoded)]
  ctx = int(config.text_context)
  stages = {
      "read file": _best_ms(lambda i: src[i], ids),
      "decode (full size)": _best_ms(transforms.decode_image, data),
      "crop + bicubic resize (from full size)": _best_ms(
          lambda i: transforms.random_resized_crop(
              decoded[i], image_size, rng(i), scale, ratio), ids),
      "decode + crop + resize, JPEG draft": _best_ms(
          lambda i: transforms.decode_random_resized_crop(
              data[i], image_size, rng(i), scale, ratio, draft=True), ids),
      "normalise": _best_ms(transforms.normalize_pixels, crops),
      f"tokenise long ({ctx})": _best_ms(
          lambda ex: tokenizer([ex["caption"]], ctx), examples),
      f"tokenise short ({ctx})": _best_ms(
          lambda ex: tokenizer([ex["short_caption"] or ex["caption"]], ctx),
          examples),
  }
  common = (stages["read file"] + stages["normalise"]
            + stages[f"tokenise long ({ctx})"]
            + stages[f"tokenise short ({ctx})"])
  full = (stages["decode (full size)"]
          + stages["crop + bicubic resize (from full size)"])
  return {
      "ms_per_image": stages,
      "images_per_s_one_core_full_decode": 1e3 / (common + full),
      "images_per_s_one_core_jpeg_draft": 1e3 / (
          common + stages["decode + crop + resize, JPEG draft"]),
  }


def run_bench(num: int = 512, image_size: int = 224,
              num_workers: Sequence[int] = (0, 1, 2),
              source: str = "synthetic", fmt: str = "jpeg",
              render_size: int = 512, jpeg_draft: Sequence[bool] = (True,),
              batch: int = 32, num_files: Optional[int] = None,
              read_threads: Optional[int] = None,
              stage_images: int = 32) -> Dict[str, Any]:
  """Runs every (num_workers, jpeg_draft) row and the stage breakdown."""
  tokenizer = tokenizers.get_tokenizer("clip")
  num_files = num_files or min(num, 256)
  with _dataset(source, num_files, render_size, fmt) as manifest:
    image_bytes = [len(sources_lib.JsonlSource(manifest)[i]["image"])
                   for i in range(min(16, num_files))]
    rows = []
    for workers in num_workers:
      for draft in jpeg_draft:
        config = bench_data_config(manifest, image_size, workers, batch,
                                   draft, read_threads)
        rows.append(measure_pipeline(config, tokenizer, num))
    stages = measure_stages(manifest, image_size, tokenizer, stage_images)
  return {
      "source": source, "format": fmt if source == "synthetic" else "as is",
      "render_size": render_size if source == "synthetic" else None,
      "mean_file_kb": float(np.mean(image_bytes)) / 1e3,
      "image_size": image_size, "num_files": num_files,
      "cpus": len(os.sched_getaffinity(0)), "machine": platform.node(),
      "date": time.strftime("%Y-%m-%d %H:%M"),
      "rows": rows, "stages": stages,
  }


def write_json(result: Dict[str, Any], path: str) -> None:
  """Writes the result atomically (never half-written); `path` may be a URL."""
  fileio.atomic_write(path, json.dumps(result, indent=2))


def format_table(r: Dict[str, Any]) -> str:
  """Markdown: the pipeline rows, then the single-core stage breakdown."""
  lines = [
      f"Input pipeline, {r['source']} ({r['format']}, "
      f"{r['render_size'] or '?'} px, {r['mean_file_kb']:.0f} KB/file, "
      f"{r['num_files']} files) -> {r['image_size']} px random-resized-crop "
      f"+ tokenise; {r['cpus']} CPUs, load avg (1 min) shown per row.",
      "",
      "| workers | threads/process | JPEG draft | images | seconds | "
      "images/s | images/s per process | images per CPU-s | load avg |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in r["rows"]:
    per_cpu = row["images_per_cpu_s"]
    lines.append(
        f"| {row['num_workers']} | {row['read_threads']} | "
        f"{'on' if row['jpeg_draft'] else 'off'} | {row['images']} | "
        f"{row['seconds']:.2f} | {row['images_per_s']:.0f} | "
        f"{row['images_per_s_per_process']:.0f} | "
        f"{'-' if per_cpu is None else f'{per_cpu:.0f}'} | "
        f"{row['load_avg_1m'][0]:.1f}-{row['load_avg_1m'][1]:.1f} |")
  stages = r["stages"]
  lines += ["", "| stage (one thread) | CPU ms per image |", "|---|---|"]
  lines += [f"| {name} | {ms:.2f} |"
            for name, ms in stages["ms_per_image"].items()]
  lines += [
      f"| => images per core-second, full-size decode | "
      f"{stages['images_per_s_one_core_full_decode']:.0f} |",
      f"| => images per core-second, JPEG draft decode | "
      f"{stages['images_per_s_one_core_jpeg_draft']:.0f} |",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program, so that importing
  this module next to other CLIs, e.g. tools.bench, never clashes)."""
  flags.DEFINE_integer("num", 512, "Images timed per row (after one untimed "
                       "batch).")
  flags.DEFINE_integer("image_size", 224, "Output image size.")
  flags.DEFINE_list("num_workers", ["0", "1", "2"],
                    "grain worker process counts, one row each.")
  flags.DEFINE_string("source", "synthetic", "'synthetic' or a JSONL manifest "
                      "path.")
  flags.DEFINE_enum("format", "jpeg", FORMATS, "Synthetic images' file format.")
  flags.DEFINE_integer("render_size", 512, "Synthetic images' size in px.")
  flags.DEFINE_integer("num_files", None, "Synthetic files written (default "
                       "min(num, 256); the stream repeats).")
  flags.DEFINE_list("jpeg_draft", ["true"], "data.rrc_jpeg_draft values, one "
                    "row each (true,false compares).")
  flags.DEFINE_integer("batch", 32, "Batch size.")
  flags.DEFINE_integer("read_threads", None, "Threads per process (default: "
                       "data.read_threads).")
  flags.DEFINE_string("json", None, "Also write the result as JSON here (a "
                      "local path or a URL).")


def _bool(text: str) -> bool:
  if text.lower() in ("true", "1", "on", "yes"):
    return True
  if text.lower() in ("false", "0", "off", "no"):
    return False
  raise app.UsageError(f"--jpeg_draft: {text!r} is not true/false")


def main(argv):
  cli.reject_positional_arguments(argv)
  try:
    workers = [int(w) for w in FLAGS.num_workers]
  except ValueError:
    raise app.UsageError(f"--num_workers={FLAGS.num_workers}: not integers"
                         ) from None
  result = run_bench(num=FLAGS.num, image_size=FLAGS.image_size,
                     num_workers=workers, source=FLAGS.source,
                     fmt=FLAGS.format, render_size=FLAGS.render_size,
                     jpeg_draft=[_bool(d) for d in FLAGS.jpeg_draft],
                     batch=FLAGS.batch, num_files=FLAGS.num_files,
                     read_threads=FLAGS.read_threads)
  print(format_table(result))
  if FLAGS.json:
    write_json(result, FLAGS.json)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
