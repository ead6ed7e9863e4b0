r"""Which tower tells late twins apart: a probe of trained models.

  python -m fixclip_jax.tools.twin_probe \
      --data=WORKDIR/data/eval_300_share0.5 --runs=RUN_DIR[,RUN_DIR...] \
      [--pairs=40]

On the first `--pairs` late-twin pairs of a synthetic dataset (its manifest's
examples 2j and 2j + 1 with `scene.late_twin`: the same first 77 tokens,
different later details; data/synthetic.py), prints per model (anything
api.load reads):

  text cos    mean (min) cosine between the twins' long-caption embeddings:
              1.0 means the text tower ignores everything after token 77
  image cos   the same for the twins' images
  margin > 0  share of pairs whose matched similarities beat the crossed ones,
              s(a, A) + s(b, B) > s(a, B) + s(b, A) (by more than float
              rounding, MARGIN_TOLERANCE): what R@1 on the pair needs

and, on twice as many scenes of the set (twins or not), whether each tower
sees the cues late twins differ in (their later shapes' sizes and places),
asked of the first shape, whose sentence lies inside the first 77 tokens (so
a CLIP-77 can learn it):

  size text   mean cosine between a scene's caption and the caption of the
              same scene with the first shape's size changed (`OTHER_SIZE`:
              one word); 1.0 = the tower does not see it
  size image  the same for the two scenes' images
  place text  the same with the first shape moved to the first free grid
  / image     cell (its place phrase and the relations naming it change)

RESULTS.md uses it to say why a fine-tune did not learn the late details.
"""
import copy
import json
import os
from typing import Dict, List, Sequence

from absl import flags
import numpy as np
from PIL import Image

from fixclip_jax import api
from fixclip_jax import cli
from fixclip_jax import fileio
from fixclip_jax.data import synthetic
from fixclip_jax.evaluation import datasets

FLAGS = flags.FLAGS
# A 77-token reader's twins tie; their margin is 0 up to float rounding.
MARGIN_TOLERANCE = 1e-6
# The size probe's change: the size most unlike each one (synthetic.SIZES).
OTHER_SIZE = {"small": "large", "medium": "large", "large": "small"}
DETAILS = ("size", "place")


def dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Row-wise dot products of two [N, d] feature arrays: [N]."""
  return np.sum(x * y, axis=-1)


def twin_pairs(data: str, num_pairs: int) -> List[tuple]:
  """The first `num_pairs` late-twin pairs of DATA/manifest.jsonl, as
  ((image path, caption), (image path, caption)): consecutive entries of the
  late-detail benchmark (evaluation/datasets.load_synthetic, "late")."""
  manifest = os.path.join(data, "manifest.jsonl")
  if not fileio.isfile(manifest):
    raise cli.UserError(f"--data={data}: no manifest.jsonl (a folder written by "
                        "data/synthetic.make_synthetic_dataset)")
  try:
    late = datasets.load_synthetic(data, "late")
  except ValueError as e:
    raise cli.UserError(f"{manifest}: no late-twin pairs ({e})") from e
  entries = list(zip(late.image_paths, late.texts))
  return list(zip(entries[0::2], entries[1::2]))[:num_pairs]


def detail_changes(data: str, num_scenes: int, detail: str) -> List[tuple]:
  """(scene, the scene with its first shape's `detail` changed: "size" or
  "place") for the first `num_scenes` records of DATA/manifest.jsonl
  (data/synthetic.py's `scene`)."""
  changes = []
  lines = fileio.read_text(os.path.join(data, "manifest.jsonl")).splitlines()
  for line in lines[:num_scenes]:
    scene = json.loads(line)["scene"]
    changed = copy.deepcopy(scene)
    first = changed["objects"][0]
    if detail == "size":
      first["size"] = OTHER_SIZE[first["size"]]
    else:
      taken = {o["cell"] for o in scene["objects"]}
      first["cell"] = min(set(range(len(synthetic.POSITIONS))) - taken)
    changes.append((scene, changed))
  return changes


def detail_probe(model: api.Model, changes: Sequence[tuple], image_size: int
                 ) -> Dict[str, float]:
  """Mean text and image cosines of each scene and its changed version."""
  def features(side: int):
    scenes = [c[side] for c in changes]
    return (model.encode_image([synthetic.render_scene(s, image_size)
                                for s in scenes]),
            model.encode_text([synthetic.describe_scene(s) for s in scenes]))
  (image_a, text_a), (image_b, text_b) = features(0), features(1)
  return {"text_cos": float(dot(text_a, text_b).mean()),
          "image_cos": float(dot(image_a, image_b).mean())}


def probe(model: api.Model, pairs: Sequence[tuple]) -> Dict[str, float]:
  """Twin cosines of each tower and the pair margins (module docstring)."""
  def features(side: int):
    images = [Image.open(p[side][0]) for p in pairs]
    return (model.encode_image(images),
            model.encode_text([p[side][1] for p in pairs]))
  image_a, text_a = features(0)
  image_b, text_b = features(1)
  text_cos, image_cos = dot(text_a, text_b), dot(image_a, image_b)
  margin = (dot(image_a, text_a) + dot(image_b, text_b)
            - dot(image_a, text_b) - dot(image_b, text_a))
  return {"pairs": len(pairs),
          "text_cos_mean": float(text_cos.mean()),
          "text_cos_min": float(text_cos.min()),
          "image_cos_mean": float(image_cos.mean()),
          "image_cos_min": float(image_cos.min()),
          "margin_positive": float(np.mean(margin > MARGIN_TOLERANCE))}


def markdown(results: Dict[str, Dict[str, float]]) -> str:
  lines = ["| model | pairs | text cos mean (min) | image cos mean (min) | "
           "margin > 0 | size text cos | size image cos | place text cos | "
           "place image cos |", "|---|---|---|---|---|---|---|---|---|"]
  for run, r in results.items():
    lines.append(
        f"| {run} | {r['pairs']} | {r['text_cos_mean']:.4f} "
        f"({r['text_cos_min']:.4f}) | {r['image_cos_mean']:.4f} "
        f"({r['image_cos_min']:.4f}) | {100 * r['margin_positive']:.0f}% | "
        + " | ".join(f"{r[f'{d}_{tower}_cos']:.4f}" for d in DETAILS
                     for tower in ("text", "image")) + " |")
  return "\n".join(lines) + "\n"


def define_flags():
  flags.DEFINE_string("data", None, "A synthetic dataset folder "
                      "(manifest.jsonl with scene.late_twin).")
  flags.DEFINE_list("runs", None, "Models to probe: training workdirs, model "
                    "dirs, checkpoint files (anything api.load reads).")
  flags.DEFINE_integer("pairs", 40, "Late-twin pairs to probe.")
  flags.mark_flags_as_required(["data", "runs"])


def main(argv):
  cli.reject_positional_arguments(argv)
  if FLAGS.pairs < 1:
    raise cli.UserError(f"--pairs={FLAGS.pairs} must be at least 1")
  pairs = twin_pairs(FLAGS.data, FLAGS.pairs)
  changes = {d: detail_changes(FLAGS.data, 2 * FLAGS.pairs, d)
             for d in DETAILS}
  with Image.open(pairs[0][0][0]) as first:    # draw at the set's own size
    image_size = first.size[0]
  results = {}
  for run in FLAGS.runs:
    if not fileio.exists(run):
      raise cli.UserError(f"--runs: {run}: no such file or directory")
    model = api.load(run)
    results[run] = probe(model, pairs)
    for detail in DETAILS:
      for tower, cos in detail_probe(model, changes[detail],
                                     image_size).items():
        results[run][f"{detail}_{tower}"] = cos
  print(markdown(results), end="", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
