"""Image-text retrieval: embedding a benchmark and Recall@K both ways (docs/method.md §4).

Recall@K, as in the Long-CLIP / CLIP-benchmark evaluations:
  i2t: an image is a hit if ANY of its captions is among its K best texts.
  t2i: a caption is a hit if its single image is among its K best images.
Similarities are dot products of L2-normalised embeddings, scored a block of
queries at a time so no [I, T] matrix larger than one block is ever held.

Ties are broken by index, lowest first (what `argmax` / a stable sort does): a
target's rank is the number of candidates scoring strictly higher plus the
number scoring equal with a lower index. So duplicated images or captions can
never make two targets share rank 0.

Embedding is model-agnostic: `embed_images_fn(pixels [B, H, W, 3] float32) ->
[B, d]` and `embed_texts_fn(tokens [B, C] int32) -> [B, d]` always see the same
batch size B (the last partial batch is zero-padded and its padded rows
dropped), so a jitted function compiles once.
"""
import concurrent.futures
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import numpy as np
from PIL import Image

from fixclip_jax.data import transforms
from fixclip_jax.models import layers

EmbedFn = Callable[[np.ndarray], Any]
Tokenizer = Callable[[Sequence[str]], np.ndarray]
DEFAULT_KS = (1, 5, 10)


def rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
  """0-based rank of column `target[i]` in row i (ties -> lower index first).

  scores: [Q, N]; target: [Q] int. Returns [Q] int64.
  """
  q = np.arange(scores.shape[0])
  s_target = scores[q, target][:, None]                            # [Q, 1]
  higher = (scores > s_target).sum(axis=1)
  earlier = np.arange(scores.shape[1])[None, :] < target[:, None]  # [Q, N]
  equal_before = ((scores == s_target) & earlier).sum(axis=1)
  return higher + equal_before


def best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """Rank of the best-ranked positive column in each row.

  scores, positive: [Q, N] (positive boolean, at least one per row). With the
  index tie-break, the best positive is the highest-scoring one, the lowest
  index among equals; its rank is what `rank_of_target` would give it.
  """
  if not positive.any(axis=1).all():
    raise ValueError("Every query needs at least one positive")
  masked = np.where(positive, scores, -np.inf)
  best_score = masked.max(axis=1, keepdims=True)                   # [Q, 1]
  best_index = np.argmax(positive & (scores == best_score), axis=1)  # first
  return rank_of_target(scores, best_index)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
  """Percent of queries whose rank is below k."""
  return {k: float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray,
                      text_to_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                      chunk_size: int = 256) -> Dict[str, float]:
  """R@K both ways, in percent.

  image_emb [I, d], text_emb [T, d] (L2-normalised), text_to_image [T] int.
  Returns {"i2t_R@k": .., "t2i_R@k": .., "num_images": I, "num_texts": T}.
  A block of `chunk_size` queries scores all candidates at once: memory is
  about 12 * chunk_size * max(I, T) bytes (scores + masks).
  """
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  t2i = np.asarray(text_to_image, np.int64)
  num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
  if t2i.shape != (num_texts,):
    raise ValueError(f"text_to_image has shape {t2i.shape}, expected ({num_texts},)")
  if t2i.min() < 0 or t2i.max() >= num_images:
    raise ValueError(f"text_to_image indexes outside [0, {num_images})")
  if np.bincount(t2i, minlength=num_images).min() == 0:
    raise ValueError("Some image has no caption; i2t recall is undefined for it")

  t2i_ranks = np.concatenate([
      rank_of_target(text_emb[s:s + chunk_size] @ image_emb.T,     # [c, I]
                     t2i[s:s + chunk_size])
      for s in range(0, num_texts, chunk_size)])
  i2t_ranks = np.concatenate([
      best_positive_rank(
          image_emb[s:s + chunk_size] @ text_emb.T,                 # [c, T]
          t2i[None, :] == np.arange(s, min(s + chunk_size, num_images))[:, None])
      for s in range(0, num_images, chunk_size)])

  out = {"num_images": num_images, "num_texts": num_texts}
  for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
    for k, r in recall_at_k(ranks, ks).items():
      out[f"{direction}_R@{k}"] = r
  return out


# ------------------------------------------------------------------ embedding


def padded_batches(num: int, batch_size: int) -> Iterator[Tuple[int, int]]:
  """(start, count) of each batch; count < batch_size only for the last one."""
  for start in range(0, num, batch_size):
    yield start, min(batch_size, num - start)


def pad_rows(x: np.ndarray, batch_size: int) -> np.ndarray:
  """Zero-pads axis 0 up to batch_size (padding rows are dropped after embedding)."""
  if x.shape[0] == batch_size:
    return x
  pad = np.zeros((batch_size - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def embed_batches(num: int, make_batch: Callable[[int, int], np.ndarray],
                  embed_fn: EmbedFn, batch_size: int) -> np.ndarray:
  """Runs embed_fn on fixed-size padded batches; returns L2-normalised [num, d]."""
  out = []
  for start, count in padded_batches(num, batch_size):
    batch = pad_rows(make_batch(start, count), batch_size)
    emb = np.asarray(embed_fn(batch), np.float32)
    if emb.shape[0] != batch_size:
      raise ValueError(f"embed fn returned {emb.shape[0]} rows for a batch of "
                       f"{batch_size}")
    out.append(emb[:count])
  return layers.normalize(np.concatenate(out), xp=np)


def load_pixels(image: Any, image_size: int) -> np.ndarray:
  """A path, encoded bytes or uint8 array -> [S, S, 3] float32 CLIP pixels."""
  if isinstance(image, np.ndarray):
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  else:
    try:
      pil = transforms.decode_image(image)
    except OSError as e:
      name = image if isinstance(image, str) else "<encoded bytes>"
      raise OSError(f"Could not read image {name}: {e}") from e
  return transforms.clip_eval_transform(pil, image_size)


def embed_images(images: Sequence[Any], embed_images_fn: EmbedFn,
                 batch_size: int, image_size: int,
                 num_threads: int = 8) -> np.ndarray:
  """Decodes + preprocesses images (thread pool) and embeds them: [N, d]."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    def make_batch(start, count):
      pixels = pool.map(lambda im: load_pixels(im, image_size),
                        images[start:start + count])
      return np.stack(list(pixels))                                # [c, S, S, 3]
    return embed_batches(len(images), make_batch, embed_images_fn, batch_size)


def embed_texts(texts: Sequence[str], embed_texts_fn: EmbedFn,
                tokenizer: Tokenizer, batch_size: int) -> np.ndarray:
  """Tokenises (the tokenizer truncates to the model's context) and embeds: [N, d]."""
  def make_batch(start, count):
    return np.asarray(tokenizer(list(texts[start:start + count])), np.int32)
  return embed_batches(len(texts), make_batch, embed_texts_fn, batch_size)


def embed_dataset(ds, embed_images_fn: EmbedFn, embed_texts_fn: EmbedFn,
                  tokenizer: Tokenizer, batch_size: int, image_size: int,
                  num_threads: int = 8) -> Tuple[np.ndarray, np.ndarray]:
  """Embeds a RetrievalDataset: (image_emb [I, d], text_emb [T, d]), normalised."""
  image_emb = embed_images(ds.image_paths, embed_images_fn, batch_size,
                           image_size, num_threads)
  text_emb = embed_texts(ds.texts, embed_texts_fn, tokenizer, batch_size)
  return image_emb, text_emb


def evaluate_retrieval(ds, embed_images_fn: EmbedFn, embed_texts_fn: EmbedFn,
                       tokenizer: Tokenizer, batch_size: int, image_size: int,
                       ks: Sequence[int] = DEFAULT_KS,
                       num_threads: int = 8) -> Dict[str, Any]:
  """Embeds and scores one benchmark; the result names dataset and protocol."""
  image_emb, text_emb = embed_dataset(ds, embed_images_fn, embed_texts_fn,
                                      tokenizer, batch_size, image_size,
                                      num_threads)
  metrics = retrieval_metrics(image_emb, text_emb, ds.text_to_image, ks)
  return {"dataset": ds.name, "protocol": ds.protocol, **metrics}
