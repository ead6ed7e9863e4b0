"""Zero-shot classification with prompt ensembles (docs/method.md §4; CLIP paper §3.1.4).

Classifier weights: each class name is put into every template, the texts are
embedded and L2-normalised, averaged over templates per class and normalised
again (OpenAI's prompt ensembling). An image's prediction is the class whose
weight has the largest dot product with its normalised embedding; ties go to
the lower class index, as `argmax` does.
"""
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from fixclip_jax.evaluation import imagenet_classes
from fixclip_jax.evaluation import retrieval
from fixclip_jax.models import layers

DEFAULT_KS = (1, 5)


def classifier_weights(class_names: Sequence[str], templates: Sequence[str],
                       embed_texts_fn: retrieval.EmbedFn,
                       tokenizer: retrieval.Tokenizer, batch_size: int,
                       classes_per_chunk: int = 100) -> np.ndarray:
  """[C, d] float32: the re-normalised mean of each class's normalised prompt embeddings.

  Classes are embedded `classes_per_chunk` at a time, so at most that many
  classes x len(templates) text embeddings are held at once.
  """
  if not templates:
    raise ValueError("Need at least one template")
  for t in templates:
    if "{}" not in t:
      raise ValueError(f"Template {t!r} has no '{{}}' for the class name")
  weights = []
  for start in range(0, len(class_names), classes_per_chunk):
    names = class_names[start:start + classes_per_chunk]
    texts = [t.format(name) for name in names for t in templates]
    emb = retrieval.embed_texts(texts, embed_texts_fn, tokenizer, batch_size)
    emb = emb.reshape(len(names), len(templates), -1)               # [c, K, d]
    weights.append(layers.normalize(emb.mean(axis=1), xp=np))        # [c, d]
  return np.concatenate(weights)


def topk_accuracy(image_emb: np.ndarray, labels: np.ndarray,
                  class_weights: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                  chunk_size: int = 4096) -> Dict[str, float]:
  """Top-k accuracy in percent: {"top1": .., "top5": .., "num_images": N}.

  image_emb [N, d] and class_weights [C, d] L2-normalised; labels [N] int.
  """
  image_emb = np.asarray(image_emb, np.float32)
  class_weights = np.asarray(class_weights, np.float32)
  labels = np.asarray(labels, np.int64)
  if labels.shape != (image_emb.shape[0],):
    raise ValueError(f"labels has shape {labels.shape}, expected "
                     f"({image_emb.shape[0]},)")
  if labels.min() < 0 or labels.max() >= class_weights.shape[0]:
    raise ValueError(f"labels outside [0, {class_weights.shape[0]})")
  ranks = np.concatenate([
      retrieval.rank_of_target(image_emb[s:s + chunk_size] @ class_weights.T,
                               labels[s:s + chunk_size])            # [c]
      for s in range(0, image_emb.shape[0], chunk_size)])
  out = {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
  out["num_images"] = int(image_emb.shape[0])
  return out


def embed_classification(ds, embed_images_fn: retrieval.EmbedFn,
                         batch_size: int, image_size: int,
                         num_threads: int = 8) -> Tuple[np.ndarray, np.ndarray]:
  """Embeds a ClassificationDataset: (image_emb [N, d], labels [N])."""
  labels = np.zeros((ds.size,), np.int32)

  class _Images:
    """Lazy image column that records labels as examples are read."""

    def __len__(self):
      return ds.size

    def __getitem__(self, index):
      if isinstance(index, slice):
        return [self[i] for i in range(*index.indices(ds.size))]
      image, labels[index] = ds.read(index)
      return image

  emb = retrieval.embed_images(_Images(), embed_images_fn, batch_size,
                               image_size, num_threads)
  return emb, labels


def evaluate_zeroshot(ds, embed_images_fn: retrieval.EmbedFn,
                      embed_texts_fn: retrieval.EmbedFn,
                      tokenizer: retrieval.Tokenizer, batch_size: int,
                      image_size: int,
                      templates: Sequence[str] = (
                          imagenet_classes.OPENAI_IMAGENET_TEMPLATES),
                      ks: Sequence[int] = DEFAULT_KS,
                      num_threads: int = 8) -> Dict[str, Any]:
  """Zero-shot top-k on a ClassificationDataset; protocol names the template set."""
  weights = classifier_weights(ds.class_names, templates, embed_texts_fn,
                               tokenizer, batch_size)
  image_emb, labels = embed_classification(ds, embed_images_fn, batch_size,
                                           image_size, num_threads)
  metrics = topk_accuracy(image_emb, labels, weights, ks)
  protocol = f"zeroshot-{len(ds.class_names)}cls-{len(templates)}templates"
  return {"dataset": ds.name, "protocol": protocol, **metrics}
