"""Caption handling: short captions (docs/method.md §2) and filters for MLLM captions (§3)."""
import collections
import dataclasses
import re
from typing import (Any, Counter, Dict, List, Mapping, Optional, Sequence,
                    Tuple)


def first_sentence(caption: str) -> str:
  """Long-CLIP's short caption (docs/method.md §2): newlines become spaces, then
  the text before the first ". " (official train/sharegpt4v.py:
  `caption.replace("\n", " ").split(". ")[0]`)."""
  return caption.replace("\n", " ").split(". ")[0]


def short_caption(caption: str, provided: Optional[str] = None) -> str:
  """The provided short caption when the data has one, else the first sentence."""
  if provided is not None and provided.strip():
    return provided
  return first_sentence(caption)


# ---------------------------------------------------------------------------
# Filters for synthetic (MLLM) captions, docs/method.md §3: FIX-CLIP drops
# "repetitive, meaningless and too-short" captions. The thresholds are our
# decisions; each is a field of CaptionFilterConfig so it can be ablated.
# ---------------------------------------------------------------------------
# Phrases with which chat models decline to describe an image.
DEFAULT_REFUSAL_PATTERNS = (
    r"\bI['’]?m sorry\b",
    r"\bI am sorry\b",
    r"\bI cannot\b",
    r"\bI can['’]?t\b",
    r"\bI['’]?m (?:not )?(?:unable|able) to\b",
    r"\bI am (?:not )?(?:unable|able) to\b",
    r"\bAs an AI\b",
)

# The reason names a filter can return, in the order they are checked.
REASONS = ("empty", "refusal", "too_short", "non_alpha", "long_word",
           "repetitive")

_WORD_RE = re.compile(r"\S+")
_ALPHA_WORD_RE = re.compile(r"[^\W\d_]+")


@dataclasses.dataclass(frozen=True)
class CaptionFilterConfig:
  """Thresholds of the caption filters (a caption failing any is rejected)."""
  min_words: int = 8  # fewer whitespace-separated words -> "too_short"
  ngram: int = 3  # n of the word n-grams counted by the repetition filter
  max_repeated_ngram_ratio: float = 0.3  # above -> "repetitive"
  max_non_alpha_ratio: float = 0.25  # non-letter share of non-space chars
  max_word_length: int = 30  # a longer "word" -> "long_word" (URLs, hashes)
  refusal_patterns: Tuple[str, ...] = DEFAULT_REFUSAL_PATTERNS

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "CaptionFilterConfig":
    """From a dict / ConfigDict; unknown keys raise (they are typos)."""
    values = dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"Unknown caption filter fields {unknown}; known: "
                       f"{sorted(names)}")
    if "refusal_patterns" in values:
      values["refusal_patterns"] = tuple(values["refusal_patterns"])
    return cls(**values)


def filter_thresholds(filters: Optional[CaptionFilterConfig] = None
                      ) -> Dict[str, Any]:
  """The numeric thresholds of `filters` (default: CaptionFilterConfig()).

  The one source of the defaults of `config.data.filters` and of prepare's
  filter flags; the refusal patterns stay code (regexes are no CLI knobs).
  """
  filters = filters or CaptionFilterConfig()
  return {f.name: getattr(filters, f.name)
          for f in dataclasses.fields(filters) if f.name != "refusal_patterns"}


def words(caption: str) -> List[str]:
  """Whitespace-separated words (the unit of the length and n-gram filters)."""
  return _WORD_RE.findall(caption)


def is_too_short(caption: str, min_words: int) -> bool:
  return len(words(caption)) < min_words


def repeated_ngram_ratio(caption: str, n: int = 3) -> float:
  """Share of word n-grams that repeat an earlier one: 1 - unique / total.

  Lowercased letter-only words, so "The cat." and "the cat" count as equal.
  Degenerate MLLM output ("a tree, a tree, a tree...") scores near 1, normal
  prose near 0. Captions with fewer than n words score 0.
  """
  tokens = [w.lower() for w in _ALPHA_WORD_RE.findall(caption)]
  ngrams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  if not ngrams:
    return 0.0
  return 1.0 - len(set(ngrams)) / len(ngrams)


def non_alpha_ratio(caption: str) -> float:
  """Share of non-space characters that are not letters (digits, symbols)."""
  chars = [c for c in caption if not c.isspace()]
  if not chars:
    return 0.0
  return sum(not c.isalpha() for c in chars) / len(chars)


def longest_word_length(caption: str) -> int:
  return max((len(w) for w in words(caption)), default=0)


def is_refusal(caption: str, patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS
               ) -> bool:
  return any(re.search(p, caption, flags=re.IGNORECASE) for p in patterns)


def filter_reason(caption: str, filters: Optional[CaptionFilterConfig] = None
                  ) -> Optional[str]:
  """The name of the first filter (see REASONS) rejecting `caption`, or None."""
  filters = filters or CaptionFilterConfig()
  if not caption or not caption.strip():
    return "empty"
  if is_refusal(caption, filters.refusal_patterns):
    return "refusal"
  if is_too_short(caption, filters.min_words):
    return "too_short"
  if non_alpha_ratio(caption) > filters.max_non_alpha_ratio:
    return "non_alpha"
  if longest_word_length(caption) > filters.max_word_length:
    return "long_word"
  if repeated_ngram_ratio(caption, filters.ngram) > filters.max_repeated_ngram_ratio:
    return "repetitive"
  return None


class CaptionFilter:
  """`filter_reason` with a tally: `f(caption)` -> reason or None.

  `rejections` counts rejected captions per reason, `num_seen` all captions
  checked, so a caller can report what share each filter removed.
  """

  def __init__(self, filters: Optional[CaptionFilterConfig] = None):
    self.filters = filters or CaptionFilterConfig()
    self.rejections: Counter[str] = collections.Counter()
    self.num_seen = 0

  def __call__(self, caption: str) -> Optional[str]:
    reason = filter_reason(caption, self.filters)
    self.num_seen += 1
    if reason is not None:
      self.rejections[reason] += 1
    return reason

  def accepts(self, caption: str) -> bool:
    return self(caption) is None
