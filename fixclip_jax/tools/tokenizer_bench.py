r"""Tokenizer throughput: captions/s of ClipTokenizer, cold and warm BPE cache.

Tokenises N synthetic ~120-word captions (Zipf-distributed words, so the
cache sees a realistic mix of frequent and rare words) at Long-CLIP's context
248. "cold" is a fresh tokenizer's first pass (every word goes through BPE
once); "warm" is a second pass over the same captions (BPE fully cached:
cost is cleaning, regex split, cache look-ups and packing); "warm, new" is a
pass over unseen captions from the same distribution, the steady state of an
input pipeline. open_clip's SimpleTokenizer is timed in the same run when it
is importable, so the ratio is measured on the same machine and load.

  python -m fixclip_jax.tools.tokenizer_bench --num_captions=10000
"""
import random
import time
from typing import Callable, Dict, List, Sequence

from absl import flags
import numpy as np

from fixclip_jax import cli
from fixclip_jax.data import tokenizers

_SYLLABLES = ("ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu "
              "na ne ni no nu ra re ri ro ru sa se si so su ta te ti to tu "
              "str ph th ing ed er ly tion").split()
_COMMON = ("a the of in on with and is are to at near its their this image "
           "shows photo picture background foreground left right red blue "
           "green white black small large wooden standing sitting holding "
           "wearing . , 's").split()


def synthetic_captions(num_captions: int, words_per_caption: int,
                       seed: int = 0, vocab_size: int = 30000,
                       unicode: bool = False) -> List[str]:
  """Captions of Zipf-distributed pseudo-words mixed with common words."""
  rng = random.Random(seed)
  vocab = list(dict.fromkeys(
      "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
      for _ in range(vocab_size)))
  weights = 1.0 / np.arange(1, len(vocab) + 1)
  np_rng = np.random.default_rng(seed)
  captions = []
  for _ in range(num_captions):
    ranks = np_rng.choice(len(vocab), size=words_per_caption,
                          p=weights / weights.sum())
    words = [rng.choice(_COMMON) if rng.random() < 0.4 else vocab[r]
             for r in ranks]
    words[0] = words[0].capitalize()
    if unicode:
      words[rng.randrange(len(words))] = rng.choice(
          ["caf\u00e9", "\u201cquoted\u201d", "na\u00efve", "\u2019s"])
    captions.append(" ".join(words) + ".")
  return captions


def _rate(fn: Callable[[Sequence[str]], object],
          captions: Sequence[str]) -> float:
  start = time.perf_counter()
  fn(captions)
  return len(captions) / (time.perf_counter() - start)


def measure(make_tokenizer: Callable[[], Callable], captions: Sequence[str],
            new_captions: Sequence[str], context_length: int,
            repeats: int = 1) -> Dict[str, float]:
  """Best captions/s over fresh tokenizers: cold, warm (same), warm (new)."""
  best = {"cold": 0.0, "warm": 0.0, "warm_new": 0.0}
  for _ in range(repeats):
    tok = make_tokenizer()
    call = lambda texts: tok(list(texts), context_length=context_length)  # pylint: disable=cell-var-from-loop
    rates = {"cold": _rate(call, captions), "warm": _rate(call, captions),
             "warm_new": _rate(call, new_captions)}
    best = {k: max(best[k], rates[k]) for k in best}
  return best


def run(num_captions: int = 10000, words_per_caption: int = 120,
        context_length: int = 248, seed: int = 0,
        compare_open_clip: bool = True, repeats: int = 3,
        unicode: bool = False) -> Dict[str, Dict[str, float]]:
  """Returns {implementation: {cold, warm, warm_new}} in captions/s."""
  captions = synthetic_captions(2 * num_captions, words_per_caption, seed,
                                unicode=unicode)
  captions, new_captions = captions[:num_captions], captions[num_captions:]
  results = {"fixclip_jax ClipTokenizer": measure(
      tokenizers.ClipTokenizer, captions, new_captions, context_length,
      repeats)}
  if compare_open_clip:
    try:
      from open_clip import tokenizer as open_clip_tokenizer  # pylint: disable=g-import-not-at-top  # optional: comparison only
    except ImportError:
      print("open_clip not importable; skipping the comparison")
    else:
      results["open_clip SimpleTokenizer"] = measure(
          open_clip_tokenizer.SimpleTokenizer, captions, new_captions,
          context_length, repeats)
  return results


def format_table(results: Dict[str, Dict[str, float]]) -> str:
  header = (f"{'implementation':<28} {'cold':>10} {'warm':>10} "
            f"{'warm, new':>10}   (captions/s)")
  lines = [header, "-" * len(header)]
  for name, rates in results.items():
    lines.append(f"{name:<28} {rates['cold']:>10.0f} {rates['warm']:>10.0f} "
                 f"{rates['warm_new']:>10.0f}")
  ours = results.get("fixclip_jax ClipTokenizer")
  theirs = results.get("open_clip SimpleTokenizer")
  if ours and theirs:
    ratios = "  ".join(f"{k} x{ours[k] / theirs[k]:.2f}" for k in ours)
    lines.append(f"speed-up over open_clip: {ratios}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program, so that importing
  this module next to other CLIs never clashes)."""
  flags.DEFINE_integer("num_captions", 10000, "Captions per timed pass.")
  flags.DEFINE_integer("words_per_caption", 120, "Words per caption.")
  flags.DEFINE_integer("context_length", 248, "Row length.")
  flags.DEFINE_integer("seed", 0, "Caption generator seed.")
  flags.DEFINE_bool(
      "unicode", False, "Put one non-ASCII word (curly quotes, accents) in "
      "each caption, so every caption takes the full ftfy cleaning path "
      "instead of the printable-ASCII shortcut.")
  flags.DEFINE_integer(
      "repeats", 3, "Fresh tokenizers per implementation; the best rate of "
      "each column is kept (the machine may be shared).")
  flags.DEFINE_bool("open_clip", True, "Also time open_clip's SimpleTokenizer.")


def main(argv):
  cli.reject_positional_arguments(argv)
  results = run(FLAGS.num_captions, FLAGS.words_per_caption,
                FLAGS.context_length, FLAGS.seed, FLAGS.open_clip,
                FLAGS.repeats, FLAGS.unicode)
  print(f"{FLAGS.num_captions} captions x {FLAGS.words_per_caption} words, "
        f"context {FLAGS.context_length}, best of {FLAGS.repeats} fresh "
        f"tokenizers{', one non-ASCII word each' if FLAGS.unicode else ''}")
  print(format_table(results))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
