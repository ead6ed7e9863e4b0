"""Train-step throughput, MFU and memory; eval embedding throughput; and a
same-run comparison with open_clip's PyTorch training step.

  python -m fixclip_jax.tools.bench --config=configs/demo.py --steps=20 --warmup=3 \
      [--batch=N] [--json=/tmp/bench.json] [--peak_tflops=989] [--torch] \
      [--caption_lengths=synthetic] [--buckets] [--memory] [--model=text_layers=4,...] \
      [--config.objective=clip ...]

The state and the jitted step are built exactly as training builds them
(step.init_state, step.make_train_step, step.jit_train_step) on a synthetic
random batch of the config's shapes: uint8 images (the step normalises them),
captions of random ids ending in an EOT at a random length (--caption_lengths:
anywhere, or ranges such as the synthetic generator's), cut to the config's
length buckets as train.py cuts them (buckets.py). Every step is timed on its
own, up to `jax.block_until_ready`, after `warmup` untimed steps; we report the
median and the 10th/90th percentiles. MFU = analytic FLOPs per step at the cut
lengths (flops.py's convention) / median step time / (bf16 dense peak per
device x devices). Memory: XLA's plan of the compiled step (arguments,
outputs, temps, aliased) and this process' peak RSS (getrusage).

With --buckets the step is also timed with buckets off, interleaved with the
bucketed one on the same captions: the measured ratio next to the one the
analytic FLOPs predict (with --torch also the twin below and open_clip at full
context, as its tokenizer pads, and at the bucket's length).

With --torch the same model size is also trained by open_clip (random init,
AdamW, open_clip's ClipLoss, gradient clipping as ours; bf16 autocast on CUDA,
float32 on CPU) and our "plain CLIP twin" (the config with objective=clip and
no FIX-CLIP additions: the same work as open_clip's step). The three steps are
timed interleaved in one loop so that machine noise hits them alike, and the
table gives twin / open_clip step-time ratios (< 1 = we are faster).

Host memory: the process' RSS now after state init, after compiling and after
the first step of our step (and its peak, after our step and at the end).
With --memory the step is also compiled (not run) with buckets off, with
remat=full, with masking=drop, and as the plain-CLIP and CLIP-77 twins, and
XLA's plan of each is reported: on CPU the step's temps are host memory, so
RSS after the first step ~ RSS after compiling + the plan's temps.
"""
import ast
import datetime
import json
import os
import platform
import resource
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
import flax
import jax
import jaxlib
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from fixclip_jax import buckets
from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import fileio
from fixclip_jax import flops as flops_lib
from fixclip_jax import losses
from fixclip_jax import pixels
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.models import encoders
from fixclip_jax.models import sizes

NA = "n/a"


# ----------------------------------------------------------------------------
# Inputs and timing.

# Token lengths (with start and end tokens) of the synthetic generator's
# captions (data/synthetic.py, 4 shapes, CLIP BPE): long captions and their
# first-sentence summaries. bench_test checks them against the generator.
CAPTION_LENGTHS = {
    "uniform": None,                      # EOT anywhere in the context
    "synthetic": ((166, 194), (28, 34)),
}
Lengths = Optional[Tuple[Tuple[int, int], Tuple[int, int]]]


def parse_caption_lengths(spec: str) -> Lengths:
  """A CAPTION_LENGTHS name, or "LO:HI,LO:HI" (long, short token ranges)."""
  if spec in CAPTION_LENGTHS:
    return CAPTION_LENGTHS[spec]
  try:
    long_range, short_range = (tuple(int(n) for n in part.split(":"))
                               for part in spec.split(","))
    if len(long_range) != 2 or len(short_range) != 2:
      raise ValueError(spec)
  except ValueError:
    raise ValueError(f"caption lengths {spec!r}: use one of "
                     f"{sorted(CAPTION_LENGTHS)} or LO:HI,LO:HI") from None
  return long_range, short_range


def synthetic_batch(config, cfg, batch: int, seed: int = 0,
                    caption_lengths: Lengths = None) -> Dict[str, np.ndarray]:
  """Random host batch with the data pipeline's shapes and dtypes.

  image uint8 [B, S, S, 3] (the pipeline's; the step normalises it);
  text_long int32 [B, C]; text_short int32 [B, Cs] holding random ids, an EOT
  (the largest id) ending a caption of random length, zero padding.
  caption_lengths: ((lo, hi), (lo, hi)) token lengths (with EOT) of long and
  short captions, uniform in [lo, hi]; None = EOT anywhere in the context.
  """
  rng = np.random.default_rng(seed)
  long_len, short_len = flops_lib.text_lengths(config.data)
  ranges = caption_lengths or ((2, long_len), (2, short_len))

  def texts(width, length_range):
    lo, hi = (min(n, width) for n in length_range)
    ids = rng.integers(1, cfg.vocab_size - 1, (batch, width), dtype=np.int32)
    ends = rng.integers(lo, hi + 1, (batch,)) - 1                 # EOT position
    pos = np.arange(width)[None, :]
    ids = np.where(pos < ends[:, None], ids, 0)
    ids[np.arange(batch), ends] = cfg.vocab_size - 1
    return ids.astype(np.int32)

  return {"image": rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3),
                                dtype=np.uint8),
          "text_long": texts(long_len, ranges[0]),
          "text_short": texts(short_len, ranges[1])}


def time_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int,
                     steps: int) -> Dict[str, np.ndarray]:
  """Seconds per call of each fn, calling them in turn: warmup rounds untimed,
  then `steps` timed rounds. Each fn must block until its work is done."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def summarize(times: np.ndarray) -> Dict[str, float]:
  return {"median": float(np.median(times)),
          "p10": float(np.percentile(times, 10)),
          "p90": float(np.percentile(times, 90))}


def _cost_flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled (per-device) program, None if unavailable."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backends may not implement it
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def device_peak_memory(devices) -> Any:
  """Largest peak_bytes_in_use over the devices, or "n/a" (e.g. on CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else NA


def compiled_memory(compiled) -> Any:
  """Bytes XLA plans per device for a program (args + outputs + temps - aliased)."""
  plan = memory_plan(compiled)
  if plan == NA:
    return NA
  return plan["arguments"] + plan["outputs"] + plan["temps"] - plan["aliased"]


def memory_plan(compiled) -> Any:
  """XLA's memory plan of a compiled program per device, in bytes: arguments
  (state + batch), outputs, temps (activations kept for the backward pass and
  scratch), aliased (donated state reused for the output), generated code."""
  try:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes),
            "outputs": int(m.output_size_in_bytes),
            "temps": int(m.temp_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes),
            "code": int(m.generated_code_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  # backends may not implement it
    return NA


def host_rss() -> Any:
  """This process' resident memory now, in bytes (/proc/self/status VmRSS;
  "n/a" where there is no procfs). Unlike the peak it goes down when memory
  is returned to the OS."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return NA


def host_peak_rss() -> int:
  """This process' peak resident memory so far, in bytes (getrusage; Linux
  reports KiB). A high-water mark: it never goes down."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------
# Our train step.

class JaxTrainStep:
  """The training step as training builds it (step.py; text cut to the
  config's length buckets as train.py cuts it, buckets.py), compiled once,
  callable in a loop."""

  def __init__(self, config, mesh, seed: int = 0, caption_lengths: Lengths = None):
    self.config = config
    self.cfg = sizes.model_config(config)
    self.model = step_lib.make_model(config, self.cfg)
    self.batch_size = int(config.data.global_batch)
    if self.batch_size % sharding.num_batch_shards(mesh):
      raise ValueError(f"config.data.global_batch={self.batch_size} is not divisible "
                       f"by the {sharding.num_batch_shards(mesh)} batch shards of "
                       f"mesh {dict(mesh.shape)}")
    self.state, shardings, tx = step_lib.init_state(config, self.model, mesh)
    # Host RSS (bytes, this process, now) after each phase; "first_step" is
    # filled by the first call. Meaningful for the first step a process builds.
    self.rss = {"init_state": host_rss()}
    step_fn = step_lib.make_train_step(config, self.model, tx)
    local = synthetic_batch(config, self.cfg, self.batch_size, seed, caption_lengths)
    per_host = self.batch_size // jax.process_count()
    start = jax.process_index() * per_host
    host_batch = jax.tree.map(lambda x: x[start:start + per_host], local)
    self.host_batch = buckets.TextBuckets.from_data_config(
        config.data, self.cfg.eot_token_id)(host_batch)
    self.text_lengths = flops_lib.batch_text_lengths(self.host_batch)
    self.analytic_flops = flops_lib.train_step_flops(
        config, lengths=self.text_lengths)["total"]
    self.batch = sharding.global_batch(self.host_batch, mesh)
    jitted = step_lib.jit_train_step(step_fn, mesh, shardings, self.batch)
    t0 = time.perf_counter()
    self.compiled = jitted.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.rss["compiled"] = host_rss()
    self.xla_flops_per_device = _cost_flops(self.compiled)
    self.memory_plan = compiled_memory(self.compiled)
    self.memory_breakdown = memory_plan(self.compiled)
    self.metrics = None

  def __call__(self):
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    if "first_step" not in self.rss:
      self.rss["first_step"] = host_rss()


def plain_clip_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's model size with objective=clip and no FIX-CLIP additions:
  one image pass + one long-text pass, the work of open_clip's CLIP step (the
  step runs only the branches the objective's spec reads: no short caption,
  no masked image)."""
  twin = config.copy_and_resolve_references()
  twin.objective = "clip"
  for key, value in config_base.PLAIN_CLIP.items():
    config_base.set_knob(twin, key, value)
  return twin


def without_buckets(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with text length buckets off: every step at full context."""
  off = config.copy_and_resolve_references()
  off.data.long_buckets = ()
  off.data.short_buckets = ()
  return off


def clip77_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The plain-CLIP twin at OpenAI CLIP's 77-token context (long and short
  captions cut to 77 by the tokenizer): the "CLIP-77 run" of the same size."""
  twin = plain_clip_twin(config)
  twin.model.context_length = 77
  twin.data.text_context = 77
  twin.data.short_context = 77
  return twin


def memory_variants(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The configs `memory_comparison` compiles: the config, buckets off,
  remat=full, masking=drop (objectives that mask), the plain-CLIP twin (full
  context) and the CLIP-77 twin."""
  variants = {"config": config, "buckets off": without_buckets(config)}
  remat = config.copy_and_resolve_references()
  remat.remat = "full"
  variants["remat=full"] = remat
  if masking_mode(config) not in (NA, "drop"):
    drop = config.copy_and_resolve_references()
    drop.masking.mode = "drop"
    variants["masking=drop"] = drop
  variants["plain CLIP twin"] = plain_clip_twin(config)
  variants["CLIP-77 twin"] = clip77_twin(config)
  return variants


def memory_comparison(config, mesh, caption_lengths: Lengths = None,
                      ours: Optional[JaxTrainStep] = None,
                      names: Optional[Sequence[str]] = None) -> dict:
  """XLA's memory plan of the step (compiled, not run) for each of
  `memory_variants` (or those in `names`), on the same captions: where a
  step's host or device memory goes (temps = activations kept for the
  backward pass + scratch). ours: the config's step, if already built."""
  out = {}
  for name, variant in memory_variants(config).items():
    if names is not None and name not in names:
      continue
    step = (ours if name == "config" and ours is not None else
            JaxTrainStep(variant, mesh, caption_lengths=caption_lengths))
    out[name] = {"text_lengths": list(step.text_lengths),
                 "plan": step.memory_breakdown,
                 "analytic_flops": step.analytic_flops,
                 "compile_s": step.compile_s}
    del step
  return {"memory_variants": out}


def with_grad_cache(config: ml_collections.ConfigDict, chunks: int
                    ) -> ml_collections.ConfigDict:
  """The config with optim.grad_cache_chunks = chunks."""
  variant = config.copy_and_resolve_references()
  variant.optim.grad_cache_chunks = int(chunks)
  return variant


def compile_step_plan(config, mesh, caption_lengths: Lengths = None) -> dict:
  """XLA's memory plan of the config's step, compiled from the abstract
  state and batch (nothing allocated: sizes that would not fit in host memory
  can be planned), on the same synthetic captions as JaxTrainStep."""
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  abstract, shardings, tx = step_lib.abstract_state(config, model, mesh)
  host = buckets.TextBuckets.from_data_config(config.data, cfg.eot_token_id)(synthetic_batch(
      config, cfg, int(config.data.global_batch), caption_lengths=caption_lengths))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)), host)
  jitted = step_lib.jit_train_step(step_lib.make_train_step(config, model, tx),
                                   mesh, shardings, batch)
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract, batch).compile()
  return {"plan": memory_plan(compiled), "compile_s": time.perf_counter() - t0,
          "text_lengths": list(flops_lib.batch_text_lengths(host))}


def grad_cache_comparison(config, mesh, chunks: Sequence[int], warmup: int,
                          steps: int, caption_lengths: Lengths = None) -> dict:
  """Gradient caching (optim.grad_cache_chunks): for each N in `chunks`,
  XLA's memory plan of the step (compiled, not run) and, with steps > 0, its
  step time, the N steps timed interleaved on the same batch; ratios to the
  first N."""
  out = {}
  for n in chunks:
    out[str(n)] = compile_step_plan(with_grad_cache(config, n), mesh,
                                    caption_lengths)
  if steps:
    runs = {str(n): JaxTrainStep(with_grad_cache(config, n), mesh,
                                 caption_lengths=caption_lengths) for n in chunks}
    times = time_interleaved(runs, warmup, steps)
    first = str(chunks[0])
    for n, t in times.items():
      out[n]["step_time_s"] = summarize(t)
      out[n]["step_time_over_first"] = float(np.median(t) / np.median(times[first]))
  return {"grad_cache": out}


def format_grad_cache_table(r: dict, config) -> str:
  """grad_cache_comparison's result as a markdown table."""
  lines = [f"{config.model_name} objective={config.objective} "
           f"batch={config.data.global_batch} dtype={config.dtype} "
           f"remat={config.remat} on {jax.devices()[0].device_kind} "
           f"x{jax.device_count()} ({jax.default_backend()})", "",
           "| grad_cache_chunks | rows per chunk | text tokens | arguments | "
           "outputs | temps | temps / N=first | step time | step time / N=first |",
           "|---|---|---|---|---|---|---|---|---|"]
  first = next(iter(r["grad_cache"].values()))
  gib = lambda v: _fmt(v, " GiB", 2.0 ** -30)
  for n, v in r["grad_cache"].items():
    plan = v["plan"]
    ratio = (plan["temps"] / first["plan"]["temps"]
             if isinstance(plan, dict) and isinstance(first["plan"], dict) else NA)
    lines.append(
        f"| {n} | {int(config.data.global_batch) // int(n)} | "
        f"{v['text_lengths'][0]}+{v['text_lengths'][1]} | "
        + (" | ".join(gib(plan[k]) for k in ("arguments", "outputs", "temps"))
           if isinstance(plan, dict) else "n/a | n/a | n/a")
        + f" | {_fmt(ratio)} | {_fmt(v.get('step_time_s'), ' s')} | "
        f"{_fmt(v.get('step_time_over_first'))} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Eval embedding throughput.

def eval_throughput(step: JaxTrainStep, mesh, warmup: int, steps: int) -> dict:
  """images/s and texts/s of the forward towers (eval features) at the config's
  eval batch size and text context, on the trained state's params."""
  config, cfg, model = step.config, step.cfg, step.model
  n = sharding.num_batch_shards(mesh)
  batch = max(n, (int(config.eval.batch_size) // n) * n)
  host = synthetic_batch(config, cfg, batch, seed=1)
  # Eval sends normalised float pixels (evaluation/retrieval.py).
  images = sharding.global_batch(pixels.normalize_uint8(host["image"]), mesh)
  texts = sharding.global_batch(host["text_long"], mesh)

  image_fn, text_fn = encoders.tower_fns(model)  # the towers eval and the API run
  params = step.state["params"]
  times = time_interleaved(
      {"images": lambda: jax.block_until_ready(image_fn(params, images)),
       "texts": lambda: jax.block_until_ready(text_fn(params, texts))},
      max(warmup, 1), steps)
  fl = flops_lib.embed_flops(cfg, batch, batch, texts.shape[1])
  img_s, txt_s = float(np.median(times["images"])), float(np.median(times["texts"]))
  return {"eval_batch": batch, "eval_text_length": int(texts.shape[1]),
          "eval_images_per_s": batch / img_s, "eval_texts_per_s": batch / txt_s,
          "eval_image_tflops_per_s": fl["images"] / img_s / 1e12,
          "eval_text_tflops_per_s": fl["texts"] / txt_s / 1e12}


# ----------------------------------------------------------------------------
# open_clip's PyTorch step.

def open_clip_model_config(cfg) -> dict:
  """open_clip's model config (the JSON schema of its model_configs/) for our size."""
  if cfg.vision_width // cfg.vision_heads * cfg.vision_heads != cfg.vision_width:
    raise ValueError(f"vision width {cfg.vision_width} not divisible by heads")
  return {
      "embed_dim": cfg.embed_dim,
      "quick_gelu": cfg.act == "quick_gelu",
      "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size,
                     "width": cfg.vision_width, "layers": cfg.vision_layers,
                     "head_width": cfg.vision_width // cfg.vision_heads,
                     "mlp_ratio": cfg.vision_mlp_dim / cfg.vision_width},
      "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
                   "width": cfg.text_width, "heads": cfg.text_heads,
                   "layers": cfg.text_layers,
                   "mlp_ratio": cfg.text_mlp_dim / cfg.text_width},
  }


class TorchTrainStep:
  """open_clip CLIP of the same size: random init, AdamW, ClipLoss, grad clip.

  Its context is the width of host_batch's text_long (open_clip adds its whole
  positional table, so a cut batch needs a model of that context): a batch
  padded to 248 tokens, as open_clip's tokenizer pads, or one cut to a bucket.
  """

  def __init__(self, config, cfg, host_batch: dict, seed: int = 0):
    import open_clip  # pylint: disable=g-import-not-at-top  # optional: --torch only
    import torch  # pylint: disable=g-import-not-at-top  # optional: --torch only
    self.torch = torch
    torch.manual_seed(seed)
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"fixclip-bench-{os.getpid()}-{id(self)}"
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, name + ".json")
      context = cfg.replace(context_length=host_batch["text_long"].shape[1])
      with open(path, "w") as f:
        json.dump(open_clip_model_config(context), f)
      open_clip.add_model_config(path)
      self.model = open_clip.create_model(name, device=self.device, output_dict=True)
    self.model.train()
    o = config.optim
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
        weight_decay=o.weight_decay)
    self.grad_clip = o.grad_clip
    self.loss_fn = open_clip.ClipLoss()
    images = pixels.model_input(host_batch["image"])  # float32, normalised
    self.images = torch.from_numpy(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
    self.texts = torch.from_numpy(host_batch["text_long"].astype(np.int64)).to(self.device)
    # bf16 autocast on GPU as open_clip trains; CPU autocast bf16 is slow and
    # not what our float32 demo computes.
    self.autocast = self.device.type == "cuda" and config.dtype == "bfloat16"
    if self.device.type == "cuda":
      torch.cuda.reset_peak_memory_stats(self.device)

  def __call__(self):
    torch = self.torch
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      out = self.model(self.images, self.texts)
      loss = self.loss_fn(out["image_features"], out["text_features"],
                          out["logit_scale"])
    loss.backward()
    if self.grad_clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    with torch.no_grad():  # CLIP's temperature clamp, as our step
      self.model.logit_scale.clamp_(0, float(np.log(100.0)))
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def peak_memory(self):
    if self.device.type == "cuda":
      return int(self.torch.cuda.max_memory_allocated(self.device))
    return NA


def torch_comparison(config, ours: JaxTrainStep, mesh, warmup: int, steps: int,
                     caption_lengths: Lengths = None) -> dict:
  """Interleaved timing of our step, our plain-CLIP twin and open_clip's step
  (on the twin's batch: the same captions, cut to the same bucket)."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: --torch only
  twin_config = plain_clip_twin(config)
  twin = JaxTrainStep(twin_config, mesh, caption_lengths=caption_lengths)
  theirs = TorchTrainStep(twin_config, twin.cfg, twin.host_batch)
  times = time_interleaved({"ours": ours, "twin": twin, "torch": theirs},
                           warmup, steps)
  s = {k: summarize(v) for k, v in times.items()}
  twin_flops, ours_flops = twin.analytic_flops, ours.analytic_flops
  b = ours.batch_size
  return {
      "torch_version": torch.__version__,
      "torch_device": str(theirs.device),
      "torch_precision": "bf16 autocast" if theirs.autocast else "float32",
      "torch_threads": torch.get_num_threads(),
      "torch_step_time_s": s["torch"],
      "torch_images_per_s": b / s["torch"]["median"],
      "torch_peak_memory_bytes": theirs.peak_memory(),
      "twin_step_time_s": s["twin"],
      "twin_images_per_s": b / s["twin"]["median"],
      "twin_analytic_flops_per_step": twin_flops,
      "twin_xla_flops_per_step": (twin.xla_flops_per_device * mesh.size
                                  if twin.xla_flops_per_device else NA),
      "interleaved_ours_step_time_s": s["ours"],
      # Matched work (same model, batch, text length, loss): < 1 = we are faster.
      "ratio_twin_over_torch": s["twin"]["median"] / s["torch"]["median"],
      # Our full objective vs open_clip's plain CLIP, per FLOP: the ratio of
      # achieved FLOP rates inverted (time per analytic FLOP), < 1 = faster.
      "ratio_ours_over_torch_per_flop": (
          (s["ours"]["median"] / ours_flops) / (s["torch"]["median"] / twin_flops)),
  }


def bucket_comparison(config, mesh, warmup: int, steps: int,
                      caption_lengths: Lengths, compare_torch: bool = False,
                      bucketed: Optional[JaxTrainStep] = None) -> dict:
  """Length buckets on vs off, timed interleaved in one loop on the same
  captions: our step (the config's objective) and, with compare_torch, our
  plain-CLIP twin and open_clip's step, open_clip both at full context (its
  tokenizer pads every caption to it) and at the bucket's length.

  Predicted gain: analytic FLOPs at the cut lengths / at full context.
  bucketed: the config's step, if already built (same captions).
  """
  off = without_buckets(config)
  if not (config.data.long_buckets or config.data.short_buckets):
    raise ValueError("bucket comparison: config.data.long_buckets and "
                     "short_buckets are both empty")
  fns = {"unbucketed": JaxTrainStep(off, mesh, caption_lengths=caption_lengths),
         "bucketed": bucketed or JaxTrainStep(config, mesh,
                                              caption_lengths=caption_lengths)}
  if compare_torch:
    twin_config = plain_clip_twin(config)
    fns["twin_unbucketed"] = JaxTrainStep(without_buckets(twin_config), mesh,
                                          caption_lengths=caption_lengths)
    fns["twin_bucketed"] = JaxTrainStep(twin_config, mesh,
                                        caption_lengths=caption_lengths)
    cfg = fns["twin_bucketed"].cfg
    fns["open_clip_full"] = TorchTrainStep(twin_config, cfg,
                                           fns["twin_unbucketed"].host_batch)
    fns["open_clip_cut"] = TorchTrainStep(twin_config, cfg,
                                          fns["twin_bucketed"].host_batch)
  times = {k: summarize(v) for k, v in
           time_interleaved(fns, warmup, steps).items()}
  median = {k: t["median"] for k, t in times.items()}
  on, unb = fns["bucketed"], fns["unbucketed"]
  out = {
      "bucket_caption_lengths": caption_lengths or "uniform",
      "bucket_text_lengths": list(on.text_lengths),
      "unbucketed_text_lengths": list(unb.text_lengths),
      "bucket_step_time_s": times,
      "bucket_analytic_flops": {"bucketed": on.analytic_flops,
                                "unbucketed": unb.analytic_flops},
      "bucket_xla_memory_plan": {"bucketed": on.memory_breakdown,
                                 "unbucketed": unb.memory_breakdown},
      "ratio_bucketed_over_unbucketed": median["bucketed"] / median["unbucketed"],
      "predicted_bucketed_over_unbucketed": on.analytic_flops / unb.analytic_flops,
  }
  if compare_torch:
    out.update({
        # Buckets vs open_clip as it trains (captions padded to the context).
        "ratio_twin_bucketed_over_open_clip_full":
            median["twin_bucketed"] / median["open_clip_full"],
        # Matched work: the same cut lengths on both sides.
        "ratio_twin_bucketed_over_open_clip_cut":
            median["twin_bucketed"] / median["open_clip_cut"],
        "ratio_twin_unbucketed_over_open_clip_full":
            median["twin_unbucketed"] / median["open_clip_full"],
        "ratio_ours_bucketed_over_open_clip_full":
            median["bucketed"] / median["open_clip_full"],
        "predicted_twin_bucketed_over_unbucketed": (
            fns["twin_bucketed"].analytic_flops /
            fns["twin_unbucketed"].analytic_flops),
    })
  return out


# ----------------------------------------------------------------------------
# The benchmark.

def masking_mode(config: ml_collections.ConfigDict) -> str:
  """config.masking.mode where the objective masks images, else "n/a"."""
  if losses.get_objective(config.objective).masked_image:
    return config.masking.mode
  return NA


def _versions() -> dict:
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version()}


def run_benchmark(config: ml_collections.ConfigDict, *, batch: Optional[int] = None,
                  steps: int = 20, warmup: int = 3, peak_tflops: Optional[float] = None,
                  compare_torch: bool = False, eval_steps: Optional[int] = None,
                  devices=None, json_path: Optional[str] = None,
                  config_name: str = "", caption_lengths: Lengths = None,
                  compare_buckets: bool = False, compare_memory: bool = False) -> dict:
  """Benchmarks one config's train step (and eval towers); returns the table.

  Args:
    config: a training config; `batch` overrides config.data.global_batch.
    steps, warmup: timed and untimed steps (each timed step is blocked on).
    peak_tflops: per-device peak for MFU; default from flops.PEAK_BF16_TFLOPS by
      device kind ("n/a" on CPU and unknown devices).
    compare_torch: also time open_clip's PyTorch step (see module docstring).
      On GPU, start JAX with XLA_PYTHON_CLIENT_PREALLOCATE=false (the CLI
      does) so that PyTorch finds memory in the same process.
    eval_steps: timed eval batches (default `steps`; 0 = skip eval).
    devices: devices of the mesh (default all, as training).
    json_path: also write the result there (atomically; a local path or a URL).
    caption_lengths: token-length ranges of the synthetic captions
      (CAPTION_LENGTHS, parse_caption_lengths); None = EOT anywhere.
    compare_buckets: also time the step with the config's text length
      buckets on vs off (`bucket_comparison`; with compare_torch it includes
      the open_clip steps instead of `torch_comparison`).
    compare_memory: also compile (not run) the step's memory variants
      (`memory_comparison`: buckets off, remat=full, masking=drop, plain-CLIP
      and CLIP-77 twins) and report XLA's plan of each.
  Returns a flat-ish dict; see `format_table`.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  config = config.copy_and_resolve_references()
  losses.get_objective(config.objective)  # an unknown name fails before compiling
  if batch is not None:
    if batch < 1:
      raise ValueError(f"--batch={batch} must be >= 1")
    config.data.global_batch = int(batch)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  rss_start = host_rss()
  ours = JaxTrainStep(config, mesh, caption_lengths=caption_lengths)
  times = time_interleaved({"ours": ours}, warmup, steps)["ours"]
  step_time = summarize(times)
  peak_memory = device_peak_memory(mesh.devices.flat)
  rss_after_step = host_peak_rss()
  b = ours.batch_size
  analytic = flops_lib.train_step_flops(config, lengths=ours.text_lengths)
  device = mesh.devices.flat[0]
  if peak_tflops is None:
    peak_tflops = flops_lib.peak_tflops_for(device.device_kind)
  achieved = analytic["total"] / step_time["median"] / 1e12         # TFLOP/s
  xla = ours.xla_flops_per_device
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "num_devices": int(mesh.size),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "versions": _versions(),
      # Environment that changes timings (OMP_WAIT_POLICY: see BENCHMARKS.md).
      "env": {k: os.environ.get(k, "") for k in (
          "XLA_FLAGS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
          "XLA_PYTHON_CLIENT_PREALLOCATE")},
      "config": config_name,
      "model_name": config.model_name,
      "objective": config.objective,
      "masking_mode": masking_mode(config),
      "dtype": config.dtype,
      "remat": str(config.remat),
      "batch": b,
      "image_size": ours.cfg.image_size,
      "text_lengths": list(ours.text_lengths),
      "context_lengths": list(flops_lib.text_lengths(config.data)),
      "caption_lengths": caption_lengths or "uniform",
      "text_buckets": [list(config.data.long_buckets),
                       list(config.data.short_buckets)],
      "steps": steps, "warmup": warmup,
      "compile_s": ours.compile_s,
      "step_time_s": step_time,
      "images_per_s": b / step_time["median"],
      "analytic_flops_per_step": analytic["total"],
      "analytic_flops_breakdown": {k: analytic[k] for k in (
          "vision_raw", "vision_masked", "text_long", "text_short", "heads", "logits")},
      # cost_analysis describes one device's partition; x devices = global.
      "xla_flops_per_step": xla * mesh.size if xla is not None else NA,
      "xla_over_analytic": xla * mesh.size / analytic["total"] if xla else NA,
      "achieved_tflops_per_s": achieved,
      "peak_tflops_per_device": peak_tflops if peak_tflops else NA,
      "mfu": (achieved / (peak_tflops * mesh.size)) if peak_tflops else NA,
      "peak_memory_bytes": peak_memory,
      "compiled_memory_bytes_per_device": ours.memory_plan,
      "xla_memory_plan_per_device": ours.memory_breakdown,
      # getrusage high-water marks: after our step ran; at the end (eval,
      # open_clip and further steps included).
      "host_peak_rss_after_step_bytes": rss_after_step,
      # Current RSS after each phase of building and running our step.
      "host_rss_phases_bytes": {"start": rss_start, **ours.rss},
      "flops_convention": flops_lib.CONVENTION,
  }
  eval_steps = steps if eval_steps is None else eval_steps
  if eval_steps:
    result.update(eval_throughput(ours, mesh, warmup, eval_steps))
  if compare_buckets:
    result.update(bucket_comparison(config, mesh, warmup, steps, caption_lengths,
                                    compare_torch, bucketed=ours))
  elif compare_torch:
    result.update(torch_comparison(config, ours, mesh, warmup, steps,
                                   caption_lengths))
  if compare_memory:
    result.update(memory_comparison(config, mesh, caption_lengths, ours=ours))
  result["host_peak_rss_bytes"] = host_peak_rss()
  if json_path:
    write_json(result, json_path)
  return result


def write_json(result: dict, path: str) -> None:
  """Writes the result atomically (never half-written); `path` may be a URL."""
  fileio.atomic_write(path, json.dumps(result, indent=2, sort_keys=True))


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
  if value is None or value == NA:
    return NA
  if isinstance(value, dict):
    return (f"{value['median'] * scale:.{digits}g} (p10 {value['p10'] * scale:.{digits}g}"
            f", p90 {value['p90'] * scale:.{digits}g}){unit}")
  return f"{value * scale:.{digits}g}{unit}"


def format_table(r: dict) -> str:
  """The result as a two-column markdown table."""
  rows = [
      ("device", f"{r['device_kind']} x{r['num_devices']} ({r['platform']})"),
      ("versions", ", ".join(f"{k} {v}" for k, v in r["versions"].items())),
      ("date", r["date"]),
      ("env", ", ".join(f"{k}={v}" for k, v in r["env"].items() if v) or "-"),
      ("config", f"{r['config']} {r['model_name']} objective={r['objective']} "
                 f"masking={r['masking_mode']} dtype={r['dtype']} remat={r['remat']}"),
      ("batch / image / text", f"{r['batch']} / {r['image_size']}px / "
                               f"{r['text_lengths'][0]}+{r['text_lengths'][1]} tokens"),
      ("compile", _fmt(r["compile_s"], " s")),
      ("step time", _fmt(r["step_time_s"], " ms", 1e3)),
      ("images/s", _fmt(r["images_per_s"])),
      ("analytic FLOPs/step", _fmt(r["analytic_flops_per_step"], " TFLOP", 1e-12, 4)),
      ("XLA cost-analysis FLOPs/step", _fmt(r["xla_flops_per_step"], " TFLOP", 1e-12, 4)),
      ("XLA / analytic", _fmt(r["xla_over_analytic"], "", 1.0, 4)),
      ("achieved", _fmt(r["achieved_tflops_per_s"], " TFLOP/s")),
      ("peak (bf16 dense, per device)", _fmt(r["peak_tflops_per_device"], " TFLOP/s")),
      ("MFU", _fmt(r["mfu"], " %", 100.0)),
      ("peak device memory", _fmt(r["peak_memory_bytes"], " GiB", 2.0 ** -30)),
      ("XLA memory plan per device", _fmt(r["compiled_memory_bytes_per_device"],
                                          " GiB", 2.0 ** -30)),
      ("XLA plan: arguments / outputs / temps / aliased",
       _fmt_plan(r.get("xla_memory_plan_per_device", NA))),
      ("host peak RSS (after our step / at the end)",
       f"{_fmt(r.get('host_peak_rss_after_step_bytes'), ' GiB', 2.0 ** -30)} / "
       f"{_fmt(r.get('host_peak_rss_bytes'), ' GiB', 2.0 ** -30)}"),
  ]
  if "host_rss_phases_bytes" in r:
    rows.append(("host RSS now: " + " / ".join(r["host_rss_phases_bytes"]),
                 " / ".join(_fmt(v, " GiB", 2.0 ** -30)
                            for v in r["host_rss_phases_bytes"].values())))
  for name, v in r.get("memory_variants", {}).items():
    rows.append((f"XLA plan, {name} ({v['text_lengths'][0]}+{v['text_lengths'][1]} "
                 "tokens): arguments / outputs / temps / aliased",
                 _fmt_plan(v["plan"])))
  if "eval_images_per_s" in r:
    rows += [("eval images/s", f"{_fmt(r['eval_images_per_s'])} (batch {r['eval_batch']})"),
             ("eval texts/s", f"{_fmt(r['eval_texts_per_s'])} "
                              f"({r['eval_text_length']} tokens)")]
  if "torch_step_time_s" in r:
    rows += [
        ("open_clip step", f"{_fmt(r['torch_step_time_s'], ' ms', 1e3)} "
                           f"torch {r['torch_version']} {r['torch_device']} "
                           f"{r['torch_precision']} ({r['torch_threads']} threads)"),
        ("our plain-CLIP twin step", _fmt(r["twin_step_time_s"], " ms", 1e3)),
        ("our step (interleaved)", _fmt(r["interleaved_ours_step_time_s"], " ms", 1e3)),
        ("open_clip images/s", _fmt(r["torch_images_per_s"])),
        ("open_clip peak memory", _fmt(r["torch_peak_memory_bytes"], " GiB", 2.0 ** -30)),
        ("twin / open_clip step time", _fmt(r["ratio_twin_over_torch"], "", 1.0, 3)),
        ("ours / open_clip time per FLOP", _fmt(r["ratio_ours_over_torch_per_flop"],
                                                "", 1.0, 3)),
    ]
  if "bucket_step_time_s" in r:
    t = r["bucket_step_time_s"]
    rows += [
        ("buckets: text lengths on / off", f"{r['bucket_text_lengths']} / "
                                           f"{r['unbucketed_text_lengths']}"),
        ("buckets: step on / off", f"{_fmt(t['bucketed'], ' ms', 1e3)} / "
                                   f"{_fmt(t['unbucketed'], ' ms', 1e3)}"),
        ("buckets: on / off, measured (predicted from FLOPs)",
         f"{_fmt(r['ratio_bucketed_over_unbucketed'])} "
         f"({_fmt(r['predicted_bucketed_over_unbucketed'])})"),
    ]
    if "open_clip_full" in t:
      rows += [
          ("buckets: twin on / off", f"{_fmt(t['twin_bucketed'], ' ms', 1e3)} / "
                                     f"{_fmt(t['twin_unbucketed'], ' ms', 1e3)}"),
          ("buckets: open_clip full context / cut", f"{_fmt(t['open_clip_full'], ' ms', 1e3)} / "
                                                    f"{_fmt(t['open_clip_cut'], ' ms', 1e3)}"),
          ("twin (buckets) / open_clip (full context)",
           _fmt(r["ratio_twin_bucketed_over_open_clip_full"])),
          ("twin (buckets) / open_clip (cut, matched)",
           _fmt(r["ratio_twin_bucketed_over_open_clip_cut"])),
          ("twin / open_clip, both full context",
           _fmt(r["ratio_twin_unbucketed_over_open_clip_full"])),
          ("ours (objective, buckets) / open_clip (full context)",
           _fmt(r["ratio_ours_bucketed_over_open_clip_full"])),
      ]
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines)


def _fmt_plan(plan) -> str:
  if not isinstance(plan, dict):
    return NA
  return " / ".join(_fmt(plan[k], " GiB", 2.0 ** -30) for k in (
      "arguments", "outputs", "temps", "aliased"))


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  config_flags.DEFINE_config_file(
      "config", None, "Training config file (e.g. configs/demo.py).", lock_config=True)
  flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
  flags.DEFINE_integer("steps", 20, "Timed steps.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
  flags.DEFINE_integer("eval_steps", None, "Timed eval batches "
                       "(default --steps; 0 = skip).")
  flags.DEFINE_string("json", None, "Also write the result as JSON here.")
  flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for MFU "
                     "(default: bf16 dense peak by device kind).")
  flags.DEFINE_bool("torch", False, "Also time open_clip's PyTorch step.")
  flags.DEFINE_string("caption_lengths", "uniform", "Synthetic caption token "
                      f"lengths: {' | '.join(CAPTION_LENGTHS)} | LO:HI,LO:HI "
                      "(long, short).")
  flags.DEFINE_bool("buckets", False, "Also time the step with the config's "
                    "text length buckets on vs off (with --torch: open_clip "
                    "at full context and cut).")
  flags.DEFINE_bool("memory", False, "Also compile (not run) the step with "
                    "buckets off, remat=full, masking=drop and as the plain-CLIP "
                    "and CLIP-77 twins, and report XLA's memory plan of each.")
  flags.DEFINE_list("grad_cache", [], "Only compare optim.grad_cache_chunks "
                    "values, e.g. 1,4,16: XLA's memory plan of each (compiled "
                    "from the abstract state, not run) and, with --steps > 0, "
                    "their step times, interleaved.")
  flags.DEFINE_list("model", [], "config.model overrides KEY=VALUE (fields "
                    "the config does not list, too), e.g. "
                    "vision_layers=4,text_layers=4,image_size=64.")


def with_model_overrides(config, overrides: Sequence[str]):
  """A copy of the config with config.model.KEY = VALUE (a Python literal)
  for each "KEY=VALUE"; keys the config does not list yet are added."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--model={item!r}: use KEY=VALUE")
    try:
      config.model[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise app.UsageError(f"--model {item!r}: {value!r} is not a literal") from None
  return config


def main(argv):
  cli.reject_positional_arguments(argv)
  if FLAGS.config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
  if FLAGS.torch:
    # JAX's GPU client grabs 75% of the memory at start-up by default, which
    # would leave open_clip too little; read when the backend starts (below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if FLAGS.grad_cache:
    config = with_model_overrides(FLAGS.config, FLAGS.model)
    if FLAGS.batch:
      config.data.global_batch = FLAGS.batch
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    result = grad_cache_comparison(
        config, mesh, [int(n) for n in FLAGS.grad_cache], FLAGS.warmup,
        FLAGS.steps, parse_caption_lengths(FLAGS.caption_lengths))
    if FLAGS.json:
      write_json(result, FLAGS.json)
    print(format_grad_cache_table(result, config))
    return
  result = run_benchmark(with_model_overrides(FLAGS.config, FLAGS.model),
                         batch=FLAGS.batch, steps=FLAGS.steps,
                         warmup=FLAGS.warmup, peak_tflops=FLAGS.peak_tflops,
                         compare_torch=FLAGS.torch, eval_steps=FLAGS.eval_steps,
                         json_path=FLAGS.json,
                         caption_lengths=parse_caption_lengths(FLAGS.caption_lengths),
                         compare_buckets=FLAGS.buckets,
                         compare_memory=FLAGS.memory,
                         config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
  print(format_table(result))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
