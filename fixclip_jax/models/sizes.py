"""Architecture sizes: from a model name ("B/16") or from a checkpoint's shapes.

The named sizes are OpenAI CLIP's (method.md §1). `config_from_shapes` infers the
architecture from an OpenAI-layout state dict the way OpenAI's `build_model`
does, so checkpoints of non-standard sizes load too.
"""
import dataclasses
import re
from typing import Mapping, Optional, Sequence, Tuple

CLIP_VOCAB_SIZE = 49408
# Long-CLIP's knowledge-preserved stretching keeps the first 20 positions (method.md §2).
LONGCLIP_KEEP = 20


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Everything that fixes the shapes of a CLIP model's parameters."""
  embed_dim: int = 512
  # Vision tower.
  image_size: int = 224
  patch_size: int = 16
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  # Text tower.
  context_length: int = 77
  vocab_size: int = CLIP_VOCAB_SIZE
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  # "quick_gelu" (OpenAI weights) or "gelu" (open_clip's non-quickgelu models).
  act: str = "quick_gelu"
  # Text pooling: None = at argmax(ids) (CLIP's EOT is the largest id); an id =
  # at its first occurrence (SentencePiece vocabularies, whose eos is small).
  eot_token_id: Optional[int] = None
  # Long-CLIP two-table positional scheme (method.md §2): None = one table;
  # k = a frozen `positional_embedding` for rows < k and a trainable
  # `positional_embedding_res` for rows >= k.
  positional_keep: Optional[int] = None
  # FIX-CLIP (method.md §3); the defaults give plain CLIP.
  num_prompts: int = 0                  # regional prompt tokens per vision layer
  prompt_layers: Optional[Tuple[int, int]] = None  # [start, stop); None = all
  region_layout: str = "grid"           # "grid" or "strips"
  mask_token: bool = False              # learnable token for masked patches
  gta_groups: int = 0                   # hierarchical groups (0 = no GTA heads)
  gta_sigma: float = 1.0

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)


def _vit(image_size, patch_size, width, layers, embed_dim, text_width,
         text_layers, **kw):
  return CLIPConfig(
      embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
      vision_width=width, vision_layers=layers, vision_heads=width // 64,
      vision_mlp_dim=4 * width, text_width=text_width, text_layers=text_layers,
      text_heads=text_width // 64, text_mlp_dim=4 * text_width, **kw)


SIZES = {
    "B/32": _vit(224, 32, 768, 12, 512, 512, 12),
    "B/16": _vit(224, 16, 768, 12, 512, 512, 12),
    "L/14": _vit(224, 14, 1024, 24, 768, 768, 12),
    "L/14@336": _vit(336, 14, 1024, 24, 768, 768, 12),
    # A few-MFLOP model for unit tests and the CPU demo; follows the same
    # head_dim=64 rule so that `config_from_shapes` recovers it exactly.
    "tiny": _vit(32, 8, 128, 2, 64, 128, 2),
}


def get_config(name: str, *, context_length: int = 77,
               positional_keep: Optional[int] = None, **overrides) -> CLIPConfig:
  """Config for a named size; e.g. get_config("B/16", context_length=248)."""
  if name not in SIZES:
    raise ValueError(f"Unknown model size {name!r}; known: {sorted(SIZES)}")
  return SIZES[name].replace(context_length=context_length,
                             positional_keep=positional_keep, **overrides)


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
  width // head_dim unless given.
  """
  def shape(key):
    if key not in shapes:
      raise KeyError(f"State dict has no key {key!r}, needed to infer the "
                     "architecture (is this an OpenAI/open_clip CLIP state dict?)")
    return tuple(shapes[key])

  keys = list(shapes)
  vw, _, patch, _ = shape("visual.conv1.weight")
  n_pos = shape("visual.positional_embedding")[0]
  grid = round((n_pos - 1) ** 0.5)
  if grid * grid + 1 != n_pos:
    raise ValueError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square")
  tw = shape("ln_final.weight")[0]
  keep = None
  if "positional_embedding_res" in shapes:
    keep = LONGCLIP_KEEP
  vision_layers = _count_layers(keys, "visual.transformer.resblocks.")
  # FIX-CLIP's extra keys (convert.py documents them).
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
      embed_dim=shape("text_projection")[1],
      image_size=grid * patch,
      patch_size=patch,
      vision_width=vw,
      vision_layers=vision_layers,
      vision_heads=vision_heads or vw // head_dim,
      vision_mlp_dim=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
      context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0],
      text_width=tw,
      text_layers=_count_layers(keys, "transformer.resblocks."),
      text_heads=text_heads or tw // head_dim,
      text_mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
      act=act,
      positional_keep=keep,
      num_prompts=num_prompts,
      prompt_layers=prompt_layers,
      mask_token="fixclip.visual.mask_token" in shapes,
      gta_groups=gta_groups,
  )
