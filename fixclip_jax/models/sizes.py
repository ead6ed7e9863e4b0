"""Architecture sizes: `CLIPConfig`, the named sizes, and a run config's model.

The named sizes are OpenAI CLIP's (docs/method.md §1). Checkpoints of other
sizes get their CLIPConfig from their shapes (layouts.config_from_shapes) or
from the model_config.json stored next to them (`config_from_dict`).
"""
import dataclasses
from typing import Any, Mapping, Optional, Tuple

CLIP_VOCAB_SIZE = 49408


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
  # Long-CLIP two-table positional scheme (docs/method.md §2): None = one table;
  # k = a frozen `positional_embedding` for rows < k and a trainable
  # `positional_embedding_res` for rows >= k.
  positional_keep: Optional[int] = None
  # FIX-CLIP (docs/method.md §3); the defaults give plain CLIP.
  num_prompts: int = 0                  # regional prompt tokens per vision layer
  prompt_layers: Optional[Tuple[int, int]] = None  # [start, stop); None = all
  region_layout: str = "strips"         # fixclip.REGION_LAYOUTS
  prompt_mode: str = "carry"            # fixclip.PROMPT_MODES
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
    # head_dim=64 rule so that layouts.config_from_shapes recovers it exactly.
    "tiny": _vit(32, 8, 128, 2, 64, 128, 2),
    # The ablation's discriminating size (tools/ablate.py --budget=
    # discriminative): 4+4 layers, an 8x8 patch grid at 64 px.
    "tiny4": _vit(64, 8, 128, 4, 64, 128, 4),
}


def get_config(name: str, *, context_length: int = 77,
               positional_keep: Optional[int] = None, **overrides) -> CLIPConfig:
  """Config for a named size; e.g. get_config("B/16", context_length=248)."""
  if name not in SIZES:
    raise ValueError(f"Unknown model size {name!r}; known: {sorted(SIZES)}")
  return SIZES[name].replace(context_length=context_length,
                             positional_keep=positional_keep, **overrides)


def model_config(config) -> CLIPConfig:
  """CLIPConfig of a run: config.model_name ("B/16") plus config.model overrides."""
  overrides = dict(config.model)
  if overrides.get("prompt_layers") is not None:
    overrides["prompt_layers"] = tuple(overrides["prompt_layers"])
  return get_config(config.model_name, **overrides)


# Values of fields added after model_config.json files were first written.
LEGACY_DEFAULTS = {"prompt_mode": "fresh", "region_layout": "grid"}


def config_to_dict(cfg: CLIPConfig) -> dict:
  """The CLIPConfig fields, as stored in model_config.json."""
  return dataclasses.asdict(cfg)


def config_from_dict(fields: Mapping[str, Any], source: str = "config") -> CLIPConfig:
  """CLIPConfig from its JSON fields; an unknown field is an error naming it."""
  known = {f.name for f in dataclasses.fields(CLIPConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{source}: unknown CLIPConfig field(s) {unknown}; "
                     f"known: {sorted(known)}")
  # JSON has no tuples; CLIPConfig is frozen and hashable, so restore them.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  # Files written before these fields existed hold models built the old way:
  # prompts re-inserted fresh each layer, regions a 2-D grid.
  fields = dict(LEGACY_DEFAULTS, **fields)
  return CLIPConfig(**fields)
