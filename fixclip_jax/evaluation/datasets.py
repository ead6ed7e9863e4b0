"""Evaluation datasets, read in the layout their authors distribute (docs/method.md §4).

Retrieval benchmarks become a `RetrievalDataset`: a list of image paths, a list
of captions, and the pairing between them (every caption belongs to exactly one
image; an image may have several captions). Each loader takes the directory the
user downloaded the benchmark to and names the protocol it implements, so a
number is never quoted without its protocol.

Layouts (root = the path the user gives; a loader also accepts the parent of
the benchmark's own top folder where one exists, e.g. `.../data` for
`.../data/Urban1k`):

  urban1k           Urban1k/image/<stem>.jpg + Urban1k/caption/<stem>.txt; the
                    caption is the file's first line (Long-CLIP's eval reads
                    `readlines()[0]`). 1000 pairs.
  sharegpt4v_1k/10k share-captioner_coco_lcs_sam_1246k_1107.json: a list of
                    {"image": relative path, "conversations": [{..}, {"value":
                    caption}]}; the first N entries (Long-CLIP holds out the
                    first 1000; LoTLIP evaluates the first 10k). Newlines in a
                    caption become spaces, as in Long-CLIP. Images under
                    `image_root` (default: root).
  dci               densely_captioned_images/{splits.json, annotations/*.json,
                    photos/}: splits.json maps split -> annotation file names;
                    each annotation has "image", "short_caption",
                    "extra_caption". ASSUMPTION (from the public Long-CLIP /
                    FIX-CLIP style DCI retrieval code, not the DCI paper): the
                    long text is f"{short_caption}\\n{extra_caption}" and all
                    splits are used (7,805 images; protocol dci-full-7805);
                    `splits=` narrows it (dci-<splits>-<images>).
  docci             docci_descriptions.jsonlines (the released name;
                    descriptions.jsonlines also accepted) with "image_file",
                    "description", "split"; images in images/. Split "test"
                    (5,000 images).
  coco_karpathy     dataset_coco.json (Karpathy): images with "filepath",
                    "filename", "split", "sentences"[{"raw"}]; split "test",
                    first 5 captions per image (5,000 x 5).
  coco_val2017      annotations/captions_val2017.json + val2017/: images sorted
                    by id (torchvision CocoCaptions order), the first 5
                    captions per image in file order (Long-CLIP's protocol).
  flickr30k_karpathy dataset_flickr30k.json (Karpathy), split "test" (1,000 x
                    5); images in flickr30k-images/.
  flickr30k_full    results_20130124.token, lines `IMG.jpg#k<TAB>caption`; all
                    31,783 images x 5 captions (Long-CLIP's protocol); images
                    in flickr30k-images/.
  synthetic_long/short  a JSONL manifest of {"image", "caption",
                    "short_caption"} (this project's synthetic generator);
                    "long" pairs images with `caption`, "short" with
                    `short_caption` (first sentence when missing).
  synthetic_long77  the long captions cut to 77 tokens (end token kept): what
                    a 77-token CLIP reads, scored with any model.

Zero-shot classification datasets become a `ClassificationDataset`: ImageNet
val as an ImageFolder (`val/<wnid or index>/*.JPEG`) or TFDS `imagenet2012`,
CIFAR-10/100 through `tfds.data_source` from a prepared TFDS data dir.
"""
import collections
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from fixclip_jax.data import captions as captions_lib
from fixclip_jax.data import sharegpt4v
from fixclip_jax.evaluation import imagenet_classes

SHAREGPT4V_JSON = sharegpt4v.JSON_NAME
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class DatasetLayoutError(FileNotFoundError):
  """The files on disk are not in the layout the benchmark is distributed in."""


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
  """Images and captions with their pairing.

  text_to_image  [T] int32: the image of each caption.
  image_to_texts [I] lists: the captions of each image (inverse of the above).
  pairs_found    (image, caption) pairs the benchmark's files hold, those that
                 could not be scored included (a caption whose image is
                 missing, an image without a caption); None = all are scored.
  """
  name: str
  protocol: str
  image_paths: List[str]
  texts: List[str]
  text_to_image: np.ndarray
  image_to_texts: List[List[int]]
  # Texts are cut to this many tokens instead of the model's context (a
  # protocol that shows what a shorter-context model would read); None = the
  # model's context.
  text_context: Optional[int] = None
  pairs_found: Optional[int] = None

  def __post_init__(self):
    t2i = np.asarray(self.text_to_image)
    if t2i.shape != (len(self.texts),):
      raise ValueError(f"{self.name}: text_to_image has shape {t2i.shape}, "
                       f"expected ({len(self.texts)},)")
    if len(self.image_to_texts) != len(self.image_paths):
      raise ValueError(f"{self.name}: {len(self.image_to_texts)} caption lists "
                       f"for {len(self.image_paths)} images")
    if not self.image_paths or not self.texts:
      raise ValueError(f"{self.name} ({self.protocol}): no images or captions")

  @property
  def num_images(self) -> int:
    return len(self.image_paths)

  @property
  def num_texts(self) -> int:
    return len(self.texts)

  @property
  def pair_counts(self) -> Dict[str, int]:
    """{"pairs_scored", "pairs_found"} for the report."""
    found = self.num_texts if self.pairs_found is None else self.pairs_found
    return {"pairs_scored": self.num_texts, "pairs_found": found}


def from_groups(name: str, protocol: str, image_paths: Sequence[str],
                captions_per_image: Sequence[Sequence[str]]) -> RetrievalDataset:
  """Builds the dataset from one list of captions per image (captions kept in order)."""
  texts, t2i, i2t = [], [], []
  for image_index, caps in enumerate(captions_per_image):
    if not caps:
      raise ValueError(f"{name}: image {image_paths[image_index]} has no caption")
    i2t.append(list(range(len(texts), len(texts) + len(caps))))
    texts.extend(caps)
    t2i.extend([image_index] * len(caps))
  return RetrievalDataset(name, protocol, list(image_paths), texts,
                          np.asarray(t2i, np.int32), i2t)


# ----------------------------------------------------------------- file checks


def _expect_file(path: str, dataset: str, what: str) -> str:
  if not os.path.isfile(path):
    raise DatasetLayoutError(f"{dataset}: expected {what} at {path} (not found)")
  return path


def _expect_dir(path: str, dataset: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DatasetLayoutError(
        f"{dataset}: expected {what} directory at {path} (not found)")
  return path


def _benchmark_dir(root: str, top: str, marker: str) -> str:
  """`root` itself or `root/top`, whichever holds `marker` (file or folder)."""
  for cand in (os.path.join(root, top), root):
    if os.path.exists(os.path.join(cand, marker)):
      return cand
  raise DatasetLayoutError(
      f"{top}: expected {os.path.join(root, top, marker)} or "
      f"{os.path.join(root, marker)} (neither found)")


def read_text(path: str, dataset: str) -> str:
  """A UTF-8 text file; ValueError naming the file, line and byte otherwise."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{dataset}: {path} is not UTF-8 text (line {line}, byte "
                     f"{data[e.start:e.start + 1]!r} at offset {e.start}); "
                     "re-save it as UTF-8") from None


def _load_json(path: str, dataset: str, what: str) -> Any:
  _expect_file(path, dataset, what)
  try:
    return json.loads(read_text(path, dataset))
  except json.JSONDecodeError as e:
    raise ValueError(f"{dataset}: {path} is not valid JSON: {e}") from e


def _read_jsonl(path: str, dataset: str) -> List[dict]:
  rows = []
  for line_no, line in enumerate(read_text(path, dataset).splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{dataset}: {path}:{line_no} is not JSON: {e}") from e
  return rows


def _listed(names: Sequence[str], most: int = 5) -> str:
  shown = ", ".join(names[:most])
  return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def warn_unpaired(dataset: str, scored: int, captions_without_image: Sequence[str],
                  images_without_caption: Sequence[str] = (),
                  unscored: Optional[int] = None) -> int:
  """One warning listing what cannot be scored; returns the pairs found:
  scored + unscored (default: one pair per unpaired caption or image).
  Nothing is logged when everything pairs up."""
  if unscored is None:
    unscored = len(captions_without_image) + len(images_without_caption)
  found = scored + unscored
  parts = []
  if captions_without_image:
    parts.append(f"{len(captions_without_image)} caption(s) without an image "
                 f"({_listed(list(captions_without_image))})")
  if images_without_caption:
    parts.append(f"{len(images_without_caption)} image(s) without a caption "
                 f"({_listed(list(images_without_caption))})")
  if parts:
    logging.warning("%s: %s; scoring %d of the %d pairs found", dataset,
                    " and ".join(parts), scored, found)
  return found


def from_existing(name: str, protocol: str, paths: Sequence[str],
                  caps: Sequence[Sequence[str]]) -> RetrievalDataset:
  """from_groups of the images that exist; the captions of missing ones are
  listed in one warning and counted in pairs_found. No image existing is a
  layout error (a wrong root, most likely)."""
  exists = [os.path.isfile(p) for p in paths]
  if paths and not any(exists):
    raise DatasetLayoutError(f"{name}: expected image at {paths[0]} (not "
                             f"found; none of the {len(paths)} images exist: "
                             "wrong root?)")
  missing = [p for p, e in zip(paths, exists) if not e]
  unscored = sum(len(c) for c, e in zip(caps, exists) if not e)
  ds = from_groups(name, protocol, [p for p, e in zip(paths, exists) if e],
                   [c for c, e in zip(caps, exists) if e])
  found = warn_unpaired(name, ds.num_texts, missing, unscored=unscored)
  return dataclasses.replace(ds, pairs_found=found)


def _field(record: dict, key: str, dataset: str, where: str) -> Any:
  if not isinstance(record, dict) or key not in record:
    raise KeyError(f"{dataset}: {where} has no field {key!r}")
  return record[key]


# ------------------------------------------------------------------ retrieval


def load_urban1k(root: str) -> RetrievalDataset:
  """Urban1k: image/<stem>.jpg and caption/<stem>.txt, caption = first line.

  Captions without an image and images without a caption are left out, with
  one warning listing them; the dataset records the pairs found.
  """
  base = _benchmark_dir(root, "Urban1k", "caption")
  caption_dir = _expect_dir(os.path.join(base, "caption"), "urban1k", "caption")
  image_dir = _expect_dir(os.path.join(base, "image"), "urban1k", "image")
  names = sorted(n for n in os.listdir(caption_dir) if n.endswith(".txt"))
  if not names:
    raise DatasetLayoutError(f"urban1k: no *.txt captions in {caption_dir}")
  images = sorted(n for n in os.listdir(image_dir) if n.endswith(".jpg"))
  stems = {n[:-len(".txt")] for n in names}
  paths, caps, no_image = [], [], []
  for name in names:
    image_path = os.path.join(image_dir, name[:-len(".txt")] + ".jpg")
    if not os.path.isfile(image_path):
      no_image.append(name)
      continue
    caption_path = os.path.join(caption_dir, name)
    lines = read_text(caption_path, "urban1k").splitlines()
    if not lines or not lines[0].strip():
      raise ValueError(f"urban1k: caption file {caption_path} has an empty "
                       "first line")
    paths.append(image_path)
    caps.append([lines[0].strip()])
  if not paths:
    raise DatasetLayoutError(
        f"urban1k: no caption in {caption_dir} has its image (<stem>.jpg) in "
        f"{image_dir}; e.g. {os.path.join(image_dir, no_image[0][:-4])}.jpg "
        "is missing")
  no_caption = [n for n in images if n[:-len(".jpg")] not in stems]
  found = warn_unpaired("urban1k", len(paths), no_image, no_caption)
  return dataclasses.replace(from_groups("urban1k", "urban1k", paths, caps),
                             pairs_found=found)


def load_sharegpt4v(root: str, num_examples: int = sharegpt4v.EVAL_HOLDOUT,
                    image_root: Optional[str] = None,
                    json_name: str = SHAREGPT4V_JSON) -> RetrievalDataset:
  """The first `num_examples` pairs of ShareGPT4V's captioner json (its
  format and the 1,000 held out of training: data/sharegpt4v.py)."""
  path = root if os.path.isfile(root) else os.path.join(root, json_name)
  _expect_file(path, "sharegpt4v", f"the ShareGPT4V json {json_name}")
  try:
    entries = sharegpt4v.load(path)
  except sharegpt4v.FormatError as e:
    raise ValueError(f"sharegpt4v: {e}") from None
  if len(entries) < num_examples:
    raise ValueError(f"sharegpt4v: {path} has {len(entries)} entries, "
                     f"fewer than the {num_examples} asked for")
  image_root = image_root or os.path.dirname(path)
  paths, caps = [], []
  for i, e in enumerate(entries[:num_examples]):
    where = f"sharegpt4v: {path} entry {i}"
    paths.append(os.path.join(image_root, sharegpt4v.image_of(e, where)))
    caps.append([sharegpt4v.caption_of(e, where)])
  n = f"{num_examples // 1000}k" if num_examples % 1000 == 0 else str(num_examples)
  return from_existing(f"sharegpt4v-{n}", sharegpt4v.eval_protocol(num_examples),
                       paths, caps)


def load_dci(root: str, splits: Optional[Sequence[str]] = None) -> RetrievalDataset:
  """DCI long-caption retrieval: short_caption + newline + extra_caption."""
  base = _benchmark_dir(root, "densely_captioned_images", "splits.json")
  split_map = _load_json(os.path.join(base, "splits.json"), "dci", "splits.json")
  if not isinstance(split_map, dict):
    raise ValueError(f"dci: {base}/splits.json should map split -> file list")
  chosen = list(split_map) if splits is None else list(splits)
  anno_dir = _expect_dir(os.path.join(base, "annotations"), "dci", "annotations")
  photo_dir = _expect_dir(os.path.join(base, "photos"), "dci", "photos")
  paths, caps = [], []
  for split in chosen:
    if split not in split_map:
      raise KeyError(f"dci: split {split!r} not in {base}/splits.json "
                     f"(has {sorted(split_map)})")
    for anno_name in split_map[split]:
      anno_path = os.path.join(anno_dir, anno_name)
      anno = _load_json(anno_path, "dci", f"annotation {anno_name}")
      short = _field(anno, "short_caption", "dci", anno_path)
      extra = _field(anno, "extra_caption", "dci", anno_path)
      paths.append(os.path.join(photo_dir, _field(anno, "image", "dci", anno_path)))
      caps.append([f"{short}\n{extra}"])
  # Named by split and size: "DCI" numbers differ between papers by subset.
  which = "full" if splits is None else "+".join(chosen)
  ds = from_existing("dci", "dci", paths, caps)
  return dataclasses.replace(ds, protocol=f"dci-{which}-{ds.num_images}")


def load_docci(root: str, split: str = "test") -> RetrievalDataset:
  """DOCCI: one long description per image of the chosen split."""
  names = ("docci_descriptions.jsonlines", "descriptions.jsonlines")
  found = [os.path.join(root, n) for n in names
           if os.path.isfile(os.path.join(root, n))]
  if not found:
    raise DatasetLayoutError(
        f"docci: expected {os.path.join(root, names[0])} (or {names[1]})")
  image_dir = _expect_dir(os.path.join(root, "images"), "docci", "images")
  paths, caps = [], []
  for i, row in enumerate(_read_jsonl(found[0], "docci")):
    where = f"{found[0]} line {i + 1}"
    if _field(row, "split", "docci", where) != split:
      continue
    paths.append(os.path.join(image_dir, _field(row, "image_file", "docci", where)))
    caps.append([_field(row, "description", "docci", where)])
  if not paths:
    raise ValueError(f"docci: no rows with split == {split!r} in {found[0]}")
  return from_existing("docci", f"docci-{split}", paths, caps)


def _karpathy(path: str, dataset: str, image_root: str, split: str,
              captions_per_image: Optional[int], use_filepath: bool):
  data = _load_json(path, dataset, f"the Karpathy split {os.path.basename(path)}")
  images = _field(data, "images", dataset, path)
  paths, caps = [], []
  for i, im in enumerate(images):
    where = f"{path} images[{i}]"
    if _field(im, "split", dataset, where) != split:
      continue
    sub = im.get("filepath", "") if use_filepath else ""
    paths.append(os.path.join(image_root, sub, _field(im, "filename", dataset, where)))
    raw = [s["raw"].strip() for s in _field(im, "sentences", dataset, where)]
    if captions_per_image is not None:
      if len(raw) < captions_per_image:
        raise ValueError(f"{dataset}: {where} has {len(raw)} captions, fewer "
                         f"than {captions_per_image}")
      raw = raw[:captions_per_image]
    caps.append(raw)
  if not paths:
    raise ValueError(f"{dataset}: no images with split == {split!r} in {path}")
  return paths, caps


def load_coco_karpathy(root: str, split: str = "test",
                       captions_per_image: Optional[int] = 5,
                       image_root: Optional[str] = None) -> RetrievalDataset:
  """COCO Karpathy split: root/dataset_coco.json, images at root/<filepath>/<filename>."""
  path = os.path.join(root, "dataset_coco.json")
  paths, caps = _karpathy(path, "coco", image_root or root, split,
                          captions_per_image, use_filepath=True)
  return from_existing("coco", f"coco-karpathy-{split}-{len(paths)}", paths,
                       caps)


def load_coco_val2017(root: str, captions_per_image: int = 5) -> RetrievalDataset:
  """COCO val2017, first 5 captions per image (Long-CLIP's protocol)."""
  path = os.path.join(root, "annotations", "captions_val2017.json")
  data = _load_json(path, "coco", "annotations/captions_val2017.json")
  image_dir = _expect_dir(os.path.join(root, "val2017"), "coco", "val2017 image")
  by_image = collections.defaultdict(list)
  for a in _field(data, "annotations", "coco", path):
    by_image[a["image_id"]].append(a["caption"].strip())
  files = {im["id"]: im["file_name"] for im in _field(data, "images", "coco", path)}
  paths, caps = [], []
  for image_id in sorted(files):
    found = by_image.get(image_id, [])
    if len(found) < captions_per_image:
      raise ValueError(f"coco: image {image_id} in {path} has {len(found)} "
                       f"captions, fewer than {captions_per_image}")
    paths.append(os.path.join(image_dir, files[image_id]))
    caps.append(found[:captions_per_image])
  return from_existing("coco", f"coco-val2017-{len(paths)}", paths, caps)


def load_flickr30k_karpathy(root: str, split: str = "test",
                            captions_per_image: Optional[int] = 5,
                            image_dir: str = "flickr30k-images"
                            ) -> RetrievalDataset:
  """Flickr30k Karpathy split: root/dataset_flickr30k.json + root/flickr30k-images/."""
  path = os.path.join(root, "dataset_flickr30k.json")
  images = _expect_dir(os.path.join(root, image_dir), "flickr30k", "image")
  paths, caps = _karpathy(path, "flickr30k", images, split, captions_per_image,
                          use_filepath=False)
  return from_existing("flickr30k", f"flickr30k-karpathy-{split}-{len(paths)}",
                     paths, caps)


def load_flickr30k_full(root: str, image_dir: str = "flickr30k-images",
                        token_file: str = "results_20130124.token"
                        ) -> RetrievalDataset:
  """All Flickr30k images with their 5 captions (Long-CLIP's protocol)."""
  path = _expect_file(os.path.join(root, token_file), "flickr30k",
                      "the caption file " + token_file)
  images = _expect_dir(os.path.join(root, image_dir), "flickr30k", "image")
  by_image: Dict[str, List[str]] = {}  # insertion order = file order
  for line_no, line in enumerate(read_text(path, "flickr30k").splitlines(), 1):
    if not line.strip():
      continue
    key, sep, caption = line.partition("\t")
    name, hash_, _ = key.partition("#")
    if not sep or not hash_:
      raise ValueError(f"flickr30k: {path}:{line_no} is not "
                       f"'IMAGE.jpg#k<TAB>caption': {line[:80]!r}")
    by_image.setdefault(name, []).append(caption.strip())
  paths = [os.path.join(images, n) for n in by_image]
  return from_existing("flickr30k", f"flickr30k-full-{len(paths)}", paths,
                       list(by_image.values()))


# Captions of the synthetic protocols: which -> (caption field, token context).
# "late": the long captions of the late-twin scenes only (data/synthetic.py),
# so every pair differs only after token 77: a 77-token model tells at most
# one scene of each pair apart (R@1 <= 50%); the late-detail benchmark.
SYNTHETIC_CAPTIONS = {"long": ("long", None), "short": ("short", None),
                      "long77": ("long", 77), "late": ("long", None)}


def load_synthetic(root: str, which: str = "long",
                   manifest: str = "manifest.jsonl",
                   image_root: Optional[str] = None) -> RetrievalDataset:
  """The synthetic generator's JSONL manifest; `which` picks long or short
  captions, long captions cut to 77 tokens ("long77"), or the late twins'
  long captions ("late")."""
  if which not in SYNTHETIC_CAPTIONS:
    raise ValueError(f"synthetic: which must be one of "
                     f"{sorted(SYNTHETIC_CAPTIONS)}, got {which!r}")
  kind, text_context = SYNTHETIC_CAPTIONS[which]
  path = root if os.path.isfile(root) else os.path.join(root, manifest)
  _expect_file(path, "synthetic", "the JSONL manifest")
  image_root = image_root or os.path.dirname(path)
  paths, caps = [], []
  for i, row in enumerate(_read_jsonl(path, "synthetic")):
    where = f"{path} line {i + 1}"
    if which == "late" and not row.get("scene", {}).get("late_twin"):
      continue
    long_caption = _field(row, "caption", "synthetic", where)
    text = (long_caption if kind == "long" else
            captions_lib.short_caption(long_caption, row.get("short_caption")))
    paths.append(os.path.join(image_root, _field(row, "image", "synthetic", where)))
    caps.append([text])
  if not paths:
    raise ValueError(f"synthetic: {path} has no rows"
                     + (" with scene.late_twin" if which == "late" else ""))
  ds = from_existing("synthetic", f"synthetic-{which}", paths, caps)
  return dataclasses.replace(ds, text_context=text_context)


RETRIEVAL_LOADERS: Dict[str, Callable[..., RetrievalDataset]] = {
    "urban1k": load_urban1k,
    "sharegpt4v_1k": functools.partial(load_sharegpt4v, num_examples=1000),
    "sharegpt4v_10k": functools.partial(load_sharegpt4v, num_examples=10000),
    "dci": load_dci,
    "docci": load_docci,
    "coco_karpathy": load_coco_karpathy,
    "coco_val2017": load_coco_val2017,
    "flickr30k_karpathy": load_flickr30k_karpathy,
    "flickr30k_full": load_flickr30k_full,
    "synthetic_long": functools.partial(load_synthetic, which="long"),
    "synthetic_short": functools.partial(load_synthetic, which="short"),
    "synthetic_long77": functools.partial(load_synthetic, which="long77"),
    "synthetic_late": functools.partial(load_synthetic, which="late"),
}


def canonical_name(name: str) -> str:
  """How a dataset name is matched, in both registries: case, spaces, "-" and
  "_" do not count ("CIFAR-10", "cifar_10" and "cifar10" are one name)."""
  return re.sub(r"[\s_-]+", "", name.lower())


def _registry_key(name: str, registry: Dict[str, Any]) -> Optional[str]:
  """The key of `registry` that `name` means, or None."""
  by_canonical = {canonical_name(key): key for key in registry}
  return by_canonical.get(canonical_name(name))


def is_classification(name: str) -> bool:
  """Whether `name` is a zero-shot classification dataset (else retrieval)."""
  return _registry_key(name, CLASSIFICATION_LOADERS) is not None


def _loader(name: str, registry: Dict[str, Callable], kind: str) -> Callable:
  """registry's loader for `name`; KeyError naming the known ones."""
  key = _registry_key(name, registry)
  if key is None:
    raise KeyError(f"Unknown {kind} dataset {name!r}; known: {sorted(registry)}")
  return registry[key]


def load_dataset(name: str, root: str, **kwargs) -> RetrievalDataset:
  """Registry entry point: `load_dataset("urban1k", "/data/Urban1k")`."""
  return _loader(name, RETRIEVAL_LOADERS, "retrieval")(root, **kwargs)


# ------------------------------------------------------------- classification


@dataclasses.dataclass(frozen=True)
class ClassificationDataset:
  """`read(i) -> (image, label)`; image is a file path or a uint8 HWC array."""
  name: str
  class_names: Tuple[str, ...]
  size: int
  read: Callable[[int], Tuple[Any, int]]

  def __len__(self) -> int:
    return self.size


def _class_dir_order(names: List[str]) -> List[str]:
  """Sorted class folders; numeric folder names sort as numbers (0, 1, 2, .. 10)."""
  if all(n.isdigit() for n in names):
    return sorted(names, key=int)
  return sorted(names)


def load_image_folder(root: str, class_names: Optional[Sequence[str]] = None,
                      name: str = "imagenet") -> ClassificationDataset:
  """ImageFolder layout `root/<class>/*.JPEG`, classes in sorted order.

  With 1000 classes and no `class_names`, OpenAI's ImageNet names are used:
  their order is that of sorted WordNet ids (or of indices 0..999).
  """
  _expect_dir(root, name, "class-folder root")
  dirs = _class_dir_order([d for d in os.listdir(root)
                           if os.path.isdir(os.path.join(root, d))])
  if class_names is None:
    if len(dirs) != len(imagenet_classes.IMAGENET_CLASSNAMES):
      raise DatasetLayoutError(
          f"{name}: expected 1000 class folders under {root} for ImageNet, "
          f"found {len(dirs)}; pass class_names for another dataset")
    class_names = imagenet_classes.IMAGENET_CLASSNAMES
  if len(class_names) != len(dirs):
    raise ValueError(f"{name}: {len(class_names)} class names for {len(dirs)} "
                     f"class folders under {root}")
  paths, labels = [], []
  for label, d in enumerate(dirs):
    files = sorted(f for f in os.listdir(os.path.join(root, d))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(os.path.join(root, d, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise DatasetLayoutError(f"{name}: no images under {root}/<class>/")
  labels_arr = np.asarray(labels, np.int32)
  return ClassificationDataset(name, tuple(class_names), len(paths),
                               lambda i: (paths[i], int(labels_arr[i])))


def load_tfds_classification(tfds_name: str, data_dir: Optional[str],
                             split: str = "test",
                             class_names: Optional[Sequence[str]] = None,
                             name: Optional[str] = None) -> ClassificationDataset:
  """A prepared TFDS dataset (ArrayRecord) read with random access, no download."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # optional: tfds only
  try:
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as e:  # tfds raises several kinds for "not there"
    raise DatasetLayoutError(
        f"{tfds_name}: expected a prepared TFDS dataset in ArrayRecord format "
        f"under {os.path.join(str(data_dir), tfds_name)} (build it with `tfds "
        f"build {tfds_name} --data_dir={data_dir} --file_format=array_record` "
        f"where the data is); tfds said: {e}") from e
  if class_names is None:
    label = tfds.builder(tfds_name, data_dir=data_dir).info.features["label"]
    class_names = [n.replace("_", " ") for n in label.names]

  def read(i):
    ex = source[i]
    return np.asarray(ex["image"]), int(ex["label"])

  return ClassificationDataset(name or tfds_name, tuple(class_names),
                               len(source), read)


def load_imagenet(root: str, source: str = "folder",
                  split: str = "validation") -> ClassificationDataset:
  """ImageNet val: `root` = the val/ ImageFolder, or a TFDS data dir."""
  if source == "folder":
    return load_image_folder(root, name="imagenet")
  if source == "tfds":
    return load_tfds_classification(
        "imagenet2012", root, split=split,
        class_names=imagenet_classes.IMAGENET_CLASSNAMES, name="imagenet")
  raise ValueError(f"imagenet: source must be 'folder' or 'tfds', got {source!r}")


# CIFAR-10's label order (batches.meta.txt); CIFAR-100's names come from TFDS.
CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                      "frog", "horse", "ship", "truck")

CLASSIFICATION_LOADERS: Dict[str, Callable[..., ClassificationDataset]] = {
    "imagenet": load_imagenet,
    "cifar10": functools.partial(load_tfds_classification, "cifar10",
                                 class_names=CIFAR10_CLASSNAMES, name="cifar10"),
    "cifar100": functools.partial(load_tfds_classification, "cifar100",
                                  name="cifar100"),
}


def load_classification(name: str, root: str, **kwargs) -> ClassificationDataset:
  """Registry entry point: `load_classification("cifar10", tfds_data_dir)`."""
  return _loader(name, CLASSIFICATION_LOADERS, "classification")(root, **kwargs)
