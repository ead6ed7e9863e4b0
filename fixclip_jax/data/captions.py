"""Caption handling: short captions (method.md §2) and filters for MLLM captions (§3)."""
from typing import Optional


def first_sentence(caption: str) -> str:
  """Long-CLIP's short caption: `caption.split(". ")[0]` (method.md §2)."""
  return caption.split(". ")[0]


def short_caption(caption: str, provided: Optional[str] = None) -> str:
  """The provided short caption when the data has one, else the first sentence."""
  if provided is not None and provided.strip():
    return provided
  return first_sentence(caption)
