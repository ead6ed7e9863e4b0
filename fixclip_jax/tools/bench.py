"""Train-step throughput, MFU and memory; eval embedding throughput; and a
same-run comparison with open_clip's PyTorch training step.

  python -m fixclip_jax.tools.bench --config=configs/demo.py --steps=20 --warmup=3 \
      [--batch=N] [--json=/tmp/bench.json] [--peak_tflops=989] [--torch] \
      [--config.objective=clip ...]

The state and the jitted step are built exactly as training builds them
(step.init_state, step.make_train_step, step.jit_train_step) on a synthetic
random batch of the config's shapes. Every step is timed on its own, up to
`jax.block_until_ready`, after `warmup` untimed steps; we report the median and
the 10th/90th percentiles. MFU = analytic FLOPs per step (flops.py's
convention) / median step time / (bf16 dense peak per device x devices).

With --torch the same model size is also trained by open_clip (random init,
AdamW, open_clip's ClipLoss, gradient clipping as ours; bf16 autocast on CUDA,
float32 on CPU) and our "plain CLIP twin" (the config with objective=clip and
no FIX-CLIP additions: the same work as open_clip's step). The three steps are
timed interleaved in one loop so that machine noise hits them alike, and the
table gives twin / open_clip step-time ratios (< 1 = we are faster).
"""
import datetime
import json
import os
import platform
import tempfile
import time
from typing import Any, Callable, Dict, Optional

from absl import app
from absl import flags
import flax
import jax
import jaxlib
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from fixclip_jax import fileio
from fixclip_jax import flops as flops_lib
from fixclip_jax import losses
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

NA = "n/a"


# ----------------------------------------------------------------------------
# Inputs and timing.

def synthetic_batch(config, cfg, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Random host batch with the data pipeline's shapes and dtypes.

  image float32 [B, S, S, 3]; text_long int32 [B, C]; text_short int32 [B, Cs]
  holding random ids, an EOT (the largest id) at a random length, zero padding.
  """
  rng = np.random.default_rng(seed)
  long_len, short_len = flops_lib.text_lengths(config)

  def texts(length):
    ids = rng.integers(1, cfg.vocab_size - 1, (batch, length), dtype=np.int32)
    ends = rng.integers(1, length, (batch,))                      # EOT position
    pos = np.arange(length)[None, :]
    ids = np.where(pos < ends[:, None], ids, 0)
    ids[np.arange(batch), ends] = cfg.vocab_size - 1
    return ids.astype(np.int32)

  return {"image": rng.standard_normal(
              (batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32),
          "text_long": texts(long_len), "text_short": texts(short_len)}


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
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return NA


# ----------------------------------------------------------------------------
# Our train step.

class JaxTrainStep:
  """The training step as training builds it (step.py), compiled once,
  callable in a loop."""

  def __init__(self, config, mesh, seed: int = 0):
    self.config = config
    self.cfg = sizes.model_config(config)
    self.model = step_lib.make_model(config, self.cfg)
    self.batch_size = int(config.data.global_batch)
    if self.batch_size % sharding.num_batch_shards(mesh):
      raise ValueError(f"config.data.global_batch={self.batch_size} is not divisible "
                       f"by the {sharding.num_batch_shards(mesh)} batch shards of "
                       f"mesh {dict(mesh.shape)}")
    self.state, shardings, tx = step_lib.init_state(config, self.model, mesh)
    step_fn = step_lib.make_train_step(config, self.model, tx,
                                       sharding.num_batch_shards(mesh))
    local = synthetic_batch(config, self.cfg, self.batch_size, seed)
    per_host = self.batch_size // jax.process_count()
    start = jax.process_index() * per_host
    self.host_batch = jax.tree.map(lambda x: x[start:start + per_host], local)
    self.batch = sharding.global_batch(self.host_batch, mesh)
    jitted = step_lib.jit_train_step(step_fn, mesh, shardings, self.batch)
    t0 = time.perf_counter()
    self.compiled = jitted.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops_per_device = _cost_flops(self.compiled)
    self.memory_plan = compiled_memory(self.compiled)
    self.metrics = None

  def __call__(self):
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))


def plain_clip_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's model size with objective=clip and no FIX-CLIP additions:
  one image pass + one long-text pass, the work of open_clip's CLIP step (the
  step runs only the branches the objective's spec reads: no short caption,
  no masked image)."""
  twin = config.copy_and_resolve_references()
  twin.objective = "clip"
  twin.model.num_prompts = 0
  twin.model.gta_groups = 0
  twin.model.mask_token = False
  return twin


# ----------------------------------------------------------------------------
# Eval embedding throughput.

def eval_throughput(step: JaxTrainStep, mesh, warmup: int, steps: int) -> dict:
  """images/s and texts/s of the forward towers (eval features) at the config's
  eval batch size and text context, on the trained state's params."""
  config, cfg, model = step.config, step.cfg, step.model
  n = sharding.num_batch_shards(mesh)
  batch = max(n, (int(config.eval.batch_size) // n) * n)
  host = synthetic_batch(config, cfg, batch, seed=1)
  images = sharding.global_batch(host["image"], mesh)
  texts = sharding.global_batch(host["text_long"], mesh)

  @jax.jit
  def image_fn(params, x):
    return clip.normalize(model.apply({"params": params}, x,
                                      method=clip.CLIP.encode_image)["embedding"])

  @jax.jit
  def text_fn(params, t):
    return clip.normalize(model.apply({"params": params}, t,
                                      method=clip.CLIP.encode_text)["embedding"])

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
  """open_clip CLIP of the same size: random init, AdamW, ClipLoss, grad clip."""

  def __init__(self, config, cfg, host_batch: dict, seed: int = 0):
    import open_clip  # pylint: disable=g-import-not-at-top  # optional: --torch only
    import torch  # pylint: disable=g-import-not-at-top  # optional: --torch only
    self.torch = torch
    torch.manual_seed(seed)
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"fixclip-bench-{os.getpid()}-{id(self)}"
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, name + ".json")
      with open(path, "w") as f:
        json.dump(open_clip_model_config(cfg), f)
      open_clip.add_model_config(path)
      self.model = open_clip.create_model(name, device=self.device, output_dict=True)
    self.model.train()
    o = config.optim
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
        weight_decay=o.weight_decay)
    self.grad_clip = o.grad_clip
    self.loss_fn = open_clip.ClipLoss()
    self.images = torch.from_numpy(
        np.ascontiguousarray(host_batch["image"].transpose(0, 3, 1, 2))).to(self.device)
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


def torch_comparison(config, ours: JaxTrainStep, mesh, warmup: int, steps: int) -> dict:
  """Interleaved timing of our step, our plain-CLIP twin and open_clip's step."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: --torch only
  twin_config = plain_clip_twin(config)
  twin = JaxTrainStep(twin_config, mesh)
  theirs = TorchTrainStep(twin_config, twin.cfg, twin.host_batch)
  times = time_interleaved({"ours": ours, "twin": twin, "torch": theirs},
                           warmup, steps)
  s = {k: summarize(v) for k, v in times.items()}
  twin_flops = flops_lib.train_step_flops(twin_config)["total"]
  ours_flops = flops_lib.train_step_flops(config)["total"]
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
                  config_name: str = "") -> dict:
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
  ours = JaxTrainStep(config, mesh)
  times = time_interleaved({"ours": ours}, warmup, steps)["ours"]
  step_time = summarize(times)
  peak_memory = device_peak_memory(mesh.devices.flat)
  b = ours.batch_size
  analytic = flops_lib.train_step_flops(config)
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
      "text_lengths": list(flops_lib.text_lengths(config)),
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
      "flops_convention": flops_lib.CONVENTION,
  }
  eval_steps = steps if eval_steps is None else eval_steps
  if eval_steps:
    result.update(eval_throughput(ours, mesh, warmup, eval_steps))
  if compare_torch:
    result.update(torch_comparison(config, ours, mesh, warmup, steps))
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
  ]
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
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
  if FLAGS.torch:
    # JAX's GPU client grabs 75% of the memory at start-up by default, which
    # would leave open_clip too little; read when the backend starts (below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  result = run_benchmark(FLAGS.config, batch=FLAGS.batch, steps=FLAGS.steps,
                         warmup=FLAGS.warmup, peak_tflops=FLAGS.peak_tflops,
                         compare_torch=FLAGS.torch, eval_steps=FLAGS.eval_steps,
                         json_path=FLAGS.json,
                         config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
  print(format_table(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
