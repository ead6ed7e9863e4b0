"""Evaluation mode: embed with the (sharded) model, score, write the report.

`evaluate` is called by the training loop every `eval_every` steps and by
`main --mode=eval`; it embeds each configured dataset with jitted, batch-sharded
encoders, scores retrieval (R@K both ways) or zero-shot classification, and
merges the results into WORKDIR/eval_results.{json,md} and the PNG plots.
"""
import functools
import os
import tempfile
from typing import Any, Dict, List, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fixclip_jax import buckets
from fixclip_jax import sharding
from fixclip_jax.data import sharegpt4v
from fixclip_jax.data import sources
from fixclip_jax.data import synthetic
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import retrieval
from fixclip_jax.evaluation import zeroshot
from fixclip_jax.models import clip
from fixclip_jax.models import encoders

# Held-out synthetic scenes use a seed the training set never uses.
SYNTHETIC_EVAL_SEED = 10_000


def embed_fns(model: clip.CLIP, params, mesh, text_buckets=()) -> tuple:
  """(images -> [B, d], texts -> [B, d]) normalised, with the batch over the mesh.

  The towers are encoders.tower_fns(model): built and compiled once per model,
  so evaluating again (every eval_every steps) compiles nothing new.
  text_buckets: token batches are cut to the smallest of these lengths that
  holds their longest text (buckets.py: the same features; () = off).
  """
  batch = sharding.batch_sharding(mesh)
  _image, _text = encoders.tower_fns(model)

  def cut_text(t):
    # Every host holds the whole batch, so every host cuts it alike.
    return buckets.cut_to_bucket(t, text_buckets, model.cfg.eot_token_id)

  def on_mesh(fn, prepare=np.asarray):
    # Every host holds the whole eval batch: each fills its own devices' rows,
    # and every host gets all the embeddings back (multi-host safe).
    def run(x):
      x = prepare(np.asarray(x))
      out = fn(params, jax.make_array_from_callback(x.shape, batch, lambda i: x[i]))
      if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))
      return np.asarray(out)
    return run

  return on_mesh(_image), on_mesh(_text, cut_text)


def synthetic_eval_root(workdir: str, num_scenes: int, image_size: int) -> str:
  """Generates (once) the held-out synthetic retrieval set under WORKDIR:
  num_scenes scenes (config.eval.synthetic_num) drawn at image_size px
  (config.data.synthetic_image_size, as the training scenes)."""
  # Images are written with PIL, so a remote workdir (gs://) caches them locally.
  base = (os.path.join(tempfile.gettempdir(), "fixclip_eval_data")
          if "://" in workdir else os.path.join(workdir, "eval_data"))
  # Named by everything that makes the set (seed and late-detail share are
  # the protocol's), so a changed set is never read from an old cache.
  root = os.path.join(base, f"synthetic_{num_scenes}_{image_size}px_seed"
                            f"{SYNTHETIC_EVAL_SEED}_share"
                            f"{synthetic.DEFAULT_LATE_DETAIL_SHARE:g}")
  if not os.path.isfile(os.path.join(root, "manifest.jsonl")):
    if jax.process_index() == 0:
      synthetic.make_synthetic_dataset(root, num_scenes, image_size=image_size,
                                       seed=SYNTHETIC_EVAL_SEED)
    if jax.process_count() > 1:  # the others read what process 0 wrote
      multihost_utils.sync_global_devices("fixclip_synthetic_eval_data")
  return root


def load_eval_sets(eval_config: ml_collections.ConfigDict, workdir: str,
                   synthetic_image_size: int) -> List[Any]:
  """The datasets named in eval_config.datasets (the run config's `eval`
  block; comma list; names match as datasets.canonical_name says). The
  synthetic sets are read from eval_config.root, else generated under WORKDIR
  at synthetic_image_size px (synthetic_eval_root)."""
  out = []
  synthetic_root = lambda: eval_config.root or synthetic_eval_root(
      workdir, eval_config.synthetic_num, synthetic_image_size)
  for name in [n.strip() for n in eval_config.datasets.split(",") if n.strip()]:
    if datasets.canonical_name(name) == "synthetic":  # both caption kinds
      root = synthetic_root()
      out.append(datasets.load_synthetic(root, which="long"))
      out.append(datasets.load_synthetic(root, which="short"))
    elif datasets.canonical_name(name) in (
        datasets.canonical_name("synthetic_long77"),
        datasets.canonical_name("synthetic_late")):
      root = synthetic_root()
      which = "late" if "late" in datasets.canonical_name(name) else "long77"
      out.append(datasets.load_synthetic(root, which=which))
    elif datasets.is_classification(name):
      out.append(datasets.load_classification(name, eval_config.root))
    else:
      out.append(datasets.load_dataset(name, eval_config.root))
  return out


# What warn_train_overlap has checked in this process: evaluate runs every
# eval_every steps, the training data and the sets stay the same.
_overlap_checked = set()


def _norm(path: str) -> str:
  return os.path.normpath(os.path.abspath(path))


def warn_train_overlap(data: ml_collections.ConfigDict, eval_sets: List[Any]
                       ) -> List[str]:
  """Warns, one line per retrieval set, when its images are also training
  images (its scores are then not held out), where the run config's `data`
  block can say so
  cheaply: the image files of a JSONL manifest or of the ShareGPT4V json
  (sources.training_image_paths); for ArrayRecord shards prepared from the
  ShareGPT4V json, a ShareGPT4V split of more entries than prepare held out
  (metadata.json). Each set once a process; returns the lines."""
  todo = []
  for ds in eval_sets:
    key = (data.type, data.path, data.image_root, data.get("holdout_first"),
           ds.protocol, ds.num_images)
    if isinstance(ds, datasets.RetrievalDataset) and key not in _overlap_checked:
      _overlap_checked.add(key)
      todo.append(ds)
  if not todo or not data.path:
    return []
  try:
    train_paths = sources.training_image_paths(data)
    holdout = sources.sharegpt4v_holdout(data) if train_paths is None else None
  except (OSError, ValueError) as e:  # no training data here to compare with
    logging.info("Evaluation images not compared with the training data: %s", e)
    return []
  train = {_norm(p) for p in train_paths or ()}
  lines = []
  for ds in todo:
    if train_paths is not None:
      shared = [p for p in ds.image_paths if _norm(p) in train]
      if shared:
        lines.append(f"{ds.name}: {len(shared)} of its {ds.num_images} images "
                     f"are also training images (config.data.path="
                     f"{data.path!r}), e.g. {shared[0]}: its scores are not "
                     "held out")
    elif holdout is not None:
      held, json_path = holdout
      size = sharegpt4v.eval_split_size(ds.protocol)
      if size and held < size:
        lines.append(
            f"{ds.name}: the training shards (config.data.path={data.path!r}) "
            f"were prepared from the ShareGPT4V json {json_path} holding out "
            f"its first {held} entries, so up to {size - held} of this split's "
            f"{size} images are training images (e.g. "
            f"{ds.image_paths[min(held, ds.num_images - 1)]}); prepare with "
            f"--holdout_first={size} to score it held out")
  for line in lines:
    logging.warning("%s", line)
  return lines


def dataset_tokenizer(tokenizer, ds: datasets.RetrievalDataset,
                      model_context: int):
  """The tokenizer at the dataset's own context when it names one (e.g.
  synthetic-long77 cuts captions to 77 tokens, end token kept), never longer
  than the model's."""
  if ds.text_context is None:
    return tokenizer
  return functools.partial(tokenizer,
                           context_length=min(ds.text_context, model_context))


def protocol_fields(ds, cfg) -> Dict[str, int]:
  """The numbers a result's protocol needs besides its name (report.py): the
  image size the model saw and the tokens its texts were cut to."""
  context = cfg.context_length
  if isinstance(ds, datasets.RetrievalDataset) and ds.text_context is not None:
    context = min(ds.text_context, context)
  return {"image_size": int(cfg.image_size), "text_context": int(context)}


def evaluate(config, model: clip.CLIP, params, mesh, tokenizer=None, *,
             workdir: str, step: Optional[int] = None) -> List[Dict[str, Any]]:
  """Scores every configured dataset; writes and returns the result rows.

  tokenizer: None = config.data.tokenizer at the model's context length.
  """
  cfg = model.cfg
  if tokenizer is None:
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer,
                                         context_length=cfg.context_length)
  # A tokenizer the text tower does not fit would score silently wrong
  # (out-of-range ids are clamped, pooling misses the end token).
  tokenizers.check_model_compatible(
      tokenizer, cfg.vocab_size, cfg.eot_token_id,
      f"evaluation of config.model (config.data.tokenizer="
      f"{config.data.tokenizer!r})")
  image_fn, text_fn = embed_fns(model, params, mesh,
                                buckets.eval_buckets(config.data))
  batch_size = config.eval.batch_size
  if batch_size % sharding.num_batch_shards(mesh):
    raise ValueError(f"config.eval.batch_size={batch_size} must divide over "
                     f"{sharding.num_batch_shards(mesh)} batch shards")
  results = []
  eval_sets = load_eval_sets(config.eval, workdir,
                             config.data.synthetic_image_size)
  warn_train_overlap(config.data, eval_sets)
  for ds in eval_sets:
    if isinstance(ds, datasets.ClassificationDataset):
      r = zeroshot.evaluate_zeroshot(ds, image_fn, text_fn, tokenizer,
                                     batch_size, cfg.image_size)
    else:
      r = retrieval.evaluate_retrieval(ds, image_fn, text_fn,
                                       dataset_tokenizer(tokenizer, ds,
                                                         cfg.context_length),
                                       batch_size, cfg.image_size)
      r.update(ds.pair_counts)  # pairs scored of those found (a note if fewer)
    r.update(protocol_fields(ds, cfg))
    logging.info("eval %s", r)
    results.append(r)
  if jax.process_index() == 0:
    report.write_report(workdir, results, model=config.model_name, step=step)
  return results


def flat_metrics(results: List[Dict[str, Any]]) -> Dict[str, float]:
  """{"eval/<protocol>/<metric>": value} for the metric writer."""
  flat = {}
  for r in results:
    for k, v in r.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        flat[f"eval/{r['protocol']}/{k}"] = float(v)
  return flat
