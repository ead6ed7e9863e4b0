"""PyTorch checkpoint layouts <-> our params (docs/method.md §1, §2).

Conversion is data. Each layout (OpenAI/open_clip, Hugging Face `CLIPModel`)
is a table of rules (PyTorch key pattern(s), our param path, transform), with
`{i}` standing for a block index. A transform is a pair of exact inverse
functions (transpose, split/concat), so import (`to_ours`) and export
(`to_torch`) read the same table and round trips are exact by construction.
This is the only module where PyTorch key names appear. Also here: the
architecture read from a state dict's shapes (`config_from_shapes`) and from
a HF config.json (`config_from_hf`), and back (`hf_config_dict`).

FIX-CLIP's extra parameters (regional prompts, mask token, GTA heads) go
under `fixclip.*` keys in the openai layout (FIXCLIP_PREFIX below); HF's
CLIPModel has no place for them (`strip_fixclip`).
"""
import collections
import dataclasses
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fixclip_jax import torch_files
from fixclip_jax.models import fixclip
from fixclip_jax.models import positional
from fixclip_jax.models.params import check_params
from fixclip_jax.models.params import flatten_params
from fixclip_jax.models.params import param_shapes
from fixclip_jax.models.params import unflatten_params
from fixclip_jax.models.sizes import CLIPConfig

# The readers define these (torch_files.py); the same classes, named here too.
CheckpointError = torch_files.CheckpointError
StateDict = torch_files.StateDict

LONGCLIP_KEEP = positional.LONGCLIP_KEEP


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
OPENAI_IGNORED = torch_files.OPENAI_SCALARS


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
