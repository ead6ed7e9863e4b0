"""ShareGPT4V's captioner json: its format facts, in one place (docs/method.md §2, §4).

Training (`data.type = "sharegpt4v"`, sources.ShareGPT4VSource), preparation
(`python -m fixclip_jax.data.prepare --src=<the json>`) and evaluation
(evaluation/datasets.py load_sharegpt4v: sharegpt4v_1k / sharegpt4v_10k)
read the file through this module, so they agree on what an entry holds and
which entries are the evaluation split.

  share-captioner_coco_lcs_sam_1246k_1107.json (Lin-Chen/ShareGPT4V on the
  Hugging Face hub, 1,246,901 entries) is ONE JSON list of
    {"id": str, "image": path relative to the data folder,
     "conversations": [{"from": "human", "value": prompt},
                       {"from": "gpt", "value": caption}]}

Long-CLIP (beichenzbc/Long-CLIP, train/sharegpt4v.py at commit 3966af9):
`share4v_val_dataset` reads `json.load(fp)[:1000]` and `share4v_train_dataset`
`json.load(fp)[1000:]`; both take `conversations[1]["value"]` with its
newlines turned into spaces and open `image_root + entry["image"]`, the images
under the json's own folder. So the first EVAL_HOLDOUT = 1,000 entries are the
evaluation split, never trained on (1,245,901 training pairs). LoTLIP and
others evaluate the first 10,000 (sharegpt4v_10k), of which a model trained
after the 1,000 holdout has seen 9,000.

Standard library only: configs (config_base) and the evaluation import it
without the data pipeline.
"""
import array
import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, List, Mapping, Optional

JSON_NAME = "share-captioner_coco_lcs_sam_1246k_1107.json"
EVAL_HOLDOUT = 1000            # Long-CLIP's evaluation split: entries [:1000]
CAPTION_TURN = 1               # conversations[1] (from "gpt") holds the caption
_EVAL_PROTOCOL = "sharegpt4v-first{}"


class FormatError(ValueError):
  """A file or entry that is not in the captioner json's format."""


def eval_protocol(num_examples: int) -> str:
  """The protocol name of the evaluation split of the first N entries."""
  return _EVAL_PROTOCOL.format(num_examples)


def eval_split_size(protocol: str) -> Optional[int]:
  """N for an eval_protocol(N) name, else None."""
  match = re.fullmatch(_EVAL_PROTOCOL.format(r"(\d+)"), protocol)
  return int(match.group(1)) if match else None


def is_captioner_json(path: str) -> bool:
  """A .json file named like the captioner json, or one that holds a JSON
  list (a JSONL manifest's first character is "{")."""
  if os.path.basename(path) == JSON_NAME:
    return True
  if not path.endswith(".json") or not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  return head[:1] == b"["


def load(path: str) -> List[Any]:
  """The json's list of entries; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: ShareGPT4V json not found")
  try:
    with open(path, "r", encoding="utf-8") as f:
      entries = json.load(f)
  except UnicodeDecodeError as e:
    raise FormatError(f"{path}: not UTF-8 text (byte offset {e.start})"
                      ) from None
  except json.JSONDecodeError as e:
    raise FormatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})"
                      ) from None
  if not isinstance(entries, list):
    raise FormatError(f"{path}: should hold one JSON list of entries "
                      "{\"image\", \"conversations\"} (ShareGPT4V's captioner "
                      f"json), found a {type(entries).__name__}")
  return entries


def image_of(entry: Any, where: str) -> str:
  """The entry's image path, relative to the data folder."""
  image = entry.get("image") if isinstance(entry, dict) else None
  if not isinstance(image, str) or not image:
    raise FormatError(f"{where}: field 'image' must be a non-empty path "
                      f"string (found {json.dumps(image)[:80]})")
  return image


def caption_of(entry: Any, where: str) -> str:
  """conversations[1].value with newlines as spaces (Long-CLIP's caption)."""
  conv = entry.get("conversations") if isinstance(entry, dict) else None
  turn = (conv[CAPTION_TURN] if isinstance(conv, list)
          and len(conv) > CAPTION_TURN else None)
  value = turn.get("value") if isinstance(turn, dict) else None
  if not isinstance(value, str):
    raise FormatError(f"{where}: needs a string at "
                      f"conversations[{CAPTION_TURN}].value")
  return value.replace("\n", " ")


def key_of(entry: Any, index: int) -> str:
  """The entry's "id", else its position in the json."""
  key = entry.get("id") if isinstance(entry, dict) else None
  return str(key) if key is not None else f"entry {index}"


class _Strings:
  """Many strings as one UTF-8 blob and offsets: a million captions pickle
  (to grain's worker processes) as two objects, not a million."""

  def __init__(self, values: List[str]):
    encoded = [v.encode("utf-8") for v in values]
    self.offsets = array.array("q", itertools.accumulate(
        (len(b) for b in encoded), initial=0))
    self.blob = b"".join(encoded)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> str:
    return self.blob[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Pairs:
  """The training pairs: the json's entries from `holdout_first` on.

  Pair i is entry holdout_first + i. An entry without a usable image path or
  caption keeps its place, its message in `errors` (a bad record when read).
  """
  path: str
  holdout_first: int
  num_entries: int                  # in the whole json
  images: _Strings
  captions: _Strings
  keys: _Strings
  errors: Mapping[int, str]

  def __len__(self) -> int:
    return len(self.images)

  def entry_index(self, i: int) -> int:
    return self.holdout_first + i


def _read_pairs(path: str, holdout_first: int) -> Pairs:
  entries = load(path)
  if holdout_first >= len(entries):
    raise FormatError(f"{path}: {len(entries)} entries, none left after "
                      f"holding out the first {holdout_first} "
                      "(data.holdout_first / --holdout_first)")
  images, captions, keys, errors = [], [], [], {}
  for i, entry in enumerate(entries[holdout_first:]):
    index = holdout_first + i
    where = f"{path} entry {index}"
    try:
      image, caption = image_of(entry, where), caption_of(entry, where)
    except FormatError as e:
      image, caption, errors[i] = "", "", str(e)
    images.append(image)
    captions.append(caption)
    keys.append(key_of(entry, index))
  del entries
  return Pairs(path, holdout_first, holdout_first + len(images),
               _Strings(images), _Strings(captions), _Strings(keys), errors)


@functools.lru_cache(maxsize=1)
def _cached_pairs(path: str, holdout_first: int, size: int, mtime_ns: int
                  ) -> Pairs:
  del size, mtime_ns  # only in the cache key: a changed file is read again
  return _read_pairs(path, holdout_first)


def read_pairs(path: str, holdout_first: int = EVAL_HOLDOUT) -> Pairs:
  """The json's pairs after its first `holdout_first` entries.

  Parsing the 1.2M-entry json takes a while: the last file read is kept, so
  counting the pairs (main.py, num_train_epochs), the training source and
  the evaluation's overlap check parse it once.
  """
  if holdout_first < 0:
    raise ValueError(f"holdout_first={holdout_first} must be >= 0")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: ShareGPT4V json not found")
  path = os.path.abspath(path)
  st = os.stat(path)
  return _cached_pairs(path, int(holdout_first), st.st_size, st.st_mtime_ns)

