"""Text and image features from a checkpoint, into a .npz file.

  fixclip-embed --checkpoint=/ckpt/longclip_b16 \
      --texts=captions.txt --images='photos/*.jpg' --out=features.npz \
      [--tokenizer=clip | --tokenizer=/path/spm.model] [--long_text=chunks]
  python -m fixclip_jax.embed --checkpoint=WORKDIR [--step=N] ...

--checkpoint is anything `fixclip_jax.load` reads (api.py): one of our model
directories, a training WORKDIR (its latest step, or --step), an OpenAI /
open_clip / Long-CLIP .pt / .safetensors file, a Hugging Face CLIPModel
directory. Preprocessing and tokenization: docs/method.md §1.

The .npz holds L2-normalised float32 `text_features` [N, d] and
`image_features` [M, d], the `texts` (one per non-blank line of --texts) and
`image_paths` in the same order as the feature rows, `skipped_images`
(files that could not be decoded; each is also logged as a warning), and
`texts_cut` (bool per text: longer than the model's context).

Texts longer than the context (--long_text, api.py): "truncate" (default)
cuts them, end token kept, and says how many in a warning line and in the
summary; "chunks" embeds each as the normalised mean of its normalised
context-window features (a text that fits: one window, the same features).

Batches always have --batch_size rows (the last is zero-padded and its padded
rows dropped), so each tower compiles once (the text tower once per length
bucket: each text batch is cut to the smallest of --text_buckets holding its
longest text, which gives the same features, buckets.py). --tokenizer is what the model was
trained with (config.data.tokenizer; a WORKDIR's own by default); it must fit
the model's vocab_size and eot_token_id (tokenizers.check_model_compatible).
"""
import concurrent.futures
import glob
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import numpy as np

from fixclip_jax import api
from fixclip_jax import buckets
from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.evaluation import retrieval

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _try_load(path: str, image_size: int) -> Optional[np.ndarray]:
  """[S, S, 3] CLIP pixels, or None (with a warning) if the file can't be read."""
  try:
    return retrieval.load_pixels(path, image_size)
  except transforms.DECODE_ERRORS as e:
    logging.warning("Skipping unreadable image %s: %s", path, e)
    return None


def embed_image_files(paths: Sequence[str], image_fn, batch_size: int,
                      image_size: int, num_threads: int = 8
                      ) -> Tuple[np.ndarray, List[str], List[str]]:
  """Decodes (thread pool) and embeds images, skipping unreadable ones.

  Returns (features [M, d] of the readable images, their paths, skipped paths),
  readable images in input order.
  """
  features, kept, skipped = [], [], []
  pending: List[np.ndarray] = []          # decoded, not yet embedded

  def flush(count):
    batch = retrieval.pad_rows(np.stack(pending[:count]), batch_size)
    features.append(np.asarray(image_fn(batch))[:count])
    del pending[:count]

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      for path, pixels in zip(chunk, pool.map(lambda p: _try_load(p, image_size), chunk)):
        if pixels is None:
          skipped.append(path)
        else:
          kept.append(path)
          pending.append(pixels)
      while len(pending) >= batch_size:
        flush(batch_size)
      logging.info("images: %d/%d read, %d embedded, %d skipped",
                   start + len(chunk), len(paths), len(kept) - len(pending),
                   len(skipped))
  if pending:
    flush(len(pending))
  return _stack(features), kept, skipped


def _stack(parts):
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# The eval's text buckets (config_base defaults): embed and eval cut alike.
TEXT_BUCKETS = buckets.eval_buckets(config_base.base_config().data)


def encode_tokens_bucketed(model: api.Model, tokens: np.ndarray,
                           text_buckets: Sequence[int]) -> np.ndarray:
  """model.encode_tokens of [N, C] rows, each batch cut to its length bucket
  (buckets.py: the same features, less compute for short texts): [N, d]."""
  if not len(tokens) or not text_buckets:
    return model.encode_tokens(tokens)
  return np.concatenate([
      model.encode_tokens(buckets.cut_to_bucket(
          tokens[start:start + model.batch_size], text_buckets,
          model.cfg.eot_token_id))
      for start in range(0, len(tokens), model.batch_size)])


def encode_texts_bucketed(model: api.Model, texts: List[str],
                          text_buckets: Sequence[int]) -> np.ndarray:
  """model.encode_text (texts cut to the context), each batch cut to its
  length bucket: [N, d]."""
  if not texts or not text_buckets:
    return model.encode_text(texts)
  return encode_tokens_bucketed(model, model.tokenize(texts), text_buckets)


def encode_texts(model: api.Model, texts: List[str],
                 text_buckets: Sequence[int], long_text: str = "truncate"
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """model.encode_text(texts, long_text), batches cut to length buckets:
  (features [N, d], bool [N]: the texts longer than the context)."""
  api.check_long_text(long_text)
  if not texts:
    return np.zeros((0, model.cfg.embed_dim), np.float32), np.zeros((0,), bool)
  if long_text == "truncate":
    tokens, cut = tokenizers.tokenize_counting_cuts(
        model.tokenizer, texts, model.context_length)              # [N, C], [N]
    api.warn_cut(int(cut.sum()), len(texts), model.context_length)
    return encode_tokens_bucketed(model, tokens, text_buckets), cut
  windows, owner = model.text_windows(texts)                       # [W, C], [W]
  features = encode_tokens_bucketed(model, windows, text_buckets)  # [W, d]
  cut = np.bincount(owner, minlength=len(texts)) > 1
  return api.mean_of_windows(features, owner, len(texts)), cut


def embed(checkpoint: str, texts: Sequence[str] = (),
          image_paths: Sequence[str] = (), batch_size: int = 64,
          tokenizer: Optional[str] = None,
          step: Optional[int] = None,
          text_buckets: Sequence[int] = TEXT_BUCKETS,
          long_text: str = "truncate") -> Dict[str, np.ndarray]:
  """Features of texts and images under the model in `checkpoint`.

  checkpoint: anything api.load reads (model dir, training WORKDIR, .pt,
    .safetensors, HF directory); `step` picks a WORKDIR's saved step.
  tokenizer: "clip" or a SentencePiece .model path (tokenizers.get_tokenizer);
    None: a WORKDIR's config.data.tokenizer, else "clip".
  long_text: "truncate" or "chunks" (texts longer than the context, api.py).

  Returns a dict of numpy arrays: text_features [N, d], image_features [M, d]
  (L2-normalised float32; rows follow `texts` / the readable `image_paths`),
  texts [N], image_paths [M], skipped_images [K], texts_cut [N].
  """
  api.check_long_text(long_text)
  model = api.load(checkpoint, step=step, tokenizer=tokenizer,
                   batch_size=batch_size)
  logging.info("Loaded %s (%s): %s", checkpoint, model.format, model.cfg)
  text_features, cut = encode_texts(model, list(texts), text_buckets, long_text)
  logging.info("texts: %d embedded", len(texts))
  image_features, kept, skipped = embed_image_files(
      list(image_paths), model.encode_pixels, batch_size, model.image_size)
  d = model.cfg.embed_dim
  return {
      "text_features": text_features.reshape(-1, d).astype(np.float32),
      "image_features": image_features.reshape(-1, d).astype(np.float32),
      "texts": np.asarray(list(texts), dtype=str),
      "image_paths": np.asarray(kept, dtype=str),
      "skipped_images": np.asarray(skipped, dtype=str),
      "texts_cut": np.asarray(cut, dtype=bool),
  }


def read_texts(path: str) -> List[str]:
  """One text per non-blank line (trailing newline and whitespace removed)."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  texts = [t for t in lines if t.strip()]
  if len(texts) != len(lines):
    logging.info("%s: ignoring %d blank lines", path, len(lines) - len(texts))
  return texts


def list_images(spec: str) -> List[str]:
  """A directory (its image files, sorted) or a glob pattern (sorted matches)."""
  if os.path.isdir(spec):
    names = sorted(n for n in os.listdir(spec)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    paths = [os.path.join(spec, n) for n in names]
  else:
    paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"--images={spec}: no image files found")
  return paths


def save_npz(path: str, result: Dict[str, np.ndarray]) -> None:
  """Writes the .npz atomically (a local path or a URL)."""
  with fileio.atomic_file(path) as tmp:
    with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
      np.savez(f, **result)


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("checkpoint", None, "Model directory, training workdir, "
                      ".pt/.safetensors file or HF CLIPModel directory.")
  flags.DEFINE_integer("step", None, "With a training workdir: this saved "
                       "step instead of the latest.")
  flags.DEFINE_string("texts", None, "Text file, one text per line.")
  flags.DEFINE_string("images", None, "Image directory or glob pattern.")
  flags.DEFINE_string("out", None, "Output .npz file.")
  flags.DEFINE_integer("batch_size", 64, "Rows per model call.", lower_bound=1)
  flags.DEFINE_string("tokenizer", None, "'clip' (CLIP's BPE) or the path of "
                      "the SentencePiece .model the model was trained with; "
                      "default: a workdir's config.data.tokenizer, else clip.")
  flags.DEFINE_list("text_buckets", [str(n) for n in TEXT_BUCKETS],
                    "Text batches are cut to the smallest of these lengths "
                    "holding their longest text (same features); '' = off.")
  flags.DEFINE_enum("long_text", "truncate", list(api.LONG_TEXT_MODES),
                    "Texts longer than the model's context: 'truncate' cuts "
                    "them (end token kept); 'chunks' embeds each as the "
                    "normalised mean of its context windows.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  cli.reject_positional_arguments(argv)
  if not FLAGS.texts and not FLAGS.images:
    raise cli.UserError("Give --texts and/or --images")
  if FLAGS.texts and not os.path.isfile(FLAGS.texts):
    raise cli.UserError(f"--texts={FLAGS.texts}: no such file")
  texts = read_texts(FLAGS.texts) if FLAGS.texts else []
  paths = list_images(FLAGS.images) if FLAGS.images else []
  result = embed(FLAGS.checkpoint, texts, paths, FLAGS.batch_size,
                 FLAGS.tokenizer, FLAGS.step,
                 [int(n) for n in FLAGS.text_buckets], FLAGS.long_text)
  save_npz(FLAGS.out, result)
  long_texts = int(result["texts_cut"].sum())
  how = "cut to the context" if FLAGS.long_text == "truncate" else "embedded in windows"
  print(f"Wrote {FLAGS.out}: {len(result['text_features'])} text and "
        f"{len(result['image_features'])} image features "
        f"({len(result['skipped_images'])} images skipped; {long_texts} texts "
        f"longer than the context, {how})", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
