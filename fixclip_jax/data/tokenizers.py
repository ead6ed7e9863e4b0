"""Text tokenizers: CLIP's byte-level BPE and SentencePiece, one interface.

Both tokenizers share the interface the data pipeline and evaluation use:

  tok.encode(text) -> list[int]              content ids, no SOT/EOT
  tok(texts, context_length=None) -> int32   [N, context_length] padded batch
  tok.decode(ids) -> str
  tok.vocab_size, tok.context_length, tok.sot_token_id, tok.eot_token_id

`ClipTokenizer` reproduces open_clip's `SimpleTokenizer` / `open_clip.tokenize`
id for id (docs/method.md §1 "Tokenizer"): ftfy `fix_text`, HTML unescape twice,
whitespace collapse, lowercase, CLIP's word regex, byte-to-unicode mapping,
greedy lowest-rank BPE merges from `bpe_simple_vocab_16e6.txt.gz`,
SOT=49406, EOT=49407, padding with 0. A batch row is SOT + ids + EOT; with
`truncate=True` an over-long row is cut to `context_length` and its last kept
token replaced by EOT (open_clip's rule; Long-CLIP uses the same at 248,
docs/method.md §2).

Hugging Face: `ClipTokenizer.save_hf_files` writes files transformers'
CLIPTokenizer / CLIPTokenizerFast load; those skip ftfy and the HTML unescape,
so run `normalize_text` on a text before them to get our ids.

Nothing here imports torch or open_clip, and nothing is ever downloaded: the
vocabulary ships inside the package and is checked against its sha256.
"""
import gzip
import hashlib
import html
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex
import sentencepiece

from fixclip_jax import fileio

DEFAULT_VOCAB_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = (
    "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")

# The merges file has a header line, then merges by rank. CLIP uses the first
# 49152 - 256 - 2 of them so that 256 bytes + 256 bytes-with-</w> + merges
# + SOT + EOT = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
_SOT_TEXT = "<start_of_text>"
_EOT_TEXT = "<end_of_text>"
# The same two tokens as Hugging Face's CLIP vocabularies spell them.
HF_SOT_TEXT = "<|startoftext|>"
HF_EOT_TEXT = "<|endoftext|>"
_END_OF_WORD = "</w>"

# CLIP's word splitter. The special-token strings come first so that a text
# literally containing "<start_of_text>" maps to the SOT id, as in open_clip;
# IGNORECASE is kept too because it changes what the contraction alternatives
# match for case-folding characters (e.g. "'ſ" matches "'s").
_WORD_PATTERN = regex.compile(
    "|".join([regex.escape(_SOT_TEXT), regex.escape(_EOT_TEXT)])
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)

# Cleaned text that is ASCII holds only lowercase letters, digits, single
# spaces and other non-space characters (punctuation; both patterns also put
# any leftover control character in that class); there CLIP's pattern
# reduces to this one, which the
# standard `re` engine runs faster than `regex` runs the Unicode one.
_ASCII_WORD_PATTERN = re.compile(
    "|".join([re.escape(_SOT_TEXT), re.escape(_EOT_TEXT)])
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+""")

# Any character outside printable ASCII + tab + newline, or "&".
_NEEDS_FTFY = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")

# Per-word BPE cache bound: enough for the distinct words of a large caption
# corpus, small enough (a few hundred MB worst case) for a data worker.
_MAX_CACHED_WORDS = 1 << 20

Texts = Union[str, Sequence[str]]


def bytes_to_unicode() -> Dict[int, str]:
  """CLIP/GPT-2's reversible map from the 256 byte values to printable chars.

  Bytes that are already printable, non-space Latin-1 characters map to
  themselves; the remaining 68 bytes (controls, space, soft hyphen, ...) map,
  in increasing byte order, to chr(256), chr(257), ... so that no BPE symbol
  is whitespace or a control character.
  """
  printable = set(range(ord("!"), ord("~") + 1))
  printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
  printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
  table = {}
  next_free = 256
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(next_free)
      next_free += 1
  return table


def _byte_order_symbols() -> List[str]:
  """The 256 byte symbols in the order CLIP numbers them (ids 0..255).

  CLIP lists the printable bytes first (in increasing order), then the
  remapped ones; this is the insertion order of its byte table.
  """
  table = bytes_to_unicode()
  printable = [b for b in range(256) if table[b] == chr(b)]
  remapped = [b for b in range(256) if table[b] != chr(b)]
  return [table[b] for b in printable + remapped]


def clean_text(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, unescape twice, collapse spaces, lower.

  ftfy dominates the cost and is the identity on printable ASCII without "&"
  (tabs and newlines allowed): there is no mojibake, ligature, wide or curly
  character, control character, terminal escape or "\\r" to fix, nothing
  for the HTML unescapes to act on, and ASCII is NFC. Such text skips both.
  The test suite checks this shortcut against ftfy itself.
  """
  if _NEEDS_FTFY.search(text) is None:
    return " ".join(text.split()).lower()
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  # str.split() with no argument also strips, as open_clip's .strip() does.
  return " ".join(text.split()).lower()


def normalize_text(text: str) -> str:
  """Our text normalisation, to run before a Hugging Face CLIP tokenizer.

  Our ids (open_clip's, and those our models were trained on) come from text
  cleaned by `clean_text`: ftfy's fixes (mojibake, curly quotes, ligatures,
  full-width forms, control characters, NFC), HTML entities unescaped twice,
  whitespace collapsed, lower case. transformers' CLIPTokenizer and
  CLIPTokenizerFast only apply NFC, whitespace collapsing and lower case, so on
  text with HTML entities, curly quotes, mojibake etc. their ids differ.

    hf_tokenizer(normalize_text(text))  ->  the ids ClipTokenizer gives

  for the files `ClipTokenizer.save_hf_files` writes (tests/hf_export_test.py
  checks this on a few hundred varied lines).
  """
  return clean_text(text)


def _read_verified(path: str, sha256: Optional[str]) -> bytes:
  """Reads `path`, checking its sha256 when one is expected."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"CLIP BPE vocabulary file not found: {path!r}. It ships with "
        "fixclip_jax/data/; pass vocab_path= to use another copy.")
  with open(path, "rb") as f:
    data = f.read()
  if sha256 is not None:
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
      raise ValueError(
          f"CLIP BPE vocabulary file {path!r} has sha256 {got}, expected "
          f"{sha256} (bpe_simple_vocab_16e6.txt.gz). The file is corrupt or a "
          "different vocabulary; pass vocab_sha256=None to skip the check.")
  return data


def load_bpe_merges(path: str = DEFAULT_VOCAB_PATH,
                    sha256: Optional[str] = VOCAB_SHA256
                    ) -> List[Tuple[str, str]]:
  """The first 48894 merges of a CLIP merges file, in rank order."""
  data = _read_verified(path, sha256)
  try:
    lines = gzip.decompress(data).decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"Cannot read CLIP BPE vocabulary {path!r}: {e}") from e
  merges = []
  for line_number, line in enumerate(lines[1:_NUM_MERGES + 1], start=2):
    pair = tuple(line.split())
    if len(pair) != 2:
      raise ValueError(
          f"CLIP BPE vocabulary {path!r} line {line_number}: expected two "
          f"symbols, got {line!r}")
    merges.append(pair)
  if len(merges) != _NUM_MERGES:
    raise ValueError(
        f"CLIP BPE vocabulary {path!r} has {len(merges)} merges, "
        f"expected {_NUM_MERGES}")
  return merges


def _check_context_length(context_length: int) -> int:
  if not isinstance(context_length, (int, np.integer)) or context_length < 2:
    raise ValueError(
        f"context_length must be an int >= 2 (room for SOT and EOT), got "
        f"{context_length!r}")
  return int(context_length)


def _as_text_list(texts: Texts) -> List[str]:
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(
          f"text {index} is a {type(text).__name__}, expected str: {text!r}")
  return texts


def pack_batch(token_lists: Sequence[Sequence[int]], context_length: int,
               truncate: bool, pad_id: int = 0,
               bos_id: Optional[int] = None,
               eos_id: Optional[int] = None) -> np.ndarray:
  """Packs content ids into a padded int32 [N, context_length] batch.

  Row i is [bos] + token_lists[i] + [eos] followed by `pad_id` (bos/eos left
  out when None). An over-long row is cut to `context_length` and, when there
  is an eos, its last kept token is replaced by eos (open_clip's rule). With
  truncate=False an over-long row raises ValueError naming its index.

  The copy is vectorised: the kept ids of all rows are concatenated once and
  written with a single boolean-mask assignment (row-major order matches the
  concatenation order) instead of one numpy slice per row.
  """
  n = len(token_lists)
  head = 0 if bos_id is None else 1
  tail = 0 if eos_id is None else 1
  lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64,
                        count=n)                                     # [N]
  too_long = lengths + head + tail > context_length
  if too_long.any() and not truncate:
    index = int(np.argmax(too_long))
    raise ValueError(
        f"text {index} has {int(lengths[index]) + head + tail} tokens "
        f"(including special tokens), more than context_length="
        f"{context_length}; use truncate=True to cut it")

  # Content slots; when a row is cut, the slot after them holds eos.
  room = context_length - head - tail
  kept = np.minimum(lengths, room)                                   # [N]
  flat = []
  for tokens in token_lists:
    flat += tokens[:room]
  batch = np.full((n, context_length), pad_id, dtype=np.int32)
  filled = np.arange(room)[None, :] < kept[:, None]                 # [N, room]
  batch[:, head:head + room][filled] = flat
  if bos_id is not None:
    batch[:, 0] = bos_id
  if eos_id is not None:
    batch[np.arange(n), kept + head] = eos_id
  return batch


def eot_positions(tokens: np.ndarray, eot_token_id: int) -> np.ndarray:
  """Index of the first `eot_token_id` in each row of int [..., L] tokens.

  For CLIP's BPE this equals `argmax(tokens, -1)` (EOT is the largest id),
  which is how the text tower pools. Tokenizers whose end token is not the
  largest id (SentencePiece) need this instead. Rows without the token give 0.
  """
  return np.argmax(np.asarray(tokens) == eot_token_id, axis=-1)


class ClipTokenizer:
  """CLIP's byte-level BPE tokenizer, id-identical to open_clip's.

  Attributes:
    context_length: default batch length (77 for CLIP, 248 for Long-CLIP).
    truncate: cut over-long texts (last kept token becomes EOT) or raise.
    sot_token_id, eot_token_id: 49406, 49407.
    pad_token_id: 0 (open_clip pads with 0, which is also the id of "!").
    vocab_size: 49408.
  """

  def __init__(self, vocab_path: Optional[str] = None,
               context_length: int = 77, truncate: bool = True, *,
               vocab_sha256: Optional[str] = VOCAB_SHA256):
    """Loads the merges.

    Args:
      vocab_path: merges file; defaults to the copy inside this package.
      context_length: default length of `__call__` rows.
      truncate: see class docstring.
      vocab_sha256: expected sha256 of the file; None skips the check (for a
        deliberately different vocabulary).
    """
    self.vocab_path = vocab_path or DEFAULT_VOCAB_PATH
    self.context_length = _check_context_length(context_length)
    self.truncate = truncate
    merges = load_bpe_merges(self.vocab_path, vocab_sha256)

    byte_symbols = _byte_order_symbols()
    symbols = (byte_symbols + [s + _END_OF_WORD for s in byte_symbols]
               + [a + b for a, b in merges] + [_SOT_TEXT, _EOT_TEXT])
    self._symbol_to_id = {s: i for i, s in enumerate(symbols)}
    self._id_to_symbol = symbols
    self._merges = merges
    self._merge_rank = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_to_char = bytes_to_unicode()
    self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
    self.sot_token_id = self._symbol_to_id[_SOT_TEXT]
    self.eot_token_id = self._symbol_to_id[_EOT_TEXT]
    self.pad_token_id = 0
    self.vocab_size = len(symbols)
    # Raw regex word -> ids. Seeded with the special-token strings, which
    # open_clip maps to their ids without BPE.
    self._word_cache: Dict[str, Tuple[int, ...]] = {
        _SOT_TEXT: (self.sot_token_id,), _EOT_TEXT: (self.eot_token_id,)}

  def save_hf_files(self, directory: str) -> None:
    """Writes Hugging Face tokenizer files for this vocabulary and context:
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json,
    loadable by transformers' `CLIPTokenizer` and `CLIPTokenizerFast` (and
    diffusion pipelines that take our text encoder, docs/method.md §3).

    The special tokens get HF's names (<|startoftext|>, <|endoftext|>, as in
    OpenAI's HF checkpoints); rows are padded with <|endoftext|>, as Stable
    Diffusion's tokenizers do. HF's tokenizers skip ftfy and the HTML
    unescape: feed them `normalize_text(text)` to get our ids on any text.
    """
    names = {_SOT_TEXT: HF_SOT_TEXT, _EOT_TEXT: HF_EOT_TEXT}
    vocab = {names.get(s, s): i for s, i in self._symbol_to_id.items()}
    special = {"bos_token": HF_SOT_TEXT, "eos_token": HF_EOT_TEXT,
               "unk_token": HF_EOT_TEXT, "pad_token": HF_EOT_TEXT}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
        "do_lower_case": True, "add_prefix_space": False, "errors": "replace",
        **special}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
    }
    for name, text in files.items():
      fileio.atomic_write(os.path.join(directory, name), text)

  def _bpe(self, symbols: List[str]) -> List[str]:
    """Applies merges lowest rank first until none applies.

    Each round finds the adjacent pair with the lowest merge rank and merges
    every non-overlapping occurrence of it, scanning left to right.
    """
    ranks = self._merge_rank
    while len(symbols) > 1:
      best_rank, best_pair = None, None
      for pair in zip(symbols, symbols[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best_pair = rank, pair
      if best_pair is None:
        break
      first, second = best_pair
      merged = []
      i = 0
      while i < len(symbols):
        if (i + 1 < len(symbols) and symbols[i] == first
            and symbols[i + 1] == second):
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids(self, word: str) -> Tuple[int, ...]:
    """BPE ids of one regex word (cached)."""
    ids = self._word_cache.get(word)
    if ids is None:
      chars = [self._byte_to_char[b] for b in word.encode("utf-8")]
      chars[-1] += _END_OF_WORD
      ids = tuple(self._symbol_to_id[s] for s in self._bpe(chars))
      if len(self._word_cache) >= _MAX_CACHED_WORDS:
        self.clear_cache()
      self._word_cache[word] = ids
    return ids

  def clear_cache(self) -> None:
    """Forgets cached BPE results (keeps the special-token entries)."""
    self._word_cache = {
        _SOT_TEXT: (self.sot_token_id,), _EOT_TEXT: (self.eot_token_id,)}

  def encode(self, text: str) -> List[int]:
    """BPE ids of `text` after CLIP's cleaning, without SOT/EOT."""
    text = clean_text(text)
    pattern = _ASCII_WORD_PATTERN if text.isascii() else _WORD_PATTERN
    # The hot loop: a dict hit per word; BPE only on a cache miss.
    cached = self._word_cache.get
    ids = []
    for word in pattern.findall(text):
      word_ids = cached(word)
      if word_ids is None:
        word_ids = self._word_ids(word)
      ids += word_ids
    return ids

  def __call__(self, texts: Texts,
               context_length: Optional[int] = None) -> np.ndarray:
    """int32 [N, context_length]: SOT + ids + EOT, padded with 0.

    A single string gives N=1, as in open_clip.
    """
    context_length = _check_context_length(
        context_length or self.context_length)
    token_lists = [self.encode(t) for t in _as_text_list(texts)]
    return pack_batch(token_lists, context_length, self.truncate,
                      pad_id=self.pad_token_id, bos_id=self.sot_token_id,
                      eos_id=self.eot_token_id)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True
             ) -> str:
    """Text of `ids`, decoded as open_clip's `SimpleTokenizer.decode`.

    Every end-of-word marker becomes a space, so the text ends with one.
    With `skip_special_tokens` (default) a leading SOT is dropped and
    decoding stops at the first EOT, so a padded batch row decodes to its
    caption; otherwise SOT/EOT/padding are spelled out as open_clip does.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if skip_special_tokens:
      if ids and ids[0] == self.sot_token_id:
        ids = ids[1:]
      if self.eot_token_id in ids:
        ids = ids[:ids.index(self.eot_token_id)]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
    text = "".join(self._id_to_symbol[i] for i in ids)
    # Special-token text is plain ASCII, so every char maps back to a byte.
    raw = bytes(self._char_to_byte[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")


class SentencePieceTokenizer:
  """A SentencePiece model behind the same interface as `ClipTokenizer`.

  Rows are [bos] + ids + [eos] padded with the model's pad id (0 when the
  model has none). Truncation replaces the last kept token with eos, as for
  CLIP, so an over-long text still ends with eos.

  How to use one with our text tower: the tower pools at `argmax(ids)`, which
  finds CLIP's EOT only because EOT (49407) is the largest id. SentencePiece
  reserves its control ids (pad/unk/bos/eos) at the *start* of the vocabulary
  (the trainer requires them to be contiguous from 0), so eos is a small id
  and `argmax` would pick the largest content token instead. Keep
  `add_eos=True` so every row ends with eos, and pool at
  `eot_positions(tokens, tok.eot_token_id)` (first eos), not at argmax.
  """

  def __init__(self, model_path: str, context_length: int = 77,
               truncate: bool = True, add_bos: bool = False,
               add_eos: bool = True):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"SentencePiece model file not found: {model_path!r}")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(model_path)
    except (OSError, RuntimeError) as e:
      raise ValueError(
          f"Cannot load SentencePiece model {model_path!r}: {e}") from e
    self.model_path = model_path
    self.context_length = _check_context_length(context_length)
    self.truncate = truncate
    self.add_bos = add_bos
    self.add_eos = add_eos
    self.vocab_size = self._sp.GetPieceSize()
    bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    if add_bos and bos < 0:
      raise ValueError(
          f"add_bos=True but SentencePiece model {model_path!r} has no bos id")
    if add_eos and eos < 0:
      raise ValueError(
          f"add_eos=True but SentencePiece model {model_path!r} has no eos id")
    self.sot_token_id = bos if bos >= 0 else None
    self.eot_token_id = eos if eos >= 0 else None
    self.pad_token_id = pad if pad >= 0 else 0

  def encode(self, text: str) -> List[int]:
    """Piece ids of `text`, without bos/eos."""
    return self._sp.EncodeAsIds(text)

  def __call__(self, texts: Texts,
               context_length: Optional[int] = None) -> np.ndarray:
    """int32 [N, context_length]: [bos] + ids + [eos], padded with pad id."""
    context_length = _check_context_length(
        context_length or self.context_length)
    token_lists = self._sp.EncodeAsIds(_as_text_list(texts))
    return pack_batch(
        token_lists, context_length, self.truncate, pad_id=self.pad_token_id,
        bos_id=self.sot_token_id if self.add_bos else None,
        eos_id=self.eot_token_id if self.add_eos else None)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; stops at the first eos, control ids are dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eot_token_id is not None and self.eot_token_id in ids:
      ids = ids[:ids.index(self.eot_token_id)]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
    return self._sp.DecodeIds(ids)


Tokenizer = Union[ClipTokenizer, SentencePieceTokenizer]
SENTENCEPIECE_SUFFIX = ".model"


def get_tokenizer(name: str = "clip", context_length: int = 77,
                  truncate: bool = True) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names.

  Args:
    name: "clip" (CLIP's BPE, the vocabulary inside this package) or the path
      of a SentencePiece `.model` file.
    context_length: 77 for CLIP, 248 for Long-CLIP / FIX-CLIP.
    truncate: cut over-long texts (last kept token is EOT) instead of raising.
  """
  if name == "clip":
    return ClipTokenizer(context_length=context_length, truncate=truncate)
  if isinstance(name, str) and name.endswith(SENTENCEPIECE_SUFFIX):
    return SentencePieceTokenizer(name, context_length=context_length,
                                  truncate=truncate)
  raise ValueError(
      f"config.data.tokenizer={name!r}: expected 'clip' or the path of a "
      f"SentencePiece {SENTENCEPIECE_SUFFIX} file")


def check_model_compatible(tokenizer: Tokenizer, vocab_size: int,
                           eot_token_id: Optional[int], where: str) -> None:
  """ValueError naming `where` unless a text tower with this `vocab_size` and
  `eot_token_id` (CLIPConfig fields) embeds every id of `tokenizer` and pools
  at its end token.

  eot_token_id None pools at argmax(ids), which is the end token only when it
  is the tokenizer's largest id (CLIP's BPE; not SentencePiece's eos).
  """
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model "
        f"embeds {vocab_size} (model vocab_size)")
  if eot_token_id is None:
    if tokenizer.eot_token_id != tokenizer.vocab_size - 1:
      raise ValueError(
          f"{where}: the model pools at argmax(ids) (model eot_token_id None), "
          f"but the tokenizer's end token {tokenizer.eot_token_id} is not its "
          f"largest id; set model eot_token_id={tokenizer.eot_token_id}")
  elif eot_token_id != tokenizer.eot_token_id:
    raise ValueError(
        f"{where}: model eot_token_id={eot_token_id} but the tokenizer ends "
        f"texts with {tokenizer.eot_token_id}")


# ----------------------------------------------------------------------------
# Texts longer than the context: counted when cut, or embedded in windows.

def special_ids(tokenizer: Tokenizer) -> Tuple[Optional[int], Optional[int]]:
  """(start id, end id) the tokenizer puts around each row; None where it
  puts none (SentencePiece without add_bos / add_eos)."""
  bos = tokenizer.sot_token_id if getattr(tokenizer, "add_bos", True) else None
  eos = tokenizer.eot_token_id if getattr(tokenizer, "add_eos", True) else None
  return bos, eos


def tokenize_counting_cuts(tokenizer: Tokenizer, texts: Texts,
                           context_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """(int32 [N, C] rows, exactly `tokenizer(texts, C)`; bool [N]: the texts
  that did not fit and were cut, their last kept id the end token).

  One tokenisation: rows are packed one slot longer; a token in that slot
  means the text needs more than C, and the row is cut as pack_batch cuts.
  """
  rows = np.asarray(tokenizer(texts, context_length + 1), np.int32)  # [N, C+1]
  _, eos = special_ids(tokenizer)
  last = rows[:, context_length]
  cut = last == eos if eos is not None else last != tokenizer.pad_token_id
  rows = rows[:, :context_length].copy()                            # [N, C]
  if eos is not None:
    rows[cut, -1] = eos
  return rows, cut


def context_windows(tokenizer: Tokenizer, text: str,
                    context_length: int) -> np.ndarray:
  """int32 [W, C]: the text's ids in consecutive windows, each packed as a
  row (start and end tokens around C minus those ids). A text that fits
  gives one window, the row `tokenizer(text, C)` gives."""
  bos, eos = special_ids(tokenizer)
  room = context_length - (bos is not None) - (eos is not None)
  if room < 1:
    raise ValueError(f"context_length={context_length} leaves no room for "
                     "text between the start and end tokens")
  ids = tokenizer.encode(text)
  parts = [ids[i:i + room] for i in range(0, len(ids), room)] or [[]]
  return pack_batch(parts, context_length, truncate=False,
                    pad_id=tokenizer.pad_token_id, bos_id=bos, eos_id=eos)
