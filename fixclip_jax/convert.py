"""PyTorch <-> JAX checkpoint conversion (docs/method.md §1, §2).

Conversion is data. Each layout (OpenAI/open_clip, Hugging Face `CLIPModel`)
is a table of rules (PyTorch key pattern(s), our param path, transform), with
`{i}` standing for a block index. A transform is a pair of exact inverse
functions (transpose, split/concat), so import (`to_ours`) and export
(`to_torch`) read the same table and round trips are exact by construction.

Formats read (auto-detected, logged):
  openai    OpenAI / open_clip state dict (.pt/.pth/.bin/.safetensors);
            a nested "state_dict" and a "module." prefix are unwrapped.
  longclip  the same with Long-CLIP's 248-row `positional_embedding` and
            `positional_embedding_res` (docs/method.md §2).
  hf        a Hugging Face `CLIPModel` directory (config.json + weights).
  orbax     a model directory written by `checkpoint.save_model`.
  train_workdir  a training --workdir (its latest train state's params).
Formats written: orbax (default), openai (.pt or .safetensors; FIX-CLIP's
extra parameters under `fixclip.*` keys), hf (a directory that transformers'
CLIPModel, CLIPProcessor, CLIPTokenizer and CLIPTokenizerFast load: weights,
tokenizer files at the model's context, preprocessor_config.json), hf_text
(the text encoder + tokenizer files, for diffusion pipelines). HF's
tokenizers skip ftfy and HTML unescaping: `tokenizers.normalize_text` first
gives our ids on any text.

  fixclip-convert --src=longclip-B.pt --dst=/ckpt/longclip_b16
  python -m fixclip_jax.convert --src=/ckpt/longclip_b16 --dst=out.pt --to=openai
  python -m fixclip_jax.convert --src=WORKDIR --dst=hf_dir --to=hf

FIX-CLIP's extra parameters (regional prompts, mask token, GTA heads) go
under `fixclip.*` keys in the openai layout; HF's CLIPModel has no place for
them, so --to=hf and --to=hf_text write the model without them and warn
(as transformers' from_pretrained does for unused weights): the prompts
change the image CLS, so --to=hf's image features are plain CLIP's; the text
encoder is complete. --drop_extra drops them from openai/orbax outputs too.
Writing a .pt file (and reading one) needs PyTorch: the [torch] extra.
"""
import collections
import dataclasses
import io
import json
import os
import pickle
import re
import struct
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy

from fixclip_jax import checkpoint
from fixclip_jax import cli
from fixclip_jax import fileio
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.models import fixclip
from fixclip_jax.models import positional
from fixclip_jax.models.params import check_params
from fixclip_jax.models.params import flatten_params
from fixclip_jax.models.params import param_shapes
from fixclip_jax.models.params import unflatten_params
from fixclip_jax.models.sizes import CLIPConfig

LONGCLIP_KEEP = positional.LONGCLIP_KEEP

StateDict = Dict[str, np.ndarray]
ParamsTransform = Callable[[dict, CLIPConfig], Tuple[dict, CLIPConfig]]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model."""


# ---------------------------------------------------------------------------
# Transforms: pairs of exact inverses. `to_ours` takes the PyTorch tensors of a
# rule (in the rule's key order) and returns our param; `to_torch` returns a
# tuple of PyTorch tensors. They work on numpy arrays and, for shape inference
# under `jax.eval_shape`, on jax arrays.


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[..., np.ndarray]
  to_torch: Callable[[np.ndarray], Tuple[np.ndarray, ...]]


IDENTITY = Transform("identity", lambda x: x, lambda x: (x,))
# torch Linear weight [out, in] <-> Dense kernel [in, out]; also HF's
# projections, stored as Linear weights [d, w] where OpenAI stores [w, d].
LINEAR = Transform("linear", lambda w: w.T, lambda k: (k.T,))
# torch Conv2d weight [out, in, kh, kw] <-> Flax Conv kernel [kh, kw, in, out].
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0),
                 lambda k: (k.transpose(3, 2, 0, 1),))
# HF's separate q/k/v Linear weights [w, w] x 3 <-> fused kernel [w, 3w]
# (OpenAI's in_proj_weight [3w, w] is q, k, v stacked on the output axis).
QKV_KERNEL = Transform(
    "qkv_kernel",
    lambda q, k, v: _xp(q).concatenate([q, k, v], axis=0).T,
    lambda kernel: tuple(_xp(kernel).split(kernel.T, 3, axis=0)))
QKV_BIAS = Transform(
    "qkv_bias",
    lambda q, k, v: _xp(q).concatenate([q, k, v], axis=0),
    lambda bias: tuple(_xp(bias).split(bias, 3, axis=0)))


@dataclasses.dataclass(frozen=True)
class Rule:
  """PyTorch key pattern(s) <-> one of our params; `{i}` = block index."""
  torch_keys: Tuple[str, ...]
  ours: str
  transform: Transform = IDENTITY
  # Only present when this holds for the config (e.g. Long-CLIP's second table).
  when: Optional[Callable[[CLIPConfig], bool]] = None


def _rule(torch_keys, ours, transform=IDENTITY, when=None):
  keys = (torch_keys,) if isinstance(torch_keys, str) else tuple(torch_keys)
  return Rule(keys, ours, transform, when)


def _layer_norm(torch_prefix, ours_prefix):
  return [_rule(f"{torch_prefix}.weight", f"{ours_prefix}/scale"),
          _rule(f"{torch_prefix}.bias", f"{ours_prefix}/bias")]


def _dense(torch_prefix, ours_prefix):
  return [_rule(f"{torch_prefix}.weight", f"{ours_prefix}/kernel", LINEAR),
          _rule(f"{torch_prefix}.bias", f"{ours_prefix}/bias")]


def _has_res_table(cfg):
  return cfg.positional_keep is not None


# --- OpenAI / open_clip layout (also Long-CLIP's). ---

def _openai_block(t, o):
  """One residual block; t/o are the torch/our prefixes holding `{i}`."""
  return [
      *_layer_norm(f"{t}.ln_1", f"{o}/ln_1"),
      _rule(f"{t}.attn.in_proj_weight", f"{o}/attn/in_proj/kernel", LINEAR),
      _rule(f"{t}.attn.in_proj_bias", f"{o}/attn/in_proj/bias"),
      *_dense(f"{t}.attn.out_proj", f"{o}/attn/out_proj"),
      *_layer_norm(f"{t}.ln_2", f"{o}/ln_2"),
      *_dense(f"{t}.mlp.c_fc", f"{o}/mlp/c_fc"),
      *_dense(f"{t}.mlp.c_proj", f"{o}/mlp/c_proj"),
  ]


OPENAI_VISION = [
    _rule("visual.conv1.weight", "visual/conv1/kernel", CONV),
    _rule("visual.class_embedding", "visual/class_embedding"),
    _rule("visual.positional_embedding", "visual/positional_embedding"),
    *_layer_norm("visual.ln_pre", "visual/ln_pre"),
    *_layer_norm("visual.ln_post", "visual/ln_post"),
    _rule("visual.proj", "visual/proj"),                  # [w, d] both sides
]
OPENAI_VISION_BLOCK = _openai_block("visual.transformer.resblocks.{i}",
                                    "visual/transformer/resblocks_{i}")
OPENAI_TEXT = [
    _rule("token_embedding.weight", "text/token_embedding"),
    _rule("positional_embedding", "text/positional_embedding"),
    _rule("positional_embedding_res", "text/positional_embedding_res",
          when=_has_res_table),
    *_layer_norm("ln_final", "text/ln_final"),
    _rule("text_projection", "text/text_projection"),     # [w, d] both sides
    _rule("logit_scale", "logit_scale"),
]
OPENAI_TEXT_BLOCK = _openai_block("transformer.resblocks.{i}",
                                  "text/transformer/resblocks_{i}")
# Non-parameter entries some OpenAI state dicts carry (the JIT archives' metadata).
OPENAI_IGNORED = ("input_resolution", "context_length", "vocab_size")


# --- Hugging Face CLIPModel layout. ---

def _hf_block(t, o):
  qkv = lambda suffix: [f"{t}.self_attn.{n}_proj.{suffix}" for n in "qkv"]
  return [
      *_layer_norm(f"{t}.layer_norm1", f"{o}/ln_1"),
      _rule(qkv("weight"), f"{o}/attn/in_proj/kernel", QKV_KERNEL),
      _rule(qkv("bias"), f"{o}/attn/in_proj/bias", QKV_BIAS),
      *_dense(f"{t}.self_attn.out_proj", f"{o}/attn/out_proj"),
      *_layer_norm(f"{t}.layer_norm2", f"{o}/ln_2"),
      *_dense(f"{t}.mlp.fc1", f"{o}/mlp/c_fc"),
      *_dense(f"{t}.mlp.fc2", f"{o}/mlp/c_proj"),
  ]


HF_VISION = [
    _rule("vision_model.embeddings.patch_embedding.weight", "visual/conv1/kernel", CONV),
    _rule("vision_model.embeddings.class_embedding", "visual/class_embedding"),
    _rule("vision_model.embeddings.position_embedding.weight",
          "visual/positional_embedding"),
    *_layer_norm("vision_model.pre_layrnorm", "visual/ln_pre"),  # sic
    *_layer_norm("vision_model.post_layernorm", "visual/ln_post"),
    _rule("visual_projection.weight", "visual/proj", LINEAR),   # [d, w]
]
HF_VISION_BLOCK = _hf_block("vision_model.encoder.layers.{i}",
                            "visual/transformer/resblocks_{i}")
HF_TEXT = [
    _rule("text_model.embeddings.token_embedding.weight", "text/token_embedding"),
    _rule("text_model.embeddings.position_embedding.weight",
          "text/positional_embedding"),
    *_layer_norm("text_model.final_layer_norm", "text/ln_final"),
    _rule("text_projection.weight", "text/text_projection", LINEAR),  # [d, w]
    _rule("logit_scale", "logit_scale"),
]
HF_TEXT_BLOCK = _hf_block("text_model.encoder.layers.{i}",
                          "text/transformer/resblocks_{i}")
# Non-persistent buffers that older transformers versions saved.
HF_IGNORED = ("vision_model.embeddings.position_ids",
              "text_model.embeddings.position_ids")

# layout -> (top-level rules, vision block rules, text block rules, ignored keys)
LAYOUTS = {
    "openai": (OPENAI_VISION + OPENAI_TEXT, OPENAI_VISION_BLOCK,
               OPENAI_TEXT_BLOCK, OPENAI_IGNORED),
    "hf": (HF_VISION + HF_TEXT, HF_VISION_BLOCK, HF_TEXT_BLOCK, HF_IGNORED),
}


# --- FIX-CLIP's parameters (docs/method.md §3) in the OpenAI layout. PyTorch CLIP
# has no place for them, so they are written under documented extra keys:
#   fixclip.visual.prompts.{i}            [M, w]  regional prompts of block i
#   fixclip.visual.mask_token             [w]     the short branch's mask token
#   fixclip.{visual,text}.gta.{g}.linear.{weight [d, w], bias [d]}
#   fixclip.{visual,text}.gta.{g}.ln.{weight, bias}       GTA head of group g
# Shapes give num_prompts, prompt_layers, mask_token and gta_groups back on
# import; region_layout, prompt_mode and gta_sigma are not stored: import gives
# the defaults (strips, carry, 1.0), which every model of ours since 2026-12
# uses (files converted earlier hold grid/fresh models: override on import).
FIXCLIP_PREFIX = "fixclip."


def fixclip_rules(cfg: CLIPConfig) -> Sequence[Rule]:
  """The extra-key rules for cfg's FIX-CLIP parameters (none for plain CLIP)."""
  rules = []
  if cfg.num_prompts:
    rules += [_rule(f"fixclip.visual.prompts.{i}", f"visual/transformer/prompts_{i}")
              for i in range(cfg.vision_layers)
              if fixclip.prompt_layer_active(i, cfg.prompt_layers)]
  if cfg.mask_token:
    rules.append(_rule("fixclip.visual.mask_token", "visual/mask_token"))
  for tower in ("visual", "text"):
    for g in range(cfg.gta_groups):
      rules += _dense(f"fixclip.{tower}.gta.{g}.linear", f"{tower}/gta/linear_{g}")
      rules += _layer_norm(f"fixclip.{tower}.gta.{g}.ln", f"{tower}/gta/ln_{g}")
  return rules


def _count_layers(keys: Sequence[str], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
  if ids != set(range(len(ids))):
    raise ValueError(f"Non-contiguous layer indices under {prefix!r}: {sorted(ids)}")
  return len(ids)


def config_from_shapes(shapes: Mapping[str, Sequence[int]], *,
                       head_dim: int = 64, act: str = "quick_gelu",
                       vision_heads: Optional[int] = None,
                       text_heads: Optional[int] = None) -> CLIPConfig:
  """Infers a CLIPConfig from an OpenAI-layout state dict's {key: shape}.

  Head counts are not visible in shapes; like OpenAI's `build_model` we take
  width // head_dim unless given. A `positional_embedding_res` key means
  Long-CLIP's two tables split at LONGCLIP_KEEP; `fixclip.*` keys give the
  FIX-CLIP sizes (see FIXCLIP_PREFIX above).
  """
  def shape(key):
    if key not in shapes:
      raise KeyError(f"State dict has no key {key!r}, needed to infer the "
                     "architecture (is this an OpenAI/open_clip CLIP state dict?)")
    return tuple(shapes[key])

  def consensus(*candidates):
    """The size most (key, axis) candidates agree on (ties: the first's):
    one mis-shaped tensor then fails the check under its own key instead of
    changing the inferred architecture, and every other key's shape."""
    values = [tuple(shapes[k])[axis] for k, axis in candidates
              if k in shapes and len(shapes[k]) > axis]
    if not values:
      shape(candidates[0][0])  # raises, naming the key
    counts = collections.Counter(values)
    return next(v for v in values if counts[v] == max(counts.values()))

  keys = list(shapes)
  vision_layers = _count_layers(keys, "visual.transformer.resblocks.")
  text_layers = _count_layers(keys, "transformer.resblocks.")
  vblock = lambda i, rest: f"visual.transformer.resblocks.{i}.{rest}"
  tblock = lambda i, rest: f"transformer.resblocks.{i}.{rest}"
  _, _, patch, _ = shape("visual.conv1.weight")
  vw = consensus(("visual.conv1.weight", 0), ("visual.class_embedding", 0),
                 ("visual.ln_pre.weight", 0), ("visual.ln_post.weight", 0),
                 ("visual.proj", 0), ("visual.positional_embedding", 1),
                 *[(vblock(i, "ln_1.weight"), 0) for i in range(vision_layers)])
  vision_mlp = consensus(*[(vblock(i, "mlp.c_fc.weight"), 0)
                           for i in range(vision_layers)])
  n_pos = shape("visual.positional_embedding")[0]
  grid = round((n_pos - 1) ** 0.5)
  if grid * grid + 1 != n_pos:
    raise ValueError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square")
  tw = consensus(("ln_final.weight", 0), ("ln_final.bias", 0),
                 ("token_embedding.weight", 1), ("positional_embedding", 1),
                 ("text_projection", 0),
                 *[(tblock(i, "ln_1.weight"), 0) for i in range(text_layers)])
  text_mlp = consensus(*[(tblock(i, "mlp.c_fc.weight"), 0)
                         for i in range(text_layers)])
  keep = None
  if "positional_embedding_res" in shapes:
    keep = LONGCLIP_KEEP
  # FIX-CLIP's extra keys (documented above).
  prompt_ids = sorted(int(m.group(1)) for k in keys
                      if (m := re.fullmatch(r"fixclip\.visual\.prompts\.(\d+)", k)))
  num_prompts = shape(f"fixclip.visual.prompts.{prompt_ids[0]}")[0] if prompt_ids else 0
  prompt_layers = None
  if prompt_ids and prompt_ids != list(range(vision_layers)):
    prompt_layers = (prompt_ids[0], prompt_ids[-1] + 1)
    if prompt_ids != list(range(*prompt_layers)):
      raise ValueError(f"FIX-CLIP prompts on non-contiguous layers {prompt_ids}")
  gta_groups = len([k for k in keys
                    if re.fullmatch(r"fixclip\.visual\.gta\.\d+\.linear\.weight", k)])
  return CLIPConfig(
      embed_dim=consensus(("text_projection", 1), ("visual.proj", 1)),
      image_size=grid * patch,
      patch_size=patch,
      vision_width=vw,
      vision_layers=vision_layers,
      vision_heads=vision_heads or vw // head_dim,
      vision_mlp_dim=vision_mlp,
      context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0],
      text_width=tw,
      text_layers=text_layers,
      text_heads=text_heads or tw // head_dim,
      text_mlp_dim=text_mlp,
      act=act,
      positional_keep=keep,
      num_prompts=num_prompts,
      prompt_layers=prompt_layers,
      mask_token="fixclip.visual.mask_token" in shapes,
      gta_groups=gta_groups,
  )


def strip_fixclip(params: dict, cfg: CLIPConfig, *, written: str = "the model",
                  text_only: bool = False) -> Tuple[dict, CLIPConfig]:
  """Drops prompts, mask token and GTA heads: a plain (Long-)CLIP model.

  Warns (on the console) what goes and what it changes: the text encoder is
  complete; of the extras only the regional prompts change a feature (the
  image CLS), the mask token and GTA heads serve training only. `written`
  names the output in the warning; `text_only`: only the text tower is written.
  """
  extra = {r.ours for r in fixclip_rules(cfg)}
  if not extra:
    return params, cfg
  parts = ([f"regional prompts ({cfg.num_prompts} per prompted layer)"]
           * bool(cfg.num_prompts) + ["mask token"] * cfg.mask_token
           + [f"{cfg.gta_groups} GTA head group(s)"] * bool(cfg.gta_groups))
  if text_only or not cfg.num_prompts:
    effect = ("no feature changes (text encoder complete; mask token and GTA "
              "heads serve training only)")
  else:
    effect = ("its image features are plain CLIP's, without the regional "
              "prompts, so they differ from the FIX-CLIP model's; text "
              "features are unchanged")
  # HF's from_pretrained does the same: unused weights dropped with a warning.
  logging.warning("Writing %s without FIX-CLIP's %s (%d arrays): %s", written,
                  ", ".join(parts), len(extra), effect)
  flat = {k: v for k, v in flatten_params(params).items()
          if k not in extra}
  return unflatten_params(flat), cfg.replace(
      num_prompts=0, prompt_layers=None, mask_token=False, gta_groups=0)


def rules_for(layout: str, cfg: CLIPConfig) -> Sequence[Rule]:
  """The layout's table expanded for cfg: `{i}` filled in, `when` applied."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
  top, vision_block, text_block, _ = LAYOUTS[layout]
  fill = lambda r, i: Rule(tuple(k.format(i=i) for k in r.torch_keys),
                           r.ours.format(i=i), r.transform)
  rules = [r for r in top if r.when is None or r.when(cfg)]
  rules += [fill(r, i) for i in range(cfg.vision_layers) for r in vision_block]
  rules += [fill(r, i) for i in range(cfg.text_layers) for r in text_block]
  if layout == "openai":
    rules += fixclip_rules(cfg)
  return rules


def torch_shapes(layout: str, cfg: CLIPConfig) -> Dict[str, Tuple[int, ...]]:
  """{PyTorch key: shape} that a state dict of this layout must have for cfg."""
  ours = flatten_params(param_shapes(cfg))
  shapes = {}
  for rule in rules_for(layout, cfg):
    spec = jax.ShapeDtypeStruct(ours[rule.ours], jnp.float32)
    outs = jax.eval_shape(rule.transform.to_torch, spec)
    shapes.update({k: tuple(o.shape) for k, o in zip(rule.torch_keys, outs)})
  return shapes


def _check_state_dict(sd: StateDict, layout: str, cfg: CLIPConfig, source: str):
  """One CheckpointError naming each missing/unexpected/mis-shaped key."""
  expected = torch_shapes(layout, cfg)
  found = {k: tuple(np.shape(v)) for k, v in sd.items()}
  problems = [f"missing key {k!r} (expected shape {s})"
              for k, s in expected.items() if k not in found]
  problems += [f"unexpected key {k!r} (found shape {s})"
               for k, s in found.items() if k not in expected]
  problems += [f"key {k!r}: expected shape {expected[k]}, found {found[k]}"
               for k in expected if k in found and found[k] != expected[k]]
  if problems:
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    raise CheckpointError(f"{source}: {layout}-layout state dict does not match "
                          f"the model: " + "; ".join(problems[:8]) + more)


def state_dict_to_params(sd: StateDict, cfg: CLIPConfig, layout: str,
                         source: str = "state dict") -> dict:
  """PyTorch-layout tensors -> our float32 params (validated first)."""
  _check_state_dict(sd, layout, cfg, source)
  flat = {}
  for rule in rules_for(layout, cfg):
    value = rule.transform.to_ours(*[sd[k] for k in rule.torch_keys])
    flat[rule.ours] = np.array(value, dtype=np.float32, order="C")  # keeps 0-d
  return unflatten_params(flat)


def params_to_state_dict(params: dict, cfg: CLIPConfig, layout: str) -> StateDict:
  """Our params -> {PyTorch key: float32 array} in the given layout."""
  check_params(params, cfg, "params to export")
  flat = flatten_params(params)
  rules = rules_for(layout, cfg)
  # HF's CLIPModel has no place for FIX-CLIP's extra params; dropping them
  # silently would change the model (strip_fixclip / --drop_extra does it on
  # request).
  uncovered = sorted(set(flat) - {r.ours for r in rules})
  if uncovered:
    raise CheckpointError(f"params {uncovered[:6]}{' ...' if len(uncovered) > 6 else ''}"
                          f" have no place in the {layout} CLIP layout; "
                          "--drop_extra writes the model without them")
  sd = {}
  for rule in rules:
    value = np.asarray(jax.device_get(flat[rule.ours]), np.float32)
    for key, tensor in zip(rule.torch_keys, rule.transform.to_torch(value)):
      sd[key] = np.array(tensor, order="C")  # a copy, 0-d kept 0-d
  return sd


def params_to_openai_state_dict(params: dict, cfg: CLIPConfig) -> StateDict:
  """OpenAI layout; a Long-CLIP two-table model keeps both tables (its .pt layout)."""
  if cfg.positional_keep not in (None, LONGCLIP_KEEP):
    logging.warning("positional_keep=%d is not Long-CLIP's %d; readers of the "
                    "OpenAI layout assume %d", cfg.positional_keep,
                    LONGCLIP_KEEP, LONGCLIP_KEEP)
  return params_to_state_dict(params, cfg, "openai")


def single_position_table(params: dict, cfg: CLIPConfig) -> Tuple[dict, CLIPConfig]:
  """Folds Long-CLIP's two tables into the one the model adds (docs/method.md §2)."""
  if cfg.positional_keep is None:
    return params, cfg
  params = positional.fit_text_positions(
      jax.device_get(params), src_length=cfg.context_length,
      src_keep=cfg.positional_keep, length=cfg.context_length, keep=None)
  return params, cfg.replace(positional_keep=None)


def params_to_hf_state_dict(params: dict, cfg: CLIPConfig) -> StateDict:
  """HF `CLIPModel` layout; two position tables are written combined."""
  if cfg.positional_keep is not None:
    logging.info("HF layout has one text position table: writing rows < %d from "
                 "positional_embedding and the rest from positional_embedding_res",
                 cfg.positional_keep)
    params, cfg = single_position_table(params, cfg)
  return params_to_state_dict(params, cfg, "hf")


# ---------------------------------------------------------------------------
# Hugging Face config.json <-> CLIPConfig.

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields an
# older config.json leaves out.
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048,
    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
    hidden_act="quick_gelu", layer_norm_eps=1e-5)
# HF hidden_act -> ours. HF's "gelu" is the exact (erf) GELU, as ours.
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def hf_config_dict(cfg: CLIPConfig) -> dict:
  """config.json of a transformers `CLIPModel` with cfg's sizes."""
  if cfg.positional_keep is not None:
    raise ValueError("hf_config_dict: fold the two position tables first "
                     "(single_position_table)")
  common = dict(hidden_act=cfg.act, layer_norm_eps=1e-5,
                projection_dim=cfg.embed_dim, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0)
  text = dict(
      model_type="clip_text_model", vocab_size=cfg.vocab_size,
      hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp_dim,
      num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
      max_position_embeddings=cfg.context_length,
      # Our model pools at argmax(ids); with EOT the largest id, HF's rule
      # (first position of eos_token_id) picks the same token.
      bos_token_id=cfg.vocab_size - 2,
      eos_token_id=(cfg.vocab_size - 1 if cfg.eot_token_id is None
                    else cfg.eot_token_id),
      pad_token_id=1, **common)
  vision = dict(
      model_type="clip_vision_model", hidden_size=cfg.vision_width,
      intermediate_size=cfg.vision_mlp_dim, num_hidden_layers=cfg.vision_layers,
      num_attention_heads=cfg.vision_heads, num_channels=3,
      image_size=cfg.image_size, patch_size=cfg.patch_size, **common)
  return dict(architectures=["CLIPModel"], model_type="clip",
              projection_dim=cfg.embed_dim, logit_scale_init_value=2.6592,
              initializer_factor=1.0, dtype="float32",
              text_config=text, vision_config=vision)


# Fields that must be positive integers, per tower (checked before use).
_HF_INT_FIELDS = {
    "text_config": ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"),
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "image_size", "patch_size"),
}


def _hf_tower(hf: dict, tower: str, defaults: dict, source: str) -> dict:
  """A tower's config with defaults; CheckpointError naming a missing tower,
  a field that is no positive integer, or sizes that do not fit together."""
  given = hf.get(tower) or hf.get(f"{tower}_dict")
  if given is None:
    raise CheckpointError(f"{source}: no {tower} (a transformers CLIPModel "
                          "config.json has text_config and vision_config)")
  if not isinstance(given, dict):
    raise CheckpointError(f"{source}: {tower} must be a JSON object, found "
                          f"{type(given).__name__}")
  c = {**defaults, **given}
  for field in _HF_INT_FIELDS[tower]:
    value = c[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise CheckpointError(f"{source}: {tower}.{field}={value!r} must be a "
                            "positive integer")
  if c["hidden_size"] % c["num_attention_heads"]:
    raise CheckpointError(
        f"{source}: {tower}.num_attention_heads={c['num_attention_heads']} "
        f"does not divide {tower}.hidden_size={c['hidden_size']}")
  if tower == "vision_config" and c["image_size"] % c["patch_size"]:
    raise CheckpointError(f"{source}: vision_config.patch_size={c['patch_size']}"
                          f" does not divide image_size={c['image_size']}")
  if not isinstance(c["layer_norm_eps"], (int, float)):
    raise CheckpointError(f"{source}: {tower}.layer_norm_eps="
                          f"{c['layer_norm_eps']!r} must be a number")
  return c


def config_from_hf(hf: dict, source: str = "config.json") -> CLIPConfig:
  """CLIPConfig from a transformers CLIPModel config.json dict."""
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: expected a JSON object (a transformers "
                          f"CLIPModel config), found {type(hf).__name__}")
  if hf.get("model_type", "clip") != "clip":
    raise CheckpointError(f"{source}: model_type {hf['model_type']!r} is not 'clip'")
  text = _hf_tower(hf, "text_config", _HF_TEXT_DEFAULTS, source)
  vision = _hf_tower(hf, "vision_config", _HF_VISION_DEFAULTS, source)
  projection = hf.get("projection_dim", 512)
  if isinstance(projection, bool) or not isinstance(projection, int) or projection <= 0:
    raise CheckpointError(f"{source}: projection_dim={projection!r} must be a "
                          "positive integer")
  acts = {}
  for tower, c in (("text_config", text), ("vision_config", vision)):
    if c["hidden_act"] not in _HF_ACTS:
      raise CheckpointError(f"{source}: {tower}.hidden_act={c['hidden_act']!r} is "
                            f"not supported; supported: {sorted(_HF_ACTS)}")
    acts[tower] = _HF_ACTS[c["hidden_act"]]
    if abs(c["layer_norm_eps"] - 1e-5) > 1e-12:
      raise CheckpointError(f"{source}: {tower}.layer_norm_eps="
                            f"{c['layer_norm_eps']} but our LayerNorm uses 1e-5")
  if len(set(acts.values())) != 1:
    raise CheckpointError(f"{source}: towers use different activations {acts}; "
                          "our model has one `act`")
  eos = text.get("eos_token_id")
  if eos not in (None, 2, text["vocab_size"] - 1):
    logging.warning("%s: eos_token_id=%s is not the largest id; HF pools at the "
                    "first eos token, our model at argmax(ids)", source, eos)
  return CLIPConfig(
      embed_dim=projection,
      image_size=vision["image_size"], patch_size=vision["patch_size"],
      vision_width=vision["hidden_size"], vision_layers=vision["num_hidden_layers"],
      vision_heads=vision["num_attention_heads"],
      vision_mlp_dim=vision["intermediate_size"],
      context_length=text["max_position_embeddings"],
      vocab_size=text["vocab_size"], text_width=text["hidden_size"],
      text_layers=text["num_hidden_layers"],
      text_heads=text["num_attention_heads"],
      text_mlp_dim=text["intermediate_size"], act=acts["text_config"])


# ---------------------------------------------------------------------------
# Reading PyTorch files.

def _tensor_to_numpy(t):
  t = t.detach().cpu()
  if t.is_floating_point():
    t = t.float()  # numpy has no bfloat16; our params are float32 anyway
  return t.numpy()


def _local_or_bytes(path: str):
  """A local path as it is (torch maps it); a URL's bytes in memory."""
  return io.BytesIO(fileio.path(path).read_bytes()) if fileio.is_url(path) else path


def _refused_unpickle(path: str, detail: str) -> CheckpointError:
  return CheckpointError(
      f"{path}: refused: this file needs an arbitrary unpickle (it holds Python "
      f"objects, not only tensors: {detail}), which could run any code. If you "
      "trust it, convert it with python -c \"import torch; m = torch.load("
      f"'{path}', weights_only=False); torch.save(m.state_dict() if "
      "hasattr(m, 'state_dict') else m['state_dict'], 'weights.pt')\" or "
      "re-save with torch.save(state_dict) where it was made, then pass that "
      "file.")


def _torch_load(path: str):
  torch = require_torch(f"{path}: reading a PyTorch file")
  try:
    with warnings.catch_warnings():  # torch's notes on pickle protocols and
      warnings.simplefilter("ignore", UserWarning)  # TorchScript: errors say it
      return torch.load(_local_or_bytes(path), map_location="cpu",
                        weights_only=True)
  except pickle.UnpicklingError as e:
    msg = str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or
                   "Unsupported" in line), lines[0] if lines else msg)
    corrupt = any(w in msg for w in ("truncated", "EOF", "ran out of input"))
    if "Weights only load failed" in msg and not corrupt:
      raise _refused_unpickle(path, detail) from e
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {detail}") from e
  except RuntimeError as e:
    if "TorchScript" in str(e):  # OpenAI's original .pt files
      raise CheckpointError(
          f"{path}: refused: a TorchScript archive (OpenAI's original .pt "
          "files); loading it runs its code. If you trust it, convert it with "
          "python -c \"import torch; torch.save(torch.jit.load("
          f"'{path}', map_location='cpu').state_dict(), 'weights.pt')\", "
          "then pass that file.") from e
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e
  except Exception as e:  # zip/EOF/… errors of a truncated or foreign file
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e


# safetensors dtype names -> numpy; BF16 has no numpy dtype (read as uint16,
# upcast to float32 by bit shift: exact).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_}


def _safetensors_header(data: bytes, path: str) -> Tuple[dict, int]:
  """(header {key: {dtype, shape, data_offsets}}, offset of the tensor bytes)."""
  if len(data) < 8:
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): {len(data)} bytes")
  (size,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + size])
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): bad header ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          "(truncated or corrupt?): its header is a JSON "
                          f"{type(header).__name__}, not an object of tensors")
  header.pop("__metadata__", None)
  for key, info in header.items():
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
      raise CheckpointError(f"{path}: could not read the safetensors file "
                            f"(truncated or corrupt?): header entry {key!r} is "
                            "not {dtype, shape, data_offsets}")
  return header, 8 + size


def _safetensors_raw(data: bytes, header: dict, base: int, path: str
                     ) -> StateDict:
  """Tensors from their raw bytes (bfloat16 upcast to float32)."""
  out = {}
  for key, info in header.items():
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    raw = data[base + begin:base + end]
    bf16 = info["dtype"] == "BF16"
    if not bf16 and info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {key!r} has dtype "
                            f"{info['dtype']}, which is not read")
    dtype = np.dtype("<u2" if bf16 else _SAFETENSORS_DTYPES[info["dtype"]])
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"{path}: could not read the safetensors file "
                            f"(truncated or corrupt?): tensor {key!r} has "
                            f"{len(raw)} bytes for shape {shape}")
    array = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    out[key] = ((array.astype(np.uint32) << 16).view(np.float32) if bf16
                else array)
  return out


def _safetensors_load(path: str) -> StateDict:
  """A .safetensors file without torch: safetensors.numpy, or the raw bytes
  when it holds bfloat16 tensors (which numpy lacks). Floats -> float32."""
  data = fileio.path(path).read_bytes()
  header, base = _safetensors_header(data, path)
  try:
    if any(info.get("dtype") == "BF16" for info in header.values()):
      tensors = _safetensors_raw(data, header, base, path)
    else:
      tensors = safetensors_numpy.load(data)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a corrupt file
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
  return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating)
          else np.asarray(v) for k, v in tensors.items()}


def _unwrap(obj, path: str) -> StateDict:
  """torch.load result -> flat {key: array}: nested state_dict, module. prefix."""
  torch = require_torch(f"{path}: reading a PyTorch file")
  if isinstance(obj, dict):
    for wrapper in ("state_dict", "model_state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        logging.info("%s: using the state dict nested under %r", path, wrapper)
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  sd = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      sd[k] = _tensor_to_numpy(v)
    elif isinstance(v, (int, float)) and k in OPENAI_IGNORED:
      sd[k] = np.asarray(v)
    else:
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
  return sd


def read_state_dict(path: str) -> StateDict:
  """A .pt/.pth/.bin/.safetensors file -> {key: numpy array} (floats as float32)."""
  if not fileio.isfile(path):
    raise FileNotFoundError(f"No such checkpoint file: {path}")
  if path.endswith(".safetensors"):
    sd = _safetensors_load(path)
  else:
    sd = _unwrap(_torch_load(path), path)
  if sd and all(k.startswith("module.") for k in sd):
    logging.info("%s: stripping the 'module.' prefix (DDP)", path)
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def _read_hf_weights(directory: str) -> StateDict:
  """The weights of a save_pretrained directory (single or sharded)."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(directory, index_name)
    if fileio.isfile(index):
      try:
        weight_map = json.loads(fileio.read_text(index))["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in shards):
          raise TypeError("a shard name is not a string")
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{index}: not a valid index of weight files ({type(e).__name__}:"
            f" {e}; expected {{\"weight_map\": {{key: file name}}}})") from None
      sd = {}
      for shard in shards:
        sd.update(read_state_dict(os.path.join(directory, shard)))
      return sd
  for name in ("model.safetensors", "pytorch_model.bin"):
    if fileio.isfile(os.path.join(directory, name)):
      return read_state_dict(os.path.join(directory, name))
  raise CheckpointError(f"{directory}: HF directory has config.json but no "
                        "model.safetensors / pytorch_model.bin")


def _drop(sd: StateDict, keys: Sequence[str], source: str) -> StateDict:
  dropped = [k for k in keys if k in sd]
  if dropped:
    logging.info("%s: ignoring non-parameter entries %s", source, dropped)
  return {k: v for k, v in sd.items() if k not in dropped}


def _is_hf_keys(sd: StateDict) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _load_hf_dir(directory: str) -> Tuple[dict, CLIPConfig]:
  config_file = os.path.join(directory, "config.json")
  try:
    hf = json.loads(fileio.read_text(config_file))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
  cfg = config_from_hf(hf, config_file)
  sd = _drop(_read_hf_weights(directory), HF_IGNORED, directory)
  return state_dict_to_params(sd, cfg, "hf", directory), cfg


def _load_openai(sd: StateDict, path: str, act: Optional[str]) -> Tuple[dict, CLIPConfig]:
  sd = _drop(sd, OPENAI_IGNORED, path)
  try:
    # Heads are not visible in shapes: width // 64, as OpenAI's build_model.
    cfg = config_from_shapes({k: v.shape for k, v in sd.items()},
                             act=act or "quick_gelu")
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot infer the architecture: {e}") from e
  if act is None:
    logging.info("%s: the activation is not stored in OpenAI-layout files; "
                 "assuming quick_gelu (OpenAI's)", path)
  return state_dict_to_params(sd, cfg, "openai", path), cfg


def detect_format(path: str) -> str:
  """'orbax' | 'hf' | 'openai' | 'longclip' without converting anything."""
  if fileio.isdir(path):
    if checkpoint.is_model_dir(path):
      return "orbax"
    if fileio.isfile(os.path.join(path, "config.json")):
      return "hf"
    raise CheckpointError(f"{path}: directory is neither one of our model "
                          "checkpoints nor a HF CLIPModel (no config.json)")
  return _format_of(read_state_dict(path), path)


def _format_of(sd: StateDict, path: str) -> str:
  if _is_hf_keys(sd):
    return "hf"
  if "visual.conv1.weight" in sd:
    if any(k.startswith(FIXCLIP_PREFIX) for k in sd):
      return "fixclip"
    return "longclip" if "positional_embedding_res" in sd else "openai"
  raise CheckpointError(
      f"{path}: unrecognised key layout (no 'visual.conv1.weight' as in OpenAI/"
      f"open_clip, no 'vision_model.*' as in HF); first keys: {sorted(sd)[:5]}")


def load_torch_checkpoint(path: str, *, act: Optional[str] = None
                          ) -> Tuple[dict, CLIPConfig, str]:
  """Reads an OpenAI/open_clip/Long-CLIP file or a HF CLIPModel directory.

  Args:
    path: a .pt/.pth/.bin/.safetensors file or a HF save_pretrained directory.
    act: activation for OpenAI-layout files, which do not store it
      ("quick_gelu" if None; open_clip's non-quickgelu models need "gelu").

  Returns:
    (params as numpy float32, CLIPConfig, format name).
  """
  if fileio.isdir(path):
    if not fileio.isfile(os.path.join(path, "config.json")):
      raise CheckpointError(f"{path}: a directory, but not a HF CLIPModel "
                            "directory (no config.json)")
    logging.info("%s: detected format hf (CLIPModel directory)", path)
    params, cfg = _load_hf_dir(path)
    checkpoint.check_finite(params, path)
    return params, cfg, "hf"
  sd = read_state_dict(path)
  fmt = _format_of(sd, path)
  logging.info("%s: detected format %s", path, fmt)
  if fmt == "hf":
    if not fileio.isfile(os.path.join(os.path.dirname(path), "config.json")):
      raise CheckpointError(f"{path}: HF-layout weights without a config.json "
                            "next to them; pass the save_pretrained directory")
    params, cfg = _load_hf_dir(os.path.dirname(path) or ".")
  else:
    params, cfg = _load_openai(sd, path, act)
  checkpoint.check_finite(params, path)
  return params, cfg, fmt


def load_any(path: str, *, act: Optional[str] = None) -> Tuple[dict, CLIPConfig, str]:
  """Like load_torch_checkpoint, and also reads our own orbax model dirs."""
  if checkpoint.is_model_dir(path):
    logging.info("%s: detected format orbax", path)
    params, cfg = checkpoint.load_model(path)
    return params, cfg, "orbax"
  if checkpoint.is_train_workdir(path):
    logging.info("%s: detected format train_workdir (latest step's params)", path)
    params, cfg = checkpoint.load_train_params(path)
    return params, cfg, "train_workdir"
  return load_torch_checkpoint(path, act=act)


# ---------------------------------------------------------------------------
# Writing PyTorch files. Everything goes to a temporary path next to the
# destination and is renamed into place, so failures leave nothing behind.

TORCH_EXTRA = "pip install 'fixclip_jax[torch]'"


def require_torch(purpose: str):
  """The torch module, or a CheckpointError (one line at the CLI) naming the
  extra that installs it: the base install has no PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: PyTorch files only
  except ImportError as e:
    raise CheckpointError(
        f"{purpose} needs PyTorch, which is not installed: {TORCH_EXTRA} "
        "(.safetensors files and HF directories need no torch)") from e
  return torch

def _write_tensors(path: str, sd: StateDict, as_safetensors: bool) -> None:
  """One local file: safetensors, or torch.save of a plain dict of tensors."""
  if as_safetensors:
    # Written by us rather than save_file, which leaves files 0600: ours get
    # the mode fileio gave the temporary file (0644 under the usual umask).
    with open(path, "wb") as f:
      f.write(safetensors_numpy.save(sd, metadata={"format": "pt"}))
  else:
    torch = require_torch(f"{path}: writing a .pt file")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)


def save_openai(path: str, params: dict, cfg: CLIPConfig, *,
                overwrite: bool = False) -> None:
  """OpenAI-layout .pt (plain dict of tensors) or .safetensors."""
  fileio.refuse_existing(path, overwrite)
  if not path.endswith(".safetensors"):
    require_torch(f"{path}: writing a .pt file")
  sd = params_to_openai_state_dict(params, cfg)
  with fileio.atomic_file(path, overwrite=overwrite) as tmp:
    _write_tensors(tmp, sd, as_safetensors=path.endswith(".safetensors"))
  logging.info("Wrote OpenAI-layout checkpoint (%d tensors) to %s", len(sd), path)


def hf_preprocessor_config(cfg: CLIPConfig) -> dict:
  """preprocessor_config.json of a CLIPImageProcessor doing our eval
  transform: bicubic resize of the short side, centre crop, CLIP mean/std."""
  return {
      "image_processor_type": "CLIPImageProcessor",
      "processor_class": "CLIPProcessor",
      "do_resize": True, "size": {"shortest_edge": cfg.image_size},
      "resample": 3,  # PIL.Image.BICUBIC
      "do_center_crop": True,
      "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
      "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": list(transforms.CLIP_MEAN),
      "image_std": list(transforms.CLIP_STD), "do_convert_rgb": True,
  }


def _write_hf_preprocessing(directory: str, cfg: CLIPConfig) -> None:
  """Tokenizer files at cfg's context and the image processor's config."""
  tokenizers.ClipTokenizer(context_length=cfg.context_length).save_hf_files(directory)
  fileio.atomic_write(os.path.join(directory, "preprocessor_config.json"),
                      json.dumps(hf_preprocessor_config(cfg), indent=2))


def save_hf(directory: str, params: dict, cfg: CLIPConfig, *,
            overwrite: bool = False) -> None:
  """A transformers directory: CLIPModel weights + config.json, the tokenizer
  files (model_max_length = the context) and preprocessor_config.json, so
  CLIPModel / CLIPProcessor / CLIPTokenizer(Fast).from_pretrained load it."""
  fileio.refuse_existing(directory, overwrite)
  params, cfg = strip_fixclip(params, cfg, written="the HF CLIPModel")
  sd = params_to_hf_state_dict(params, cfg)
  _, cfg = single_position_table(params, cfg)
  with fileio.atomic_directory(directory, overwrite=overwrite) as tmp:
    _write_hf_weights(tmp, hf_config_dict(cfg), sd)
    _write_hf_preprocessing(tmp, cfg)
  logging.info("Wrote HF CLIPModel directory (%d-token tokenizer, %dpx image "
               "processor) to %s", cfg.context_length, cfg.image_size, directory)


def _write_hf_weights(directory: str, config: dict, sd: StateDict) -> None:
  """config.json + model.safetensors, the save_pretrained layout."""
  fileio.atomic_write(os.path.join(directory, "config.json"),
                      json.dumps(config, indent=2))
  _write_tensors(os.path.join(directory, "model.safetensors"), sd, as_safetensors=True)


def save_hf_text_encoder(directory: str, params: dict, cfg: CLIPConfig, *,
                         overwrite: bool = False) -> None:
  """The text tower alone as a HF `CLIPTextModelWithProjection` directory plus
  its `CLIPTokenizer` files at cfg.context_length (248 for Long-/FIX-CLIP):
  `CLIPTextModel.from_pretrained` loads it too (ignoring the projection), and
  a diffusers pipeline takes it as `text_encoder` (plug-and-play, docs/method.md §3).
  """
  fileio.refuse_existing(directory, overwrite)
  params, cfg = single_position_table(params, cfg)
  params, cfg = strip_fixclip(params, cfg, written="the HF text encoder",
                              text_only=True)
  full = params_to_state_dict(params, cfg, "hf")
  sd = {k: v for k, v in full.items()
        if k.startswith("text_model.") or k == "text_projection.weight"}
  text_config = dict(hf_config_dict(cfg)["text_config"],
                     architectures=["CLIPTextModelWithProjection"],
                     projection_dim=cfg.embed_dim, dtype="float32")
  with fileio.atomic_directory(directory, overwrite=overwrite) as tmp:
    _write_hf_weights(tmp, text_config, sd)
    tokenizers.ClipTokenizer(context_length=cfg.context_length).save_hf_files(tmp)
  # (No image processor: a text encoder alone.)
  logging.info("Wrote HF text encoder (%d tokens) + tokenizer to %s",
               cfg.context_length, directory)


def save_orbax(path: str, params: dict, cfg: CLIPConfig, *,
               overwrite: bool = False) -> None:
  checkpoint.save_model(path, params, cfg, overwrite=overwrite)


SAVERS = {"orbax": save_orbax, "openai": save_openai, "hf": save_hf,
          "hf_text": save_hf_text_encoder}


def convert(src: str, dst: str, to: str = "orbax", *, act: Optional[str] = None,
            params_transform: Optional[ParamsTransform] = None,
            overwrite: bool = False) -> Tuple[CLIPConfig, str]:
  """Reads src (any format), optionally transforms the params, writes dst.

  `params_transform(params, cfg) -> (params, cfg)` runs between load and save
  (e.g. Long-CLIP positional stretching). Returns (cfg written, source format).
  """
  if to not in SAVERS:
    raise ValueError(f"--to={to!r}: must be one of {sorted(SAVERS)}")
  fileio.refuse_existing(dst, overwrite)
  # PyTorch files need the [torch] extra: said before anything is read.
  if fileio.isfile(src) and not src.endswith(".safetensors"):
    require_torch(f"--src={src}: reading a PyTorch file")
  if to == "openai" and not dst.endswith(".safetensors"):
    require_torch(f"--to=openai --dst={dst}: writing a .pt file")
  params, cfg, fmt = load_any(src, act=act)
  if params_transform is not None:
    params, cfg = params_transform(params, cfg)
  SAVERS[to](dst, params, cfg, overwrite=overwrite)
  logging.info("Converted %s (%s) -> %s (%s): %s", src, fmt, dst, to, cfg)
  return cfg, fmt


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("src", None, "Checkpoint to read: .pt/.bin/.safetensors, a HF "
                      "CLIPModel directory, one of our model dirs or a training workdir.")
  flags.DEFINE_string("dst", None, "Where to write (must not exist).")
  flags.DEFINE_enum("to", "orbax", sorted(SAVERS), "Output format: orbax | openai | "
                    "hf (CLIPModel + tokenizer + image processor) | hf_text "
                    "(text encoder + tokenizer).")
  flags.DEFINE_enum("act", None, ["quick_gelu", "gelu"], "Activation of an "
                    "OpenAI-layout source (not stored in the file); default quick_gelu.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dst.")
  flags.DEFINE_integer(
      "stretch", None, "Prepare for long-text training: stretch the text "
      "positions to this many rows with Long-CLIP's knowledge-preserved "
      "stretching (248 from 77) and create the two-table scheme (docs/method.md §2).")
  flags.DEFINE_bool(
      "drop_extra", False, "Write without FIX-CLIP's prompts / mask token / GTA "
      "heads: a plain Long-CLIP-layout model (text encoder complete). For "
      "--to=openai|orbax, which keep them otherwise; --to=hf|hf_text always "
      "drop them (HF's CLIP has no place for them), with a warning.")
  flags.mark_flags_as_required(["src", "dst"])


def stretch_transform(context_length: int, keep: int = LONGCLIP_KEEP) -> ParamsTransform:
  """params_transform for --stretch: KPS to `context_length`, two tables."""

  def transform(params, cfg):
    if cfg.context_length == context_length:
      raise CheckpointError(f"--stretch={context_length}: the checkpoint already "
                            f"has {context_length} text positions")
    try:
      params = positional.fit_text_positions(
          jax.device_get(params), src_length=cfg.context_length,
          src_keep=cfg.positional_keep, length=context_length, keep=keep,
          source=f"--stretch={context_length}")
    except ValueError as e:
      raise CheckpointError(str(e)) from e
    return params, cfg.replace(context_length=context_length, positional_keep=keep)

  return transform


def compose(*transforms: Optional[ParamsTransform]) -> Optional[ParamsTransform]:
  active = [t for t in transforms if t is not None]
  if not active:
    return None

  def run(params, cfg):
    for t in active:
      params, cfg = t(params, cfg)
    return params, cfg

  return run


def main(argv):
  cli.reject_positional_arguments(argv)
  if not fileio.exists(FLAGS.src):
    raise cli.UserError(f"--src={FLAGS.src}: no such file or directory")
  transform = compose(
      stretch_transform(FLAGS.stretch) if FLAGS.stretch else None,
      strip_fixclip if FLAGS.drop_extra else None)
  cfg, fmt = convert(FLAGS.src, FLAGS.dst, FLAGS.to, act=FLAGS.act,
                     params_transform=transform, overwrite=FLAGS.overwrite)
  print(f"Wrote {FLAGS.dst} ({FLAGS.to}) from {FLAGS.src} ({fmt}): "
        f"{cfg.vision_layers}-layer {cfg.image_size}px vision, "
        f"{cfg.context_length}-token text, embed_dim {cfg.embed_dim}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
