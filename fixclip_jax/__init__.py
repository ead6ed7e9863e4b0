"""FIX-CLIP and Long-CLIP in JAX/Flax (the method: docs/method.md).

  import fixclip_jax
  model = fixclip_jax.load("/ckpt/fixclip_b16")   # any checkpoint convert reads
  features = model.encode_text(["a long description ..."])

`load`, `Model`, `similarity` are fixclip_jax.api's (see there). They are
looked up on first use, so `import fixclip_jax` (and every submodule import,
e.g. the configs) stays light: no JAX, orbax or grain import until then.
"""
import importlib

__version__ = "0.1.0"

# Top-level name -> the module that defines it.
_API = {"load": "fixclip_jax.api", "Model": "fixclip_jax.api",
        "similarity": "fixclip_jax.api"}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
  """PEP 562: fixclip_jax.load etc. import fixclip_jax.api when first used."""
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
  raise AttributeError(f"module 'fixclip_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_API))
