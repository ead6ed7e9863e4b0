"""The accelerator check's parts that need the whole package (tools/
device_check.py runs each as `python -m fixclip_jax.tools.device_parts
--part=NAME --result=FILE`, under its own timeout).

  gpu_tests  towers vs open_clip on the device (random perturbed open_clip
             models converted as loader.py reads them, as
             tests/parity_test.py does on the CPU), bf16 vs float32 features,
             one FIX-CLIP train step on the device vs the same step on the CPU
  bench      tools/bench's run_benchmark per config (with open_clip and the
             plain-CLIP twin where asked) and attention xla vs cudnn,
             interleaved
  ablate     tools/ablate's discriminative budget at 4x its steps, one
             variant at a time (what finished is kept if time runs out)

Each check records its numbers as soon as it has them (device_check.Results);
the process exits 1 if a check failed. --cpu-smoke: tiny models, batch 8, 2
steps, on the CPU.
"""
import contextlib
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Optional, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fixclip_jax import buckets
from fixclip_jax import cli
from fixclip_jax import config_base
from fixclip_jax import flops as flops_lib
from fixclip_jax import layouts
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.models import clip
from fixclip_jax.models import encoders
from fixclip_jax.models import layers
from fixclip_jax.models import sizes
from fixclip_jax.tools import ablate
from fixclip_jax.tools import bench
from fixclip_jax.tools import device_check
from fixclip_jax.tools.device_check import log

SOT, EOT = 49406, 49407
# Tolerances. float32 towers at "highest" matmul precision match open_clip as
# on the CPU (tests/parity_test.py); at the default precision the GPU may use
# TF32 matmuls (10-bit mantissa). bf16 keeps 8 bits of mantissa.
PARITY_TOL = {"highest": 1e-4, "default": 1e-2}
MIN_COSINE_BF16 = 0.99          # bf16 vs float32 features, worst row
STEP_TOL = {"float32": {"loss": 1e-3, "grad_norm": 1e-2},
            "bfloat16": {"loss": 3e-2, "grad_norm": 1e-1}}
# open_clip's config of our "tiny" size (models/sizes.py), quick_gelu as OpenAI.
TINY_OPEN_CLIP = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128,
                 "heads": 2, "layers": 2},
}


def check(results: device_check.Results, name: str,
          fn: Callable[[], Dict[str, Any]]) -> bool:
  """Runs one check; records its dict (with "ok", "wall_s", "error")."""
  start = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except  # recorded, next check runs
    out = {"ok": False, "error": device_check.error_line(e)}
  out["wall_s"] = round(time.perf_counter() - start, 1)
  results.put(name, out)
  log(f"{name}: {'ok' if out['ok'] else 'FAILED'} in {out['wall_s']} s"
      + (f" ({out['error']})" if out.get("error") else ""))
  return out["ok"]


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def token_ids(rng, batch: int, context: int) -> np.ndarray:
  """[B, C] int64: SOT, random ordinary ids, EOT, zero padding (lengths
  from 1 to the full context)."""
  ids = np.zeros((batch, context), np.int64)
  lengths = np.linspace(1, context - 2, batch).astype(int)
  for b, n in enumerate(lengths):
    ids[b, 0] = SOT
    ids[b, 1:n + 1] = rng.integers(1, SOT, n)
    ids[b, n + 1] = EOT
  return ids


# ----------------------------------------------------------------------------
# gpu_tests.

def open_clip_model(name: str, config: Optional[dict], seed: int):
  """A random open_clip model, every parameter perturbed (so no LayerNorm or
  bias sits at its trivial init and a mix-up shows), float32, eval mode."""
  import open_clip  # pylint: disable=g-import-not-at-top  # optional: torch side
  import torch  # pylint: disable=g-import-not-at-top  # optional: torch side
  if config is not None:
    with tempfile.TemporaryDirectory() as tmp:
      with open(os.path.join(tmp, name + ".json"), "w") as f:
        json.dump(config, f)
      open_clip.add_model_config(tmp)
      model = open_clip.create_model(name, pretrained=None)
  else:
    model = open_clip.create_model(name, pretrained=None)
  model.eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 0:
        p.add_(torch.randn(p.shape, generator=gen) * 0.01)
  return model


def towers_vs_open_clip(name: str, config: Optional[dict], batch: int,
                        precisions=tuple(PARITY_TOL)) -> dict:
  """Our towers on the default device vs open_clip's (CUDA when there is
  one, TF32 off), float32, on the same converted weights, at each matmul
  precision of `precisions`."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: torch side
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = open_clip_model(name, config, seed=1)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = layouts.config_from_shapes({k: v.shape for k, v in sd.items()})
  params = layouts.state_dict_to_params(sd, cfg, "openai", name)
  del sd
  rng = np.random.default_rng(2)
  images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = token_ids(rng, batch, cfg.context_length)
  model = model.to(device)
  with torch.no_grad():
    ref_image = model.encode_image(torch.from_numpy(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)).cpu().numpy()
    ref_text = model.encode_text(torch.from_numpy(ids).to(device)).cpu().numpy()
  del model
  ours = clip.CLIP(cfg)
  out = {"model": name, "batch": batch, "jax_device": str(jax.devices()[0]),
         "torch_device": str(device)}
  ok = True
  for precision in precisions:
    tol = PARITY_TOL[precision]
    context = (contextlib.nullcontext() if precision == "default"
               else jax.default_matmul_precision(precision))
    with context:
      fn = jax.jit(lambda p, x, t: ours.apply({"params": p}, x, t))
      got = fn(params, images, ids.astype(np.int32))
      errs = {"image": rel_err(got["image"]["embedding"], ref_image),
              "text": rel_err(got["text"]["embedding"], ref_text)}
    out[f"rel_err_{precision}"] = errs
    out[f"tol_{precision}"] = tol
    ok &= all(e < tol for e in errs.values())
  out["ok"] = bool(ok)
  return out


def bf16_vs_float32(model_name: str, batch: int) -> dict:
  """The same params' normalised features, computed in bf16 and in float32."""
  cfg = sizes.get_config(model_name)
  params = clip.init_params(cfg, jax.random.PRNGKey(3))
  rng = np.random.default_rng(4)
  images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = token_ids(rng, batch, cfg.context_length).astype(np.int32)
  out = {"model": model_name, "batch": batch}
  ok = True
  feats = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    image_fn, text_fn = encoders.tower_fns(clip.CLIP(cfg, dtype=dtype))
    feats[dtype] = (np.asarray(image_fn(params, images), np.float32),
                    np.asarray(text_fn(params, ids), np.float32))
  for i, tower in enumerate(("image", "text")):
    full, half = feats[jnp.float32][i], feats[jnp.bfloat16][i]
    cosine = (full * half).sum(-1)                     # rows are unit vectors
    out[tower] = {"min_cosine": float(cosine.min()),
                  "mean_cosine": float(cosine.mean()),
                  "rel_err": rel_err(half, full)}
    ok &= bool(cosine.min() > MIN_COSINE_BF16)
  out["min_cosine_required"] = MIN_COSINE_BF16
  out["ok"] = bool(ok)
  return out


def step_config(smoke: bool) -> ml_collections.ConfigDict:
  """configs/demo.py: tiny FIX-CLIP (both branches, regional prompts, masking,
  GTA), at batch 8 (smoke) or 32."""
  config = config_base.load_config_file("demo")
  config.data.global_batch = 8 if smoke else 32
  return config


def one_train_step(config, device, params, host_batch) -> Tuple[Any, dict]:
  """(params after one step, metrics) of the real train step on one device."""
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  mesh = sharding.make_mesh(1, 1, devices=[device])
  state, shardings, tx = step_lib.init_state(config, model, mesh, params=params)
  batch = sharding.global_batch(host_batch, mesh)
  fn = step_lib.jit_train_step(step_lib.make_train_step(config, model, tx),
                               mesh, shardings, batch)
  new_state, metrics = fn(state, batch)
  return (jax.device_get(new_state["params"]),
          {k: float(v) for k, v in jax.device_get(metrics).items()})


def fixclip_step_vs_cpu(smoke: bool) -> dict:
  """One FIX-CLIP step on the default device (float32 and bf16) vs the
  float32 step on the CPU, from the same params and batch: finite, nothing
  skipped, loss and gradient norm within the dtype's tolerance."""
  config = step_config(smoke)
  cfg = sizes.model_config(config)
  params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(5)))
  host = bench.synthetic_batch(config, cfg, config.data.global_batch, seed=6,
                               caption_lengths=bench.CAPTION_LENGTHS["synthetic"])
  host = buckets.TextBuckets.from_data_config(config.data, cfg.eot_token_id)(host)
  cpu = jax.devices("cpu")[0]
  accelerator = jax.devices()[0]
  f32 = config.copy_and_resolve_references()
  f32.dtype = "float32"
  ref_params, ref = one_train_step(f32, cpu, params, host)
  ref_update = jax.tree.map(lambda a, b: a - b, ref_params, params)
  ref_norm = float(np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree.leaves(ref_update))))
  out = {"config": "demo", "batch": config.data.global_batch,
         "device": str(accelerator), "cpu": {k: ref[k] for k in ("loss", "grad_norm")}}
  ok = True
  # The smoke's "device" is the CPU: its float32 step is the reference (no
  # second compilation); bf16 differs only in config.dtype.
  for dtype in ("float32",) if smoke else ("float32", "bfloat16"):
    c = config.copy_and_resolve_references()
    c.dtype = dtype
    if dtype == "float32" and accelerator == cpu:
      new_params, metrics = ref_params, ref
    else:
      new_params, metrics = one_train_step(c, accelerator, params, host)
    finite = (all(np.isfinite(v) for v in metrics.values()) and
              all(np.isfinite(p).all() for p in jax.tree.leaves(new_params)))
    update = jax.tree.map(lambda a, b: a - b, new_params, params)
    diff = float(np.sqrt(sum(np.sum(np.square(u - r)) for u, r in zip(
        jax.tree.leaves(update), jax.tree.leaves(ref_update)))))
    errs = {k: abs(metrics[k] - ref[k]) / max(abs(ref[k]), 1e-12)
            for k in ("loss", "grad_norm")}
    out[dtype] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                  "skipped": metrics["skipped"], "finite": bool(finite),
                  "rel_err": errs, "tol": STEP_TOL[dtype],
                  # Adam's first step is ~lr * sign(gradient): entries whose
                  # gradient is near 0 may flip, so this is reported only.
                  "update_rel_err": diff / max(ref_norm, 1e-30),
                  "metrics_rel_err": {k: abs(v - ref[k]) / max(abs(ref[k]), 1e-12)
                                      for k, v in metrics.items() if k in ref}}
    ok &= bool(finite and metrics["skipped"] == 0 and
               all(errs[k] < STEP_TOL[dtype][k] for k in errs))
  out["ok"] = bool(ok)
  return out


def run_gpu_tests(results: device_check.Results, smoke: bool) -> bool:
  results.put("backend", jax.default_backend())
  # On the CPU both precisions are float32's: the smoke compiles one.
  precisions = ("highest",) if smoke else tuple(PARITY_TOL)
  ok = check(results, "towers_vs_open_clip_tiny",
             lambda: towers_vs_open_clip("device-check-tiny", TINY_OPEN_CLIP, 4,
                                         precisions))
  if not smoke:
    ok &= check(results, "towers_vs_open_clip_b16",
                lambda: towers_vs_open_clip("ViT-B-16-quickgelu", None, 8))
  ok &= check(results, "bf16_vs_float32",
              lambda: bf16_vs_float32("tiny" if smoke else "B/16", 8))
  ok &= check(results, "fixclip_step_vs_cpu", lambda: fixclip_step_vs_cpu(smoke))
  return ok


# ----------------------------------------------------------------------------
# bench.

@dataclasses.dataclass(frozen=True)
class BenchRun:
  name: str
  config: str                  # configs/NAME.py
  torch: bool = False          # also the plain-CLIP twin and open_clip
  attention: bool = False      # attention xla vs cudnn instead


# Runs share one process: in order of growing memory, so that each run's
# device peak (a high-water mark) is its own, and the attention runs last (a
# cuDNN kernel that fails may take the process with it).
BENCH_RUNS = (
    BenchRun("clip_b16", "clip_b16", torch=True),
    BenchRun("longclip_b16", "longclip_b16"),
    BenchRun("fixclip_b16", "fixclip_b16", torch=True),
    BenchRun("attention_fixclip_b16", "fixclip_b16", attention=True),
    BenchRun("attention_clip_b16", "clip_b16", attention=True),
)
# The smoke runs one of each kind (with open_clip and the twin; attention):
# the others differ only in their config (a plain run is the first one's
# first half).
SMOKE_BENCH_RUNS = ("clip_b16", "attention_clip_b16")
GPU_BENCH = {"batch": 256, "steps": 10, "warmup": 3}
SMOKE_BENCH = {"batch": 8, "steps": 2, "warmup": 1}
ATTENTION = layers.ATTN_IMPLEMENTATIONS


def smoke_sized(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config at the tiny size (configs/demo.py's GTA groups for 2 layers;
  PCM over the small batch)."""
  config = config.copy_and_resolve_references()
  demo = config_base.load_config_file("demo")
  config.model_name = "tiny"
  config.data.image_size = demo.data.image_size
  if config.model.gta_groups:
    config.model.gta_groups = demo.model.gta_groups
    config.loss.gta_weights = demo.loss.gta_weights
    config.loss.gta_first_group = demo.loss.gta_first_group
  config.loss.pcm_group_size = SMOKE_BENCH["batch"]
  config.loss.pcm_components = 2
  # The attention run's xla step is then this run's program: compiled once
  # (jax's persistent cache), as a loaded CPU takes minutes per train step.
  config.attn_implementation = "xla"
  return config


def bench_row(r: dict) -> dict:
  """The figures BENCHMARKS.md's table takes from one run_benchmark result."""
  row = {k: r.get(k) for k in ("config", "batch", "text_lengths", "compile_s",
                               "images_per_s", "mfu", "peak_memory_bytes",
                               "compiled_memory_bytes_per_device",
                               "achieved_tflops_per_s", "device_kind")}
  row["step_ms"] = r["step_time_s"]["median"] * 1e3
  for k in ("twin_images_per_s", "torch_images_per_s", "ratio_twin_over_torch",
            "ratio_ours_over_torch_per_flop", "torch_peak_memory_bytes"):
    if k in r:
      row[k] = r[k]
  if "ratio_twin_over_torch" in r:  # the goal: plain CLIP >= 1.5x open_clip img/s
    row["twin_speedup_over_open_clip"] = 1.0 / r["ratio_twin_over_torch"]
  return row


def attention_comparison(config, batch: int, steps: int, warmup: int) -> dict:
  """The config's step with attention xla and cudnn, timed interleaved."""
  config = config.copy_and_resolve_references()
  config.data.global_batch = batch
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  lengths = bench.CAPTION_LENGTHS["synthetic"]
  out, fns = {}, {}
  for impl in ATTENTION:
    if impl == "cudnn" and jax.default_backend() != "gpu":
      out[impl] = {"skipped": "cuDNN attention needs a GPU"}
      continue
    c = config.copy_and_resolve_references()
    c.attn_implementation = impl
    try:
      fn = bench.JaxTrainStep(c, mesh, caption_lengths=lengths)
      fn()  # a kernel that compiles may still fail when it runs
      fns[impl] = fn
    except Exception as e:  # pylint: disable=broad-except  # recorded per impl
      out[impl] = {"error": device_check.error_line(e)}
  peak = flops_lib.peak_tflops_for(mesh.devices.flat[0].device_kind)
  for impl, times in bench.time_interleaved(fns, warmup, steps).items():
    s, fn = bench.summarize(times), fns[impl]
    achieved = fn.analytic_flops / s["median"] / 1e12
    out[impl] = {"step_ms": s["median"] * 1e3, "step_time_s": s,
                 "images_per_s": batch / s["median"], "compile_s": fn.compile_s,
                 "text_lengths": list(fn.text_lengths),
                 "mfu": achieved / (peak * mesh.size) if peak else None,
                 "xla_memory_plan_per_device": fn.memory_breakdown}
  if all(i in fns for i in ATTENTION):
    out["ratio_cudnn_over_xla"] = (out["cudnn"]["step_ms"] / out["xla"]["step_ms"])
  out["ok"] = "xla" in fns and not any("error" in out.get(i, {}) for i in ATTENTION)
  return out


def run_bench(results: device_check.Results, smoke: bool) -> bool:
  sizes_ = SMOKE_BENCH if smoke else GPU_BENCH
  results.put("settings", dict(sizes_, caption_lengths="synthetic", eval_steps=0,
                               note="peak_memory_bytes is the process' high-water "
                               "mark so far (runs share one process, in order); "
                               "the XLA plan is per run"))
  ok = True
  for run in BENCH_RUNS:
    if smoke and run.name not in SMOKE_BENCH_RUNS:
      continue
    config = config_base.load_config_file(run.config)
    if smoke:
      config = smoke_sized(config)

    def one(run=run, config=config):
      if run.attention:
        return attention_comparison(config, sizes_["batch"], sizes_["steps"],
                                    sizes_["warmup"])
      r = bench.run_benchmark(config, batch=sizes_["batch"], steps=sizes_["steps"],
                              warmup=sizes_["warmup"], compare_torch=run.torch,
                              eval_steps=0, config_name=run.config,
                              caption_lengths=bench.CAPTION_LENGTHS["synthetic"])
      return {"ok": True, "row": bench_row(r), "table": bench.format_table(r),
              "result": r}

    ok &= check(results, run.name, one)
    gc.collect()
    jax.clear_caches()
  return ok


# ----------------------------------------------------------------------------
# ablate.

DISCRIMINATIVE = "discriminative"
STEPS_FACTOR = 4
RUN_BUDGET = "device_check"            # the budget's name in this process only


def ablate_budget(smoke: bool) -> Tuple[Optional[Any], str]:
  """(Budget, note) to run, or (None, why not)."""
  known = sorted(ablate.BUDGETS)
  if smoke:  # the runner's code at the smallest size, whatever budgets exist
    return dataclasses.replace(ablate.BUDGETS["small"], pretrain_steps=1,
                               finetune_steps=1, batch=8, train_num=16,
                               eval_num=8, eval_batch=8), "smoke size"
  if DISCRIMINATIVE not in ablate.BUDGETS:
    return None, (f"tools/ablate.py has no budget '{DISCRIMINATIVE}' (has: "
                  f"{', '.join(known)})")
  base = ablate.BUDGETS[DISCRIMINATIVE]
  steps = {k: STEPS_FACTOR * getattr(base, k)
           for k in ("pretrain_steps", "finetune_steps") if hasattr(base, k)}
  if not steps:
    return base, f"'{DISCRIMINATIVE}' as is (no step knob to scale)"
  return dataclasses.replace(base, **steps), f"'{DISCRIMINATIVE}' at {STEPS_FACTOR}x steps"


def run_ablate(results: device_check.Results, smoke: bool, scratch: str) -> bool:
  results.put("budgets_known", sorted(ablate.BUDGETS))
  budget, note = ablate_budget(smoke)
  if budget is None:
    log(f"ablate: skipped: {note}")
    results.put("skipped", note)
    return True
  results.put("budget", dict(dataclasses.asdict(budget), note=note))
  ablate.BUDGETS[RUN_BUDGET] = budget
  workdir = os.path.join(scratch, "ablate")
  # The smoke fine-tunes the cheapest variant (plain CLIP at 248 tokens);
  # tests/ablate_test.py runs every variant.
  names = [v[0] for v in ablate.VARIANTS]
  first = [n for n in ("clip248", "fixclip") if n in names]  # the headline pair
  variants = ("clip248",) if smoke else tuple(first + [n for n in names
                                                      if n not in first])
  ok = True
  for name in variants:
    def one(name=name):
      summary = ablate.run_ablation(workdir, RUN_BUDGET, seeds=(0,), variants=[name])
      results.put("table", ablate.markdown(summary))
      return {"ok": True, "runs": summary["runs"],
              "wall_seconds": summary["wall_seconds"]}
    ok &= check(results, f"variant_{name}", one)
  return ok


# ----------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS
PARTS = {"gpu_tests": lambda r, smoke, scratch: run_gpu_tests(r, smoke),
         "bench": lambda r, smoke, scratch: run_bench(r, smoke),
         "ablate": run_ablate}


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_enum("part", None, sorted(PARTS), "The part to run.")
  flags.DEFINE_string("result", None, "Where its results go (JSON).")
  flags.DEFINE_string("scratch", None, "A folder for its files (default a "
                      "temporary one).")
  flags.DEFINE_bool("cpu-smoke", False, "Tiny models, batch 8, 2 steps.")
  flags.mark_flags_as_required(["part", "result"])


def main(argv):
  cli.reject_positional_arguments(argv)
  device_check.exit_with_parent()
  results = device_check.Results(FLAGS.result)
  scratch = FLAGS.scratch or tempfile.mkdtemp(prefix="device_parts_")
  smoke = FLAGS["cpu-smoke"].value
  results.put("backend", jax.default_backend())
  try:
    ok = PARTS[FLAGS.part](results, smoke, scratch)
  except Exception as e:  # pylint: disable=broad-except  # one line for the summary
    results.put("error", device_check.error_line(e))
    traceback.print_exc()
    ok = False
  # Without waiting for threads the libraries leave behind (checkpoint
  # writers, data workers): the results are on disk, the part is done.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0 if ok else 1)  # pylint: disable=protected-access


if __name__ == "__main__":
  define_flags()
  cli.run(main)
