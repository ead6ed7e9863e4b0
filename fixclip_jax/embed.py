"""Text and image features from one of our model checkpoints.

  python -m fixclip_jax.embed --checkpoint=/ckpt/longclip_b16 \
      --texts=captions.txt --images='photos/*.jpg' --out=features.npz \
      [--tokenizer=clip | --tokenizer=/path/spm.model]

The .npz holds L2-normalised float32 `text_features` [N, d] and
`image_features` [M, d], the `texts` (one per non-blank line of --texts) and
`image_paths` in the same order as the feature rows, and `skipped_images`
(files that could not be decoded; each is also logged as a warning).

Batches always have --batch_size rows (the last is zero-padded and its padded
rows dropped), so each tower compiles once. --tokenizer is what the model was
trained with (config.data.tokenizer); it must fit the model's vocab_size and
eot_token_id (tokenizers.check_model_compatible).
"""
import concurrent.futures
import glob
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from fixclip_jax import checkpoint as ckpt_lib
from fixclip_jax import fileio
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.evaluation import retrieval
from fixclip_jax.models import clip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _tower_fns(params, cfg):
  """Jitted (pixels [B,H,W,3] -> [B,d], tokens [B,C] -> [B,d]) normalised features."""
  model = clip.CLIP(cfg)
  params = jax.device_put(params)

  @jax.jit
  def image_fn(pixels):
    out = model.apply({"params": params}, pixels, method=clip.CLIP.encode_image)
    return clip.normalize(out["embedding"])

  @jax.jit
  def text_fn(tokens):
    out = model.apply({"params": params}, tokens, method=clip.CLIP.encode_text)
    return clip.normalize(out["embedding"])

  return image_fn, text_fn


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


def embed_texts(texts: Sequence[str], text_fn, tokenizer, batch_size: int) -> np.ndarray:
  """Tokenises (truncating to the context) and embeds texts: [N, d]."""
  if not texts:
    return np.zeros((0, 0), np.float32)
  feats = retrieval.embed_texts(list(texts), text_fn, tokenizer, batch_size)
  logging.info("texts: %d embedded", len(texts))
  return feats


def _stack(parts):
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def embed(checkpoint: str, texts: Sequence[str] = (),
          image_paths: Sequence[str] = (), batch_size: int = 64,
          tokenizer: str = "clip") -> Dict[str, np.ndarray]:
  """Features of texts and images under the model in `checkpoint` (our orbax dir).

  `tokenizer`: "clip" or a SentencePiece .model path (tokenizers.get_tokenizer).

  Returns a dict of numpy arrays: text_features [N, d], image_features [M, d]
  (L2-normalised float32; rows follow `texts` / the readable `image_paths`),
  texts [N], image_paths [M], skipped_images [K].
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  params, cfg = ckpt_lib.load_model(checkpoint)
  logging.info("Loaded %s: %s", checkpoint, cfg)
  image_fn, text_fn = _tower_fns(params, cfg)
  tok = tokenizers.get_tokenizer(tokenizer, context_length=cfg.context_length)
  tokenizers.check_model_compatible(tok, cfg.vocab_size, cfg.eot_token_id,
                                    f"{checkpoint} with --tokenizer={tokenizer}")

  text_features = embed_texts(texts, text_fn, tok, batch_size)
  image_features, kept, skipped = embed_image_files(
      list(image_paths), image_fn, batch_size, cfg.image_size)
  d = cfg.embed_dim
  return {
      "text_features": text_features.reshape(-1, d).astype(np.float32),
      "image_features": image_features.reshape(-1, d).astype(np.float32),
      "texts": np.asarray(list(texts), dtype=str),
      "image_paths": np.asarray(kept, dtype=str),
      "skipped_images": np.asarray(skipped, dtype=str),
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
  flags.DEFINE_string("checkpoint", None, "Model directory "
                      "(checkpoint.save_model / convert output).")
  flags.DEFINE_string("texts", None, "Text file, one text per line.")
  flags.DEFINE_string("images", None, "Image directory or glob pattern.")
  flags.DEFINE_string("out", None, "Output .npz file.")
  flags.DEFINE_integer("batch_size", 64, "Rows per model call.")
  flags.DEFINE_string("tokenizer", "clip", "'clip' (CLIP's BPE) or the path "
                      "of the SentencePiece .model the model was trained with.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.texts and not FLAGS.images:
    raise app.UsageError("Give --texts and/or --images")
  texts = read_texts(FLAGS.texts) if FLAGS.texts else []
  paths = list_images(FLAGS.images) if FLAGS.images else []
  result = embed(FLAGS.checkpoint, texts, paths, FLAGS.batch_size,
                 FLAGS.tokenizer)
  save_npz(FLAGS.out, result)
  logging.info("Wrote %s: %d text and %d image features (%d images skipped)",
               FLAGS.out, len(result["text_features"]),
               len(result["image_features"]), len(result["skipped_images"]))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main)
