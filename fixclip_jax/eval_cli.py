"""Scores any checkpoint on the standard benchmarks, each result named by its
protocol (docs/method.md §4).

  fixclip-eval --checkpoint=/ckpt/Long-CLIP-B.pt --out=/tmp/eval_longclip_b \\
      --data=urban1k=/data/Urban1k,sharegpt4v_1k=/data/sharegpt4v,dci=/data/dci,\\
coco_karpathy=/data/coco,flickr30k_karpathy=/data/flickr30k
  python -m fixclip_jax.eval_cli --checkpoint=WORKDIR [--step=N] --data=...

--checkpoint is anything `fixclip_jax.load` reads (api.py): our model
directories, a training WORKDIR (its latest step, or --step), OpenAI /
open_clip / Long-CLIP / FIX-CLIP .pt / .safetensors files, Hugging Face
CLIPModel directories.

--data lists NAME=ROOT pairs, NAME a benchmark of evaluation/datasets.py and
ROOT where its files are, in the layout its authors distribute:
  long text   urban1k, sharegpt4v_1k, sharegpt4v_10k, dci (all 7,805 images:
              dci-full-7805), docci (test split)
  short text  coco_karpathy (COCO 5k), flickr30k_karpathy (Flickr 1k);
              Long-CLIP's own protocols: coco_val2017, flickr30k_full (all
              31,783 images)
  zero-shot   imagenet (val/ ImageFolder), cifar10, cifar100 (a TFDS data dir)
  synthetic   synthetic, synthetic_long, synthetic_short, synthetic_long77
              (a fixclip-synthetic folder)

Each benchmark is scored by evaluation/run.py, the code training evaluates
with, and written to --out (eval_results.{json,md} and plots, report.py):
every row names its protocol (split and size), the image size the model saw
and the tokens its texts were cut to; the console shows the table, a line
with those sizes, and the report's path.
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax

from fixclip_jax import api
from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax import sharding
from fixclip_jax.evaluation import datasets
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import clip

# Names run.load_eval_sets reads besides the registries' (both synthetic kinds).
EXTRA_NAMES = ("synthetic",)


def known_names() -> List[str]:
  return sorted(list(datasets.RETRIEVAL_LOADERS) + list(datasets.CLASSIFICATION_LOADERS)
                + list(EXTRA_NAMES))


def parse_data(items: Sequence[str]) -> List[Tuple[str, str]]:
  """--data's NAME=ROOT pairs, checked (a known name, an existing root)."""
  known = {datasets.canonical_name(n): n for n in known_names()}
  pairs = []
  for item in items:
    name, sep, root = item.partition("=")
    name, root = name.strip(), root.strip()
    if not sep or not name or not root:
      raise cli.UserError(f"--data: {item!r} is not NAME=ROOT (e.g. "
                          "urban1k=/data/Urban1k)")
    if datasets.canonical_name(name) not in known:
      raise cli.UserError(f"--data: unknown benchmark {name!r}; known: "
                          f"{', '.join(known_names())}")
    if not fileio.exists(root):
      raise cli.UserError(f"--data: {name}={root}: no such file or folder")
    pairs.append((known[datasets.canonical_name(name)], root))
  if not pairs:
    raise cli.UserError("--data: give at least one NAME=ROOT")
  return pairs


def default_label(checkpoint: str, step: Optional[int] = None) -> str:
  """The report's model name: the checkpoint's file or folder name."""
  name = os.path.basename(os.path.normpath(checkpoint))
  for ext in (".pt", ".pth", ".bin", ".safetensors"):
    if name.endswith(ext):
      name = name[:-len(ext)]
  return name + (f"@{step}" if step is not None else "")


def evaluate_checkpoint(checkpoint: str, data: Sequence[Tuple[str, str]],
                        out: str, *, label: Optional[str] = None,
                        step: Optional[int] = None, tokenizer: Optional[str] = None,
                        batch_size: int = 64) -> List[Dict[str, Any]]:
  """Scores `checkpoint` on each (benchmark, root) of `data`; merges the rows
  into OUT's report and returns them (with model and step)."""
  model = api.load(checkpoint, step=step, tokenizer=tokenizer,
                   batch_size=batch_size)
  label = label or default_label(checkpoint, step)
  config = config_base.base_config()
  config.model_name = label
  config.data.tokenizer = tokenizer or "clip"
  config.eval.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  params = jax.device_put(model.params, sharding.replicated(mesh))
  results = []
  for name, root in data:
    config.eval.datasets, config.eval.root = name, root
    for r in eval_run.evaluate(config, clip.CLIP(model.cfg), params, mesh,
                               model.tokenizer, workdir=out, step=step):
      results.append({"model": label, "step": step, **r})
  return results


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("checkpoint", None, "Model directory, training workdir, "
                      ".pt/.safetensors file or HF CLIPModel directory.")
  flags.DEFINE_integer("step", None, "With a training workdir: this saved "
                       "step instead of the latest.")
  flags.DEFINE_list("data", None, "Benchmarks as NAME=ROOT pairs, e.g. "
                    "urban1k=/data/Urban1k,coco_karpathy=/data/coco.")
  flags.DEFINE_string("out", "fixclip_eval", "Folder of the report "
                      "(eval_results.json/.md, plots); results merge into it.")
  flags.DEFINE_string("name", None, "The model's name in the report "
                      "(default: the checkpoint's file or folder name).")
  flags.DEFINE_integer("batch_size", 64, "Rows per model call.", lower_bound=1)
  flags.DEFINE_string("tokenizer", None, "'clip' or the SentencePiece .model "
                      "the model was trained with (default: a workdir's, else clip).")
  flags.mark_flags_as_required(["checkpoint", "data"])


def main(argv):
  cli.reject_positional_arguments(argv)
  data = parse_data(FLAGS.data)
  label = FLAGS.name or default_label(FLAGS.checkpoint, FLAGS.step)
  print(f"Evaluating {FLAGS.checkpoint} as {label!r} on "
        f"{', '.join(n for n, _ in data)}", flush=True)
  results = evaluate_checkpoint(FLAGS.checkpoint, data, FLAGS.out, label=label,
                                step=FLAGS.step, tokenizer=FLAGS.tokenizer,
                                batch_size=FLAGS.batch_size)
  print(report.console_table(results), end="")
  print(f"Report: {os.path.join(FLAGS.out, report.MARKDOWN_NAME)}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
