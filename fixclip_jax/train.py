"""Training and evaluation runs: the loop around the train step (step.py).

host batches (data/pipeline.py) -> global batch on the mesh -> jitted step ->
metrics, periodic evaluation (evaluation/run.py) and checkpoints
(checkpoint.py); init_from through pretrained.py. Resume is automatic.
"""
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fixclip_jax import checkpoint
from fixclip_jax import fileio
from fixclip_jax import flops
from fixclip_jax import metrics as metrics_lib
from fixclip_jax import pretrained
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

TrainState = step_lib.TrainState


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, _frame):
    logging.warning("Signal %d: saving a checkpoint and stopping.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ----------------------------------------------------------------------------
# The loop.

def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in ("image", "text_long", "text_short")}


def _write_config_copy(config, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config of this run (process 0)."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(fileio.path(workdir) / "config.json",
                      config.to_json_best_effort(indent=2))


def _sum_over_hosts(counts: np.ndarray) -> np.ndarray:
  """Per-host counters summed over all processes (a collective: call on all)."""
  if jax.process_count() == 1:
    return counts
  return np.asarray(multihost_utils.process_allgather(counts)).sum(0)


def _progress(step: int, total: int, step_time: float, metrics: dict) -> str:
  """One concise stdout line: step, loss, speed, ETA."""
  eta = max(total - step, 0) * step_time
  terms = " ".join(f"{k[5:]}={metrics[k]:.3f}" for k in sorted(metrics)
                   if k.startswith("loss_"))
  return (f"[{step}/{total}] loss={metrics['loss']:.4f} ({terms}) "
          f"{metrics['images_per_s']:.1f} img/s, ETA {eta / 60:.1f} min")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: bool = True) -> TrainState:
  """Trains config.num_train_steps micro-steps, resuming from WORKDIR if it
  holds a checkpoint; evaluates every config.eval_every steps and at the end
  (and before the first step when config.eval_at_start)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("Devices: %s", sharding.describe(mesh))
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer,
                                       context_length=cfg.context_length)
  tokenizers.check_model_compatible(tokenizer, cfg.vocab_size, cfg.eot_token_id,
                                    "config.data.tokenizer / config.model")
  data_config = config.data.copy_and_resolve_references()
  if data_config.image_size != cfg.image_size:
    raise ValueError(f"config.data.image_size={data_config.image_size} but model "
                     f"{config.model_name} takes {cfg.image_size}px images")
  train_iter = pipeline.make_train_iterator(data_config, tokenizer)

  _write_config_copy(config, workdir)
  checkpoint.write_workdir_model_config(workdir, cfg)  # convert --src=WORKDIR
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints,
                                          best_metric=config.checkpoint_best_metric)
  if manager.latest_step() is not None:  # resume: restore into the abstract state
    abstract, shardings, tx = step_lib.abstract_state(config, model, mesh)
    state = checkpoint.restore_train_state(manager, abstract, train_iter)
    logging.info("Resumed from %s at step %d", workdir, int(state["step"]))
  else:
    params = None
    if config.init_from:
      fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
      params = pretrained.load_pretrained(config.init_from, cfg, fresh,
                                          logit_scale=config.init_logit_scale)
    state, shardings, tx = step_lib.init_state(config, model, mesh, params)
  start = int(jax.device_get(state["step"]))

  writer = metrics_lib.MetricWriter(workdir)
  eval_metrics = {}

  def run_eval(step):
    results = eval_run.evaluate(config, model, state["params"], mesh, tokenizer,
                                workdir=workdir, step=step)
    flat = eval_run.flat_metrics(results)
    writer.write(step, flat)
    return flat

  if evaluate and config.eval_at_start and start == 0:
    eval_metrics = run_eval(0)

  step_fn = step_lib.make_train_step(config, model, tx)
  train_step = None  # jitted on the first batch, whose structure it needs
  flops_per_step = flops.train_step_flops(config)["total"]
  peak = 1e12 * (config.peak_tflops or
                 flops.peak_tflops_for(jax.devices()[0].device_kind) or 0.0)
  skipped = np.zeros(len(pipeline.SKIP_REASONS), np.int64)  # this host, this run
  images_per_step = config.data.global_batch
  eval_every = config.eval_every or config.num_train_steps
  timer_start, timer_steps = time.perf_counter(), 0
  step = start
  skipped_logged, last_logged = int(jax.device_get(state["num_skipped"])), start
  with PreemptionGuard() as guard:
    while step < config.num_train_steps:
      host = next(train_iter)
      skipped += np.asarray(host["skipped"]).sum(0)
      batch = sharding.global_batch(_host_batch(host), mesh)
      if train_step is None:
        train_step = step_lib.jit_train_step(step_fn, mesh, shardings, batch)
      state, metrics = train_step(state, batch)
      step += 1
      timer_steps += 1
      if step % config.log_every == 0 or step == config.num_train_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - timer_start
        metrics["step_time_s"] = elapsed / timer_steps
        metrics["images_per_s"] = images_per_step * timer_steps / elapsed
        metrics["lr"] = float(step_lib.learning_rate_schedule(config.optim.lr, config)(
            step // config.optim.accum_steps))
        metrics["logit_scale"] = float(np.log(metrics["temperature"]))
        if peak:
          metrics["mfu"] = flops_per_step / metrics["step_time_s"] / (
              peak * jax.device_count())
        for reason, count in zip(pipeline.SKIP_REASONS, _sum_over_hosts(skipped)):
          metrics[f"data/skipped_{reason}"] = int(count)
        if metrics["skipped_total"] > skipped_logged:
          logging.warning(
              "%d update(s) skipped for NaN/Inf between steps %d and %d (this "
              "step: %d non-finite feature values); %d skipped in total",
              metrics["skipped_total"] - skipped_logged, last_logged + 1, step,
              int(metrics.get("nonfinite_features", 0)), metrics["skipped_total"])
          skipped_logged = int(metrics["skipped_total"])
        last_logged = step
        writer.write(step, metrics)
        if jax.process_index() == 0:
          print(_progress(step, config.num_train_steps, metrics["step_time_s"],
                          metrics), flush=True)
        timer_start, timer_steps = time.perf_counter(), 0
      preempted = guard.requested or manager.reached_preemption(step)
      if evaluate and not preempted and (step % eval_every == 0 or
                                         step == config.num_train_steps):
        eval_metrics = run_eval(step)
      if (step % config.checkpoint_every == 0 or preempted or
          step == config.num_train_steps):
        checkpoint.save_train_state(manager, step, state, train_iter,
                                    metrics=eval_metrics or None, force=True)
      if preempted:
        logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
        break
  manager.wait_until_finished()
  writer.close()
  return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> list:
  """--mode=eval: scores config.init_from, or WORKDIR's latest train state."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints)
  step = manager.latest_step()
  if config.init_from:
    fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = pretrained.load_pretrained(config.init_from, cfg, fresh, logit_scale=0.0)
    params = jax.device_put(params, sharding.replicated(mesh))
  elif step is not None:
    abstract, _, _ = step_lib.abstract_state(config, model, mesh)
    params = checkpoint.restore_train_state(manager, abstract)["params"]
  else:
    raise ValueError(f"--mode=eval needs --config.init_from or a training "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}")
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer,
                                       context_length=cfg.context_length)
  return eval_run.evaluate(config, model, params, mesh, tokenizer,
                           workdir=workdir, step=step)
