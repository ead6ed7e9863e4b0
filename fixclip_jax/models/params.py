"""Parameter trees: flat "a/b/c" paths, the shapes a model config fixes, and
the check that a tree fits a model (used by checkpoint I/O and conversion)."""
import functools

import jax
import numpy as np

from fixclip_jax.models import clip
from fixclip_jax.models.sizes import CLIPConfig


def flatten_params(tree, prefix: str = "") -> dict:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_params(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten_params(flat: dict) -> dict:
  """{"a/b/c": leaf} -> nested dict."""
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


@functools.lru_cache(maxsize=16)
def _flat_shapes(cfg: CLIPConfig) -> tuple:
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
  text = jax.ShapeDtypeStruct((1, cfg.context_length), np.int32)
  variables = jax.eval_shape(clip.CLIP(cfg).init, jax.random.PRNGKey(0), images, text)
  return tuple((k, tuple(v.shape)) for k, v in
               flatten_params(variables["params"]).items())


def param_shapes(cfg: CLIPConfig) -> dict:
  """{...: shape tuple} of `CLIP(cfg)`'s params, without allocating them."""
  return unflatten_params(dict(_flat_shapes(cfg)))  # a fresh tree per call


def check_params(params: dict, cfg: CLIPConfig, source: str) -> None:
  """Raises one ValueError naming every missing/unexpected/mis-shaped param."""
  expected = dict(_flat_shapes(cfg))
  found = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  problems = [f"missing {k!r} (expected {s})" for k, s in expected.items()
              if k not in found]
  problems += [f"unexpected {k!r} (found {s})" for k, s in found.items()
               if k not in expected]
  problems += [f"{k!r}: expected shape {expected[k]}, found {found[k]}"
               for k in expected if k in found and found[k] != expected[k]]
  if problems:
    raise ValueError(f"{source}: params do not match the model config: "
                     + "; ".join(problems))
