"""Writes a synthetic late-detail dataset (data/synthetic.py) to disk.

  python -m fixclip_jax.data.make_synthetic --num=1000 --dst=/tmp/shapes
  fixclip-synthetic --num=1000 --dst=/tmp/shapes --late_family_size=64

writes DST/images/000000.png ... and DST/manifest.jsonl (a jsonl source:
`config.data.type = "jsonl"`, `config.data.path = DST/manifest.jsonl`).
"""
from typing import Sequence

from absl import app
from absl import flags

from fixclip_jax import cli
from fixclip_jax.data import synthetic

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("num", 1000, "Number of examples.")
  flags.DEFINE_string("dst", None, "Output folder (must not exist).")
  flags.DEFINE_integer("image_size", 64, "Side of the square images.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("num_objects", 4, "Shapes per scene (2..9; late twins "
                       f"need more than {synthetic.EARLY_OBJECTS}).")
  flags.DEFINE_float("late_detail_share", synthetic.DEFAULT_LATE_DETAIL_SHARE,
                     "Share of example pairs (families) that differ only "
                     "after token 77.")
  flags.DEFINE_integer("late_family_size", 2, "Examples per family: a twin "
                       "family is a scene and its distinct late twins.")


def main(argv: Sequence[str]) -> None:
  cli.reject_positional_arguments(argv)
  if not FLAGS.dst:
    raise app.UsageError("--dst is required")
  if not 2 <= FLAGS.num_objects <= 9:
    raise app.UsageError("--num_objects must be in 2..9")
  if not 0.0 <= FLAGS.late_detail_share <= 1.0:
    raise app.UsageError("--late_detail_share must be in [0, 1]")
  if FLAGS.late_family_size < 2:
    raise app.UsageError("--late_family_size must be at least 2")
  path = synthetic.make_synthetic_dataset(
      FLAGS.dst, FLAGS.num, FLAGS.image_size, FLAGS.seed, FLAGS.num_objects,
      FLAGS.late_detail_share, FLAGS.late_family_size)
  print(f"Wrote {FLAGS.num} examples: {path}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
