"""Synthetic long-caption data where caption length matters by construction.

Each scene has a background (one of a few colours, plain, striped or dotted)
and `num_objects` shapes (circle, square, triangle, star) of distinct colours
and one of three sizes, each in its own cell of a 3x3 grid, described in order
of salience (larger first, then raster order of the cell).

The caption is laid out like a ShareGPT4V caption: a one-sentence global
summary (how many shapes, the background, each shape's colour and kind; no
sizes or places), a paragraph break, then a detailed paragraph that gives
every shape's size, place and relation to the shape described before it. The
summary is the short caption: `caption.replace("\n", " ").split(". ")[0]`
(Long-CLIP's rule, captions.first_sentence).

Late details (docs/method.md §2: what 77 tokens cannot see). Examples come in pairs
(2j, 2j + 1). With probability `late_detail_share` a pair is a *late twin*:
the second scene is the first with the shapes described after the first
EARLY_OBJECTS ones moved to other cells and resized. The two captions then
agree on everything a 77-token text tower reads (the summary, the shared
sentence and the first EARLY_OBJECTS shapes take more than 76 tokens; a test
checks it with CLIP's tokenizer) and differ only later, so only a model that
reads past token 77 can tell the twins apart. Other pairs are independent
scenes, which differ early. `scene["late_twin"]` marks both members of a twin
pair; their short captions are equal (the summary names no places).

Pairs generalise to *families* of `late_family_size` examples (F*j ...
F*j + F - 1; F = 2 is the pairs above, example for example): a twin family is
one scene and F - 1 distinct late twins of it. A random batch of B out of N
examples holds on average (F - 1)(B - 1)/(N - 1) family members of each
example, so only large families put late twins side by side in a shuffled
batch often enough for a contrastive loss to need the late tokens
(tools/ablate.py fine-tunes on them; evaluation keeps pairs).

`make_synthetic_dataset` (and its CLI, data/make_synthetic.py:
`python -m fixclip_jax.data.make_synthetic --num=1000 --dst=/tmp/shapes`)
writes DST/images/000000.png ... and DST/manifest.jsonl (a jsonl source).
Everything is a function of (seed, example index): example i is the same
whatever `num` is. Held-out evaluation sets use another seed
(evaluation/run.py SYNTHETIC_EVAL_SEED).
"""
import io
import json
import os
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw

from fixclip_jax import fileio

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (240, 220, 30), "purple": (140, 50, 170),
    "orange": (245, 140, 20), "pink": (250, 130, 190), "cyan": (40, 210, 220),
}
BACKGROUNDS = {
    "light gray": (205, 205, 205), "beige": (230, 215, 180),
    "dark gray": (65, 65, 65), "white": (250, 250, 250),
}
TEXTURES = ("plain", "striped", "dotted")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.4, "medium": 0.65, "large": 0.95}  # share of a grid cell
# 3x3 grid, raster order: (row, column) -> phrase.
POSITIONS = ("the top left corner", "the top middle", "the top right corner",
             "the middle of the left side", "the center",
             "the middle of the right side", "the bottom left corner",
             "the bottom middle", "the bottom right corner")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh",
            "eighth", "ninth")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine")
SHAPE_DETAILS = {
    "circle": "is perfectly round with a smooth outline",
    "square": "has four equal straight sides and sharp corners",
    "triangle": "points upward with three straight edges",
    "star": "has five sharp points spreading outward",
}
TEXTURE_PHRASES = {
    "plain": "a plain {bg} background",
    "striped": "a {bg} background with thin diagonal stripes",
    "dotted": "a {bg} background covered in small dots",
}
# Shapes described in full before the details that late twins change; with
# the summary and the layout sentence they fill more than 76 CLIP tokens.
EARLY_OBJECTS = 2
# Between the summary and the details, as in ShareGPT4V captions: why the
# short-caption rule turns newlines into spaces before splitting.
PARAGRAPH_BREAK = "\n\n"
# Share of example pairs that are late twins (see the module docstring).
DEFAULT_LATE_DETAIL_SHARE = 0.5


def sample_scene(rng: np.random.Generator, num_objects: int = 4
                 ) -> Dict[str, Any]:
  """Random scene: background, texture, objects in distinct cells/colours."""
  cells = rng.permutation(9)[:num_objects]
  colours = rng.permutation(len(COLOURS))[:num_objects]
  objects = []
  for cell, colour in zip(cells, colours):
    objects.append({
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": list(COLOURS)[int(colour)],
        "size": list(SIZES)[int(rng.integers(len(SIZES)))],
        "cell": int(cell),
    })
  # Salience: larger first, then raster order of the cell.
  size_rank = {s: i for i, s in enumerate(SIZES)}
  objects.sort(key=lambda o: (-size_rank[o["size"]], o["cell"]))
  return {
      "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
      "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
      "objects": objects,
  }


def late_twin(scene: Dict[str, Any], rng: np.random.Generator
              ) -> Dict[str, Any]:
  """`scene` with the shapes after the first EARLY_OBJECTS in new cells and
  sizes (at least one cell changes); colours, kinds and order are kept, so the
  summary and the early sentences of the caption are the same."""
  objects = [dict(o) for o in scene["objects"]]
  late = objects[EARLY_OBJECTS:]
  if not late:
    raise ValueError(f"A late twin needs more than {EARLY_OBJECTS} objects")
  taken = {o["cell"] for o in objects[:EARLY_OBJECTS]}
  free = np.asarray([c for c in range(9) if c not in taken])
  old_cells = [o["cell"] for o in late]
  cells = old_cells
  while cells == old_cells:
    cells = [int(c) for c in rng.permutation(free)[:len(late)]]
  for obj, cell in zip(late, cells):
    obj["cell"] = cell
    obj["size"] = list(SIZES)[int(rng.integers(len(SIZES)))]
  return {**scene, "objects": objects}


def scene_for_index(index: int, seed: int = 0, num_objects: int = 4,
                    late_detail_share: float = DEFAULT_LATE_DETAIL_SHARE,
                    late_family_size: int = 2) -> Dict[str, Any]:
  """The scene of example `index`: its family (index // late_family_size)
  draws a first scene and whether it is a twin family; member k > 0 is the
  k-th distinct late twin of the first scene, or the k-th fresh scene.

  The twin decision is one uniform draw per family compared with
  late_detail_share, so a larger share keeps every twin family of a smaller
  one. With late_family_size 2 a family is a pair (the module docstring).
  """
  if not 0.0 <= late_detail_share <= 1.0:
    raise ValueError(f"late_detail_share={late_detail_share} not in [0, 1]")
  if late_family_size < 2:
    raise ValueError(f"late_family_size={late_family_size} must be at least 2")
  rng = np.random.default_rng([seed, index // late_family_size])
  first = sample_scene(rng, num_objects)
  twins = bool(rng.random() < late_detail_share) and num_objects > EARLY_OBJECTS
  member = index % late_family_size
  scene = first
  if twins:
    seen = [_late_layout(first)]
    while len(seen) <= member:
      for _ in range(1000):  # a few draws unless the family nearly fills all
        scene = late_twin(first, rng)
        if _late_layout(scene) not in seen:
          break
      else:
        raise ValueError(
            f"late_family_size={late_family_size}: {num_objects} shapes do not "
            f"have {member + 1} distinct late layouts")
      seen.append(_late_layout(scene))
  else:
    for _ in range(member):
      scene = sample_scene(rng, num_objects)
  return {**scene, "late_twin": twins}


def _late_layout(scene: Dict[str, Any]) -> Tuple[Tuple[int, str], ...]:
  """What late twins of one scene may differ in: the late shapes' cells and
  sizes."""
  return tuple((o["cell"], o["size"]) for o in scene["objects"][EARLY_OBJECTS:])


def _star_points(cx, cy, r):
  pts = []
  for k in range(10):
    radius = r if k % 2 == 0 else r * 0.45
    angle = -np.pi / 2 + k * np.pi / 5
    pts.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
  return pts


def render_scene(scene: Dict[str, Any], image_size: int) -> Image.Image:
  """Draws the scene on an image_size x image_size RGB canvas."""
  bg = BACKGROUNDS[scene["background"]]
  img = Image.new("RGB", (image_size, image_size), bg)
  draw = ImageDraw.Draw(img)
  # Texture: a shade of the background, so it never looks like an object.
  shade = tuple(int(c * 0.85) if sum(bg) > 380 else min(255, c + 35) for c in bg)
  step = max(4, image_size // 12)
  if scene["texture"] == "striped":
    for x in range(-image_size, image_size, step):
      draw.line([(x, image_size), (x + image_size, 0)], fill=shade, width=1)
  elif scene["texture"] == "dotted":
    for y in range(step // 2, image_size, step):
      for x in range(step // 2, image_size, step):
        draw.point((x, y), fill=shade)
  cell = image_size / 3
  for obj in scene["objects"]:
    row, col = divmod(obj["cell"], 3)
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    r = 0.5 * cell * SIZES[obj["size"]]
    fill = COLOURS[obj["colour"]]
    box = [cx - r, cy - r, cx + r, cy + r]
    if obj["shape"] == "circle":
      draw.ellipse(box, fill=fill)
    elif obj["shape"] == "square":
      draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r],
                     fill=fill)
    elif obj["shape"] == "triangle":
      draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)],
                   fill=fill)
    else:
      draw.polygon(_star_points(cx, cy, r), fill=fill)
  return img


def _relation(obj: Dict[str, Any], ref: Dict[str, Any]) -> str:
  """"above and to the left of the red circle" (grid rows/columns)."""
  (r, c), (rr, rc) = divmod(obj["cell"], 3), divmod(ref["cell"], 3)
  parts = []
  if r != rr:
    parts.append("above" if r < rr else "below")
  if c != rc:
    parts.append("to the left of" if c < rc else "to the right of")
  if len(parts) == 2:
    where = f"{parts[0]} and {parts[1]}"
  else:
    where = parts[0]
  return f"{where} the {ref['colour']} {ref['shape']}"


def _indefinite(phrase: str) -> str:
  """"an orange star", "a red star"."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _name_list(objects: Sequence[Dict[str, Any]]) -> str:
  """"a red circle, an orange star and a green square"."""
  names = [_indefinite(f"{o['colour']} {o['shape']}") for o in objects]
  if len(names) == 1:
    return names[0]
  return ", ".join(names[:-1]) + " and " + names[-1]


def summary_sentence(scene: Dict[str, Any]) -> str:
  """The global one-sentence summary (the short caption), without the period."""
  objs = scene["objects"]
  background = TEXTURE_PHRASES[scene["texture"]].format(bg=scene["background"])
  return (f"A picture of {NUMBER_WORDS[len(objs)]} shapes on {background}: "
          f"{_name_list(objs)}")


def detail_sentences(scene: Dict[str, Any]) -> List[str]:
  """The detailed paragraph, one string per sentence (no periods)."""
  objs = scene["objects"]
  sentences = [f"The {NUMBER_WORDS[len(objs)]} shapes are spread over a three "
               f"by three grid and none of them overlap or touch each other"]
  for k, obj in enumerate(objs):
    where = POSITIONS[obj["cell"]]
    if k:
      where += f", {_relation(obj, objs[k - 1])}"
    sentences.append(f"The {ORDINALS[k]} shape is a {obj['size']} "
                     f"{obj['colour']} {obj['shape']} in {where}")
    sentences.append(
        f"This {obj['colour']} {obj['shape']} {SHAPE_DETAILS[obj['shape']]}")
  return sentences


def describe_scene(scene: Dict[str, Any]) -> str:
  """The long caption: the summary, a paragraph break, the details."""
  return (summary_sentence(scene) + "." + PARAGRAPH_BREAK +
          ". ".join(detail_sentences(scene)) + ".")


def _png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def synthetic_example(index: int, image_size: int = 64, seed: int = 0,
                      num_objects: int = 4,
                      late_detail_share: float = DEFAULT_LATE_DETAIL_SHARE,
                      late_family_size: int = 2) -> Dict[str, Any]:
  """Example `index`: {"image": PNG bytes, "caption", "short_caption", "key",
  "scene"}; a function of (seed, index) only. The short caption is the
  caption's first sentence (the summary)."""
  scene = scene_for_index(index, seed, num_objects, late_detail_share,
                          late_family_size)
  return {
      "image": _png_bytes(render_scene(scene, image_size)),
      "caption": describe_scene(scene),
      "short_caption": summary_sentence(scene),
      "key": f"{index:06d}",
      "scene": scene,
  }


def synthetic_examples(num: int, image_size: int = 64, seed: int = 0,
                       num_objects: int = 4,
                       late_detail_share: float = DEFAULT_LATE_DETAIL_SHARE
                       ) -> List[Dict[str, Any]]:
  """The in-memory dataset (for tests and the "synthetic" source type)."""
  return [synthetic_example(i, image_size, seed, num_objects, late_detail_share)
          for i in range(num)]


def write_manifest_dataset(dst: str, records: Iterable[Tuple[str, bytes, Dict[str, Any]]]
                           ) -> str:
  """Writes DST/<name> image files + DST/manifest.jsonl; returns the manifest.

  records: (relative image name, encoded image bytes, the manifest line's other
  fields). Written through fileio.atomic_directory: DST must not exist yet,
  and is complete or absent.
  """
  with fileio.atomic_directory(dst) as tmp:
    lines = []
    for name, data, fields in records:
      os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
      lines.append(json.dumps({"image": name, **fields}))
    with open(os.path.join(tmp, "manifest.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return os.path.join(fileio.absolute(dst), "manifest.jsonl")


def make_synthetic_dataset(dst: str, num: int, image_size: int = 64,
                           seed: int = 0, num_objects: int = 4,
                           late_detail_share: float = DEFAULT_LATE_DETAIL_SHARE,
                           late_family_size: int = 2) -> str:
  """Writes DST/images/*.png and DST/manifest.jsonl; returns the manifest path.

  DST must not exist yet (see write_manifest_dataset).
  """
  def records():
    for i in range(num):
      ex = synthetic_example(i, image_size, seed, num_objects,
                             late_detail_share, late_family_size)
      yield (os.path.join("images", f"{ex['key']}.png"), ex["image"],
             {"caption": ex["caption"], "short_caption": ex["short_caption"],
              "key": ex["key"], "scene": ex["scene"]})

  return write_manifest_dataset(dst, records())
