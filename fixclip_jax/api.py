"""The Python API: a model from any checkpoint, its features, similarities.

  import fixclip_jax
  model = fixclip_jax.load("/ckpt/fixclip_b16")    # any source loader.py reads
  images = model.encode_image(["cat.jpg", pil_image, uint8_array])  # [N, d]
  texts = model.encode_text(["a long description of a cat ...", "a dog"])
  scores = fixclip_jax.similarity(images, texts)  # [N, M] cosine similarities
  probs = model.zero_shot(["cat.jpg"], ["cat", "dog"])  # [1, 2] class probabilities

`load` reads what `loader.load_any` reads: our model directories, a training
WORKDIR (its latest step, or `step=`), OpenAI / open_clip / Long-CLIP /
FIX-CLIP `.pt` / `.safetensors` files, Hugging Face `CLIPModel` directories.
The model carries its tokenizer (CLIP's BPE at the checkpoint's context, 77 or
248 tokens) and its preprocessing (bicubic resize, centre crop, CLIP
mean/std: docs/method.md §1).

Texts longer than the context (`encode_text(texts, long_text=...)`):
  "truncate" (default)  cut to the context, the last kept token the end token
                        (open_clip's and Long-CLIP's rule); a warning line
                        says how many texts were cut.
  "chunks"              the text's tokens in consecutive windows of the
                        context (each with its start and end token), each
                        window embedded and L2-normalised, the mean of the
                        windows normalised again. A text that fits is one
                        window: the same features as "truncate".

Features are L2-normalised float32 numpy arrays. Each tower is jitted once
per architecture (models/encoders.py) and always runs on `batch_size` rows (the last batch is padded), so
later calls reuse the compiled function.
"""
import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import numpy as np
from PIL import Image

from fixclip_jax import checkpoint
from fixclip_jax import fileio
from fixclip_jax import loader
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.evaluation import retrieval
from fixclip_jax.models import clip
from fixclip_jax.models import encoders
from fixclip_jax.models import layers
from fixclip_jax.models.sizes import CLIPConfig

# A single image or a batch: paths, PIL images, uint8 [H, W, 3] arrays (raw
# images), float32 [S, S, 3] arrays (already `preprocess`ed), or a 4-D array.
ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
DEFAULT_TEMPLATES = ("a photo of a {}.",)
LONG_TEXT_MODES = ("truncate", "chunks")


def check_long_text(long_text: str) -> str:
  if long_text not in LONG_TEXT_MODES:
    raise ValueError(f"long_text={long_text!r}: expected one of {LONG_TEXT_MODES}")
  return long_text


def tower_fns(cfg: CLIPConfig) -> tuple:
  """Jitted (params, pixels [B,S,S,3]) -> [B,d] and (params, tokens [B,C]) ->
  [B,d], L2-normalised: encoders.tower_fns, shared by every model of this
  architecture (and with evaluation), so each compiles once per process."""
  return encoders.tower_fns(clip.CLIP(cfg))


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N, M] cosine similarities of normalised features a [N, d], b [M, d]."""
  return np.asarray(a, np.float32) @ np.asarray(b, np.float32).T


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _as_list(items, single_types) -> list:
  """One item -> [item]; a sequence (or a 4-D array of images) -> a list."""
  if isinstance(items, np.ndarray):
    return list(items) if items.ndim == 4 else [items]
  if isinstance(items, single_types):
    return [items]
  return list(items)


@dataclasses.dataclass
class Model:
  """A loaded model: parameters, architecture, tokenizer, jitted towers."""
  params: Any
  cfg: CLIPConfig
  tokenizer: tokenizers.Tokenizer
  batch_size: int = 32
  source: str = ""
  format: str = ""

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    tokenizers.check_model_compatible(self.tokenizer, self.cfg.vocab_size,
                                      self.cfg.eot_token_id, self.source or "model")
    self.params = jax.device_put(self.params)
    self._image_fn, self._text_fn = tower_fns(self.cfg)

  @property
  def image_size(self) -> int:
    return self.cfg.image_size

  @property
  def context_length(self) -> int:
    return self.cfg.context_length

  @property
  def logit_scale(self) -> float:
    """exp(logit_scale): the multiplier of cosine similarities in CLIP's logits."""
    return float(np.exp(np.asarray(jax.device_get(self.params["logit_scale"]))))

  # --- Inputs.

  def preprocess(self, image: ImageLike) -> np.ndarray:
    """One image -> [S, S, 3] float32 pixels (CLIP's eval transform).

    Paths, encoded bytes, PIL images and uint8 [H, W, 3] arrays are decoded
    and transformed; a float array is taken as already preprocessed.
    """
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
      want = (self.image_size, self.image_size, 3)
      if image.shape != want:
        raise ValueError(f"a float image array must be preprocessed pixels of "
                         f"shape {want}, got {image.shape} (pass uint8 arrays "
                         "for raw images)")
      return image.astype(np.float32)
    if isinstance(image, Image.Image):
      return transforms.clip_eval_transform(image, self.image_size)
    if isinstance(image, os.PathLike):
      image = os.fspath(image)
    if isinstance(image, str) and not os.path.isfile(image):
      raise FileNotFoundError(f"No such image file: {image}")
    return retrieval.load_pixels(image, self.image_size)

  def tokenize(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
    """int32 [N, context_length] ids; longer texts are cut (last id EOT)."""
    return np.asarray(self.tokenizer(_as_list(texts, str)), np.int32)

  def tokenize_counting_cuts(self, texts: Sequence[str]) -> np.ndarray:
    """`tokenize`, with one warning line when texts were cut."""
    tokens, cut = tokenizers.tokenize_counting_cuts(
        self.tokenizer, list(texts), self.context_length)
    warn_cut(int(cut.sum()), len(texts), self.context_length)
    return tokens

  def text_windows(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(int32 [W, C] the texts' context windows, int [W] the text of each)."""
    windows = [tokenizers.context_windows(self.tokenizer, t, self.context_length)
               for t in texts]
    owner = np.repeat(np.arange(len(texts)), [len(w) for w in windows])
    return np.concatenate(windows), owner

  # --- Features.

  def _run(self, fn: Callable, rows: np.ndarray) -> np.ndarray:
    """fn on fixed-size batches of rows (padded at the end): [N, d]."""
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      batch = retrieval.pad_rows(chunk, self.batch_size)
      out.append(np.asarray(fn(self.params, batch))[:len(chunk)])
    if not out:
      return np.zeros((0, self.cfg.embed_dim), np.float32)
    return np.concatenate(out).astype(np.float32)

  def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
    """Features of preprocessed pixels [N, S, S, 3]: [N, d]."""
    return self._run(self._image_fn, np.asarray(pixels, np.float32))

  def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """Features of token ids [N, context_length]: [N, d]."""
    return self._run(self._text_fn, np.asarray(tokens, np.int32))

  def encode_image(self, images: Union[ImageLike, Sequence[ImageLike]],
                   num_threads: int = 8) -> np.ndarray:
    """Normalised features [N, d] of one image or a list (see `preprocess`);
    files are decoded on `num_threads` threads."""
    items = _as_list(images, (str, bytes, os.PathLike, Image.Image))
    if not items:
      return np.zeros((0, self.cfg.embed_dim), np.float32)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      pixels = np.stack(list(pool.map(self.preprocess, items)))
    return self.encode_pixels(pixels)

  def encode_text(self, texts: Union[str, Sequence[str]],
                  long_text: str = "truncate") -> np.ndarray:
    """Normalised features [N, d] of one text or a list; texts longer than
    the context are cut ("truncate", with a warning line saying how many) or
    embedded whole ("chunks": the normalised mean of their context windows,
    see the module docstring)."""
    check_long_text(long_text)
    texts = _as_list(texts, str)
    if not texts:
      return np.zeros((0, self.cfg.embed_dim), np.float32)
    if long_text == "truncate":
      return self.encode_tokens(self.tokenize_counting_cuts(texts))
    windows, owner = self.text_windows(texts)
    return mean_of_windows(self.encode_tokens(windows), owner, len(texts))

  def class_embeddings(self, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """[C, d]: each class's normalised mean over its prompts (CLIP's ensembling)."""
    for t in templates:
      if "{}" not in t:
        raise ValueError(f"template {t!r} has no '{{}}' for the class name")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = self.encode_text(texts).reshape(len(class_names), len(templates), -1)
    return layers.normalize(emb.mean(axis=1), xp=np)

  def zero_shot(self, images: Union[ImageLike, Sequence[ImageLike]],
                class_names: Sequence[str],
                templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """[N, C] class probabilities: softmax of logit_scale x cosine similarity."""
    if not class_names:
      raise ValueError("zero_shot needs at least one class name")
    logits = self.logit_scale * similarity(
        self.encode_image(images), self.class_embeddings(class_names, templates))
    return _softmax(logits)


def warn_cut(num_cut: int, num_texts: int, context_length: int) -> None:
  """One warning line when texts were cut to the context."""
  if num_cut:
    logging.warning(
        "%d of %d texts are longer than the model's %d-token context and were "
        "cut to it; long_text=\"chunks\" (fixclip-embed --long_text=chunks) "
        "embeds them whole, as the mean of their %d-token windows",
        num_cut, num_texts, context_length, context_length)


def mean_of_windows(features: np.ndarray, owner: np.ndarray,
                    num_texts: int) -> np.ndarray:
  """[N, d]: per text, the normalised mean of its windows' normalised
  features [W, d] (owner [W]: the text of each window)."""
  sums = np.zeros((num_texts, features.shape[-1]), np.float32)
  np.add.at(sums, owner, layers.normalize(features, xp=np))
  counts = np.bincount(owner, minlength=num_texts)[:, None]
  return layers.normalize(sums / counts, xp=np)


def _workdir_tokenizer(path: str) -> Optional[str]:
  """config.data.tokenizer of a training WORKDIR (its config.json), if any."""
  config_file = fileio.path(path) / "config.json"
  if not checkpoint.is_train_workdir(path) or not fileio.isfile(config_file):
    return None
  try:
    return json.loads(fileio.read_text(config_file))["data"]["tokenizer"]
  except (ValueError, KeyError, TypeError):
    return None


def saved_steps(workdir: str) -> List[int]:
  """The steps of a training WORKDIR's saved train states, ascending."""
  root = fileio.path(workdir) / checkpoint.TRAIN_CHECKPOINT_SUBDIR
  if not fileio.isdir(root):
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def load_params(path: str, step: Optional[int] = None):
  """(params, CLIPConfig, format) of any checkpoint; `step` picks a training
  WORKDIR's saved step instead of its latest."""
  if step is not None:
    if not checkpoint.is_train_workdir(path):
      raise ValueError(f"step={step} needs a training workdir; {path} is not one "
                       "(no model_config.json + checkpoints/)")
    saved = saved_steps(path)
    if step not in saved:
      raise FileNotFoundError(f"{path}: no saved step {step} (saved steps: "
                              f"{saved or 'none'})")
    params, cfg = checkpoint.load_train_params(path, step)
    return params, cfg, "train_workdir"
  if not fileio.exists(path):
    raise FileNotFoundError(f"No such checkpoint: {path}")
  return loader.load_any(path)


def load(path: str, *, step: Optional[int] = None,
         tokenizer: Optional[str] = None, batch_size: int = 32) -> Model:
  """A Model from any checkpoint `loader.load_any` reads.

  Args:
    path: model directory, training WORKDIR, .pt/.safetensors file or HF
      CLIPModel directory.
    step: a training WORKDIR's step (default: its latest).
    tokenizer: "clip" or a SentencePiece .model path; default: the WORKDIR's
      config.data.tokenizer, else "clip".
    batch_size: rows per compiled call.
  """
  params, cfg, fmt = load_params(path, step)
  name = tokenizer or _workdir_tokenizer(path) or "clip"
  tok = tokenizers.get_tokenizer(name, context_length=cfg.context_length)
  return Model(params=params, cfg=cfg, tokenizer=tok, batch_size=batch_size,
               source=f"{path} with tokenizer {name}", format=fmt)
