"""Training and evaluation runs: the loop around the train step (step.py).

host batches (data/pipeline.py) -> global batch on the mesh -> jitted step ->
metrics, periodic evaluation (evaluation/run.py) and checkpoints
(checkpoint.py); init_from through pretrained.py. Resume is automatic.
"""
import functools
import json
import os
import signal
import time
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fixclip_jax import buckets
from fixclip_jax import checkpoint
from fixclip_jax import fileio
from fixclip_jax import flops
from fixclip_jax import metrics as metrics_lib
from fixclip_jax import pretrain77
from fixclip_jax import pretrained
from fixclip_jax import sharding
from fixclip_jax import step as step_lib
from fixclip_jax.data import pipeline
from fixclip_jax.data import tokenizers
from fixclip_jax.evaluation import report
from fixclip_jax.evaluation import run as eval_run
from fixclip_jax.models import clip
from fixclip_jax.models import sizes

TrainState = step_lib.TrainState
CONFIG_FILE = "config.json"
# config.pretrain77: the 77-token start's workdir in WORKDIR, its initial
# weights in there, and its name in WORKDIR's results.
PRETRAIN77_SUBDIR = "pretrain77"
START_MODEL_SUBDIR = "start_model"
START_MODEL_LABEL = "CLIP-77 (start)"


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  The loop then saves synchronously and returns; worst-case stop time: the
  step computing when the signal comes and the one queued behind it (the
  loop keeps at most one step queued), plus one synchronous save. Waiting for
  a batch is given up at once (polled every 0.1 s: a stuck read never holds
  the stop up), and the pipeline's threads are released on the way out. A
  second signal gets the default action: the process ends at once, even
  inside a long compile or a stuck save.
  """

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
    logging.warning("Signal %d: saving a checkpoint and stopping (a second "
                    "signal ends the process at once).", signum)
    self.requested = True
    for sig in self._previous:
      signal.signal(sig, signal.SIG_DFL)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ----------------------------------------------------------------------------
# Divergence: updates skipped for NaN/Inf (step.py) many times in a row.

class DivergenceError(ValueError):
  """config.optim.max_skipped_updates updates in a row were skipped."""
  exit_code = 3  # cli.run: a run that stopped itself, told apart from usage errors


class DivergenceWatch:
  """Counts consecutive skipped updates from the step's metrics (read one
  step late, when the loop waits for that step anyway) and remembers the
  last finite loss."""

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0
    self.first_skipped = 0
    self.last_finite: Optional[tuple] = None  # (step, loss)

  def observe(self, step: int, loss, skipped) -> bool:
    """True when the run should stop (the limit reached)."""
    loss, skipped = float(jax.device_get(loss)), int(jax.device_get(skipped))
    if np.isfinite(loss):
      self.last_finite = (step, loss)
    if not skipped:
      self.streak = 0
      return False
    self.streak += 1
    if self.streak == 1:
      self.first_skipped = step
    return bool(self.limit) and self.streak >= self.limit

  def error(self, config, step: int, workdir: str) -> DivergenceError:
    saved = checkpoint.saved_steps(workdir)
    kept = (f"The newest checkpoint, step {saved[-1]}, is kept in "
            f"{os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_SUBDIR)} "
            "(skipped updates change nothing)" if saved else
            "No checkpoint was saved")
    last = ("no finite loss in this run" if self.last_finite is None else
            f"last finite loss {self.last_finite[1]:.4f} at step "
            f"{self.last_finite[0]}")
    o = config.optim
    return DivergenceError(
        f"The run diverged: stopped at step {step} after {self.streak} updates "
        f"in a row were skipped for NaN/Inf (steps {self.first_skipped}-{step};"
        f" config.optim.max_skipped_updates={self.limit}); {last}. {kept}. "
        f"Try a lower --config.optim.lr (now {o.lr:g}), a longer "
        f"--config.optim.warmup_steps (now {o.warmup_steps}), gradient "
        f"clipping (--config.optim.grad_clip, now {o.grad_clip:g}) or "
        "--config.dtype=float32, then rerun the same command to resume "
        "(--config.resume_step=N: an earlier step).")


# ----------------------------------------------------------------------------
# The loop.

def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in ("image", "text_long", "text_short")}


def _write_config_copy(config, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config of this run (process 0)."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(fileio.path(workdir) / CONFIG_FILE,
                      config.to_json_best_effort(indent=2))


def _say(message: str) -> None:
  """A line for the user: stdout on process 0, and the log file."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


def _restore(config, workdir, manager, model, mesh, train_iter):
  """The train state at config.resume_step (0: the latest saved step).

  Going back to an earlier step deletes the later checkpoints once the state
  is restored: orbax cannot save a step that exists, and would skip saves of
  steps below its latest.
  """
  steps = manager.all_steps()
  step = config.resume_step or manager.latest_step()
  if step not in steps:
    raise ValueError(f"config.resume_step={config.resume_step}: no such "
                     f"checkpoint in {manager.directory} (saved steps: "
                     f"{sorted(steps) or 'none'})")
  abstract, shardings, tx = step_lib.abstract_state(config, model, mesh)
  # The latest step falls back to the newest older one that restores (the
  # broken ones are moved aside, never deleted); a requested step does not.
  state, step = checkpoint.restore_newest(manager, abstract, train_iter,
                                          newest=step,
                                          fallback=not config.resume_step)
  # Only steps of this workdir's earlier runs can be later (the workdir is
  # locked: no other run writes here now); named before they go.
  later = sorted(s for s in manager.all_steps() if s > step)
  if later:
    logging.warning("Resuming at step %d (config.resume_step): deleting the "
                    "later checkpoints %s of an earlier run in %s (orbax "
                    "cannot save over them)", step, later, manager.directory)
  for s in later:
    manager.delete(s)
  if later:
    _say(f"Deleted the checkpoints after step {step}: {later}")
  if jax.process_index() == 0:  # the steps after `step` are logged again
    cut = metrics_lib.drop_rows_after(workdir, step)
    if cut:
      logging.info("Cut %d line(s) after step %d from %s", cut, step,
                   metrics_lib.METRICS_FILE)
  _say(f"Resumed from {workdir} at step {step}")
  return state, shardings, tx


def _sum_over_hosts(counts: np.ndarray) -> np.ndarray:
  """Per-host counters summed over all processes (a collective: call on all)."""
  if jax.process_count() == 1:
    return counts
  return np.asarray(multihost_utils.process_allgather(counts)).sum(0)


def _progress(step: int, total: int, step_time: float, metrics: dict,
              first: bool = False) -> str:
  """One concise stdout line: step, loss, speed, ETA (none after a run's
  first step, whose time is mostly compilation)."""
  terms = " ".join(f"{k[5:]}={metrics[k]:.3f}" for k in sorted(metrics)
                   if k.startswith("loss_"))
  line = (f"[{step}/{total}] loss={metrics['loss']:.4f} ({terms}) "
          f"{metrics['images_per_s']:.1f} img/s")
  if first:
    return line + " (first step: includes compilation)"
  eta = max(total - step, 0) * step_time
  return line + f", ETA {eta / 60:.1f} min"


def _say_changed_knobs(config, workdir: str) -> None:
  """A resume may change knobs (more steps, another lr); says which differ
  from WORKDIR/config.json, the record of the run that started the workdir."""
  path = fileio.path(workdir) / CONFIG_FILE
  if jax.process_index() != 0 or not fileio.isfile(path):
    return
  try:
    before = metrics_lib.flatten_config(json.loads(fileio.read_text(path)))
  except json.JSONDecodeError:
    return
  now = metrics_lib.flatten_config(json.loads(config.to_json_best_effort()))
  changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  if changed:
    _say(f"Resuming with {len(changed)} knob(s) changed from {path}: "
         + "; ".join(changed))


def _check_resume_step(config, workdir: str, resuming: bool) -> None:
  if not config.resume_step:
    return
  if not resuming:
    raise ValueError(f"config.resume_step={config.resume_step}: {workdir} "
                     "holds no training checkpoint")
  steps = checkpoint.saved_steps(workdir)
  if config.resume_step not in steps:
    raise ValueError(f"config.resume_step={config.resume_step}: no such "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}"
                     f" (saved steps: {steps})")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: bool = True,
                       on_start: Optional[Callable[[], None]] = None
                       ) -> TrainState:
  """Trains config.num_train_steps micro-steps, resuming from WORKDIR if it
  holds a checkpoint; evaluates every config.eval_every steps and at the end
  (and before the first step when config.eval_at_start).

  With config.pretrain77.steps > 0 (no pretrained CLIP at hand: the demo) a
  plain 77-token CLIP is trained first in WORKDIR/pretrain77
  (pretrain77.py) and the run starts from it as from init_from; its final
  evaluation joins WORKDIR's results as the model "CLIP-77 (start)", so the
  table compares the run with its 77-token starting point.

  Everything that can be wrong with the config, the data source, the
  workdir (another model, another process count) or init_from raises before
  anything is written; `on_start()` runs after those checks, before the
  first write (main.py opens its log file there). The workdir is locked
  (checkpoint.WorkdirLock) from then until the run ends: a second run on it
  stops with one line naming this one.
  """
  lock = checkpoint.WorkdirLock(workdir)

  def start():
    lock.acquire()
    if on_start is not None:
      on_start()

  try:
    return _train_and_evaluate_locked(config, workdir, evaluate, start, lock)
  finally:
    lock.release()


def _train_and_evaluate_locked(config, workdir: str, evaluate: bool,
                               on_start: Callable[[], None],
                               lock: checkpoint.WorkdirLock) -> TrainState:
  """train_and_evaluate's stages; `on_start` locks the workdir."""
  if config.get("pretrain77") and config.pretrain77.steps:
    start_dir = os.fspath(fileio.path(workdir) / PRETRAIN77_SUBDIR)
    if not checkpoint.has_train_checkpoint(workdir):  # the run has not begun
      lock.acquire()  # stage 1 writes its start model before its checks
      state, preempted = _pretrain77(config, start_dir, evaluate, on_start)
      if preempted:
        return state
      if evaluate and jax.process_index() == 0:
        steps = config.pretrain77.steps
        start_rows = [{k: v for k, v in r.items() if k not in ("model", "step")}
                      for r in report.read_results(start_dir) if r.get("step") == steps]
        report.write_report(workdir, start_rows, model=START_MODEL_LABEL, step=steps)
      on_start = None
      _say(f"Stage 2 of 2: {config.objective} at {config.model.context_length} "
           f"tokens from the 77-token start, {config.num_train_steps} steps")
    config = config.copy_and_resolve_references()
    config.init_from = start_dir
  return _train_and_evaluate(config, workdir, evaluate, on_start)[0]


def _pretrain77(config, start_dir: str, evaluate: bool, on_start):
  """Stage 1: config.pretrain77.steps of plain CLIP at 77 tokens in start_dir,
  from a start model with a smooth position table; (state, preempted)."""
  stage = pretrain77.clip77_config(config, config.pretrain77.steps,
                                   config.pretrain77.lr)
  stage.eval_at_start = False
  stage.eval_every = 0                    # once, at the end
  _say(f"Stage 1 of 2: plain CLIP at 77 tokens, {stage.num_train_steps} steps "
       f"(the start a pretrained CLIP would give; {start_dir})")
  stage.init_from = pretrain77.write_start_model(
      os.fspath(fileio.path(start_dir) / START_MODEL_SUBDIR), stage)
  return _train_and_evaluate(stage, start_dir, evaluate, on_start,
                             print_outcome=False)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        evaluate: bool = True,
                        on_start: Optional[Callable[[], None]] = None,
                        print_outcome: bool = True):
  """train_and_evaluate of one stage; (final state, stopped by a signal)."""
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
  # Batches come from a thread: a stuck read never holds up a stop; the
  # checkpointed data state includes the skip totals (they carry on).
  train_iter = pipeline.BackgroundBatches(
      pipeline.make_train_iterator(data_config, tokenizer))
  resuming = checkpoint.check_resume(workdir, cfg)
  _check_resume_step(config, workdir, resuming)
  params = None
  if config.init_from and not resuming:
    fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = pretrained.load_pretrained(config.init_from, cfg, fresh,
                                        logit_scale=config.init_logit_scale)

  if on_start is not None:
    on_start()
  if not resuming:  # the workdir's record of its checkpoints, written once
    _write_config_copy(config, workdir)
    checkpoint.write_workdir_model_config(workdir, cfg)  # convert --src=WORKDIR
    checkpoint.write_run_record(workdir)
  manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints,
                                          best_metric=config.checkpoint_best_metric)
  if resuming:  # restore into the abstract state
    _say_changed_knobs(config, workdir)
    state, shardings, tx = _restore(config, workdir, manager, model, mesh,
                                    train_iter)
  else:
    state, shardings, tx = step_lib.init_state(config, model, mesh, params)
  start = int(jax.device_get(state["step"]))

  writer = metrics_lib.MetricWriter(workdir, config=config)
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
  # Text cut to length buckets (buckets.py): exact, one compiled step per
  # bucket pair; FLOPs (for MFU) are those of the cut lengths.
  text_buckets = buckets.TextBuckets.from_config(config, cfg.eot_token_id)
  step_flops = functools.lru_cache(lambda lengths: flops.train_step_flops(
      config, lengths=lengths)["total"])
  window_flops = 0
  peak = 1e12 * (config.peak_tflops or
                 flops.peak_tflops_for(jax.devices()[0].device_kind) or 0.0)
  skipped = train_iter.skip_totals  # this host, since the run's first step
  images_per_step = config.data.global_batch
  eval_every = config.eval_every or config.num_train_steps
  timer_start, timer_steps = time.perf_counter(), 0
  step = start
  skipped_logged, last_logged = int(jax.device_get(state["num_skipped"])), start
  in_flight = None  # the previous step's (step, loss, skipped): one queued
  divergence = DivergenceWatch(config.optim.get("max_skipped_updates", 0))
  diverged = False
  preempted = False
  with PreemptionGuard() as guard, train_iter:
    while step < config.num_train_steps:
      host = train_iter.next(stop=lambda: guard.requested)
      if host is None:  # a signal while waiting for data (a read may be stuck)
        preempted = True
        if step not in manager.all_steps():
          checkpoint.save_train_state(manager, step, state, train_iter,
                                      metrics=eval_metrics or None, force=True,
                                      wait=True)
        logging.warning("Preempted at step %d while waiting for data: "
                        "checkpoint saved, exiting.", step)
        break
      skipped = train_iter.skip_totals
      host_batch = text_buckets(_host_batch(host))
      window_flops += step_flops(flops.batch_text_lengths(host_batch))
      batch = sharding.global_batch(host_batch, mesh)
      if train_step is None:
        train_step = step_lib.jit_train_step(step_fn, mesh, shardings, batch)
      state, metrics = train_step(state, batch)
      if in_flight is not None:  # waits for it: a signal stops within one step
        diverged = divergence.observe(*in_flight)
        if diverged:  # (the step just queued is not counted or saved)
          break
      in_flight = (step + 1, metrics["loss"], metrics["skipped"])
      step += 1
      timer_steps += 1
      # The first step of a run is logged too: a progress line right away
      # (its time includes compilation).
      if (step % config.log_every == 0 or step == config.num_train_steps or
          step == start + 1):
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - timer_start
        metrics["step_time_s"] = elapsed / timer_steps
        metrics["images_per_s"] = images_per_step * timer_steps / elapsed
        metrics["lr"] = float(step_lib.learning_rate_schedule(config.optim.lr, config)(
            step // config.optim.accum_steps))
        metrics["logit_scale"] = float(np.log(metrics["temperature"]))
        if peak:
          metrics["mfu"] = window_flops / elapsed / (peak * jax.device_count())
        for reason, count in zip(pipeline.SKIP_REASONS, _sum_over_hosts(skipped)):
          metrics[f"data/skipped_{reason}"] = int(count)
        cut = _sum_over_hosts(np.asarray([train_iter.truncated[k] for k in
                                          pipeline.TRUNCATION_COUNTS]))
        for name, count in zip(("truncated_long", "truncated_short", "examples"), cut):
          metrics[f"data/{name}"] = int(count)  # captions cut to their context
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
                          metrics, first=step == start + 1), flush=True)
        timer_start, timer_steps, window_flops = time.perf_counter(), 0, 0
      preempted = guard.requested or manager.reached_preemption(step)
      if evaluate and not preempted and (step % eval_every == 0 or
                                         step == config.num_train_steps):
        eval_metrics = run_eval(step)
      last = preempted or step == config.num_train_steps
      if step % config.checkpoint_every == 0 or last:
        checkpoint.save_train_state(manager, step, state, train_iter,
                                    metrics=eval_metrics or None, force=True,
                                    wait=last)
      checkpoint.check_saves(manager)  # a failed save stops the run at once
      if preempted:
        logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
        break
    if in_flight is not None and not diverged and not preempted:
      diverged = divergence.observe(*in_flight)  # the last step
  checkpoint.check_saves(manager, wait=True)
  writer.close()
  if diverged:
    raise divergence.error(config, step, workdir)
  if preempted:
    _say(f"Stopped by a signal at step {step}; its checkpoint is saved: rerun "
         "the same command to resume.")
  elif jax.process_index() == 0 and print_outcome:
    _print_outcome(workdir, evaluated=evaluate)
  return state, preempted


def _print_outcome(workdir: str, evaluated: bool) -> None:
  """The end of a run on the console: the eval table, plots, TensorBoard, report."""
  report.write_train_curves(workdir, metrics_lib.read_metrics(workdir))
  root = fileio.path(workdir)
  if evaluated:
    print(report.console_table(report.read_results(workdir)), end="")
  plots = [os.fspath(root / name) for name in
           (report.RECALL_PNG, report.HISTORY_PNG, report.TRAIN_PNG)
           if fileio.exists(root / name)]
  if plots:
    print("Plots: " + ", ".join(plots))
  print(f"TensorBoard: tensorboard --logdir={os.fspath(root / metrics_lib.TB_SUBDIR)}")
  if evaluated:
    print(f"Report: {os.fspath(root / report.MARKDOWN_NAME)}", flush=True)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        on_start: Optional[Callable[[], None]] = None) -> list:
  """--mode=eval: scores config.init_from, or WORKDIR's latest train state
  (config.resume_step: that step's). `on_start()` runs once the model is
  loaded, before the first write."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  cfg = sizes.model_config(config)
  model = step_lib.make_model(config, cfg)
  steps = checkpoint.saved_steps(workdir)  # read only: nothing created
  step = config.resume_step or (steps[-1] if steps else None)
  if not config.init_from and config.resume_step and step not in steps:
    raise ValueError(f"config.resume_step={step}: no such checkpoint in "
                     f"{workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR} (saved "
                     f"steps: {steps or 'none'})")
  if config.init_from:
    fresh = clip.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = pretrained.load_pretrained(config.init_from, cfg, fresh, logit_scale=0.0)
    params = jax.device_put(params, sharding.replicated(mesh))
  elif step is not None:
    checkpoint.check_resume(workdir, cfg, with_data=False)
    manager = checkpoint.make_train_manager(workdir, config.keep_checkpoints)
    abstract, _, _ = step_lib.abstract_state(config, model, mesh)
    state, step = checkpoint.restore_newest(manager, abstract, newest=step,
                                            fallback=not config.resume_step)
    params = state["params"]
  else:
    raise ValueError(f"--mode=eval needs --config.init_from or a training "
                     f"checkpoint in {workdir}/{checkpoint.TRAIN_CHECKPOINT_SUBDIR}")
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer,
                                       context_length=cfg.context_length)
  if on_start is not None:
    on_start()
  results = eval_run.evaluate(config, model, params, mesh, tokenizer,
                              workdir=workdir, step=step)
  if jax.process_index() == 0:
    print(report.console_table(report.read_results(workdir)), end="")
    print(f"Report: {os.fspath(fileio.path(workdir) / report.MARKDOWN_NAME)}",
          flush=True)
  return results
