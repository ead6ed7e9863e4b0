"""Scalar metrics: a JSON-lines file, TensorBoard events and, optionally,
Weights & Biases (process 0 only).

  WORKDIR/metrics.jsonl   {"step": N, name: value, ...} per logged step
  WORKDIR/tensorboard/    the same scalars; the run's config as text ("config")
W&B logging is off unless config.wandb.project is set (then `wandb` must be
installed; it is imported only in that case).
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from fixclip_jax import fileio

WANDB_MODES = ("online", "offline")  # config.wandb.mode, wandb.init(mode=...)

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tensorboard"
# tensorboardX's queue of pending events. Its default (10) is less than one
# row of scalars, so add_scalar waited on the writer thread mid-row, and a
# thread that died then (a full disk) left it waiting forever: the check
# before each row cannot see a death inside the row. A row never fills this.
TB_MAX_QUEUE = 100_000


def flatten_config(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """{"optim.lr": 1e-3, ...}: every knob of a config (or nested dict) by its
  dotted name."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        visit(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  visit(tree, "")
  return flat


def config_markdown(hparams: Mapping[str, Any]) -> str:
  """Knobs by dotted name (flatten_config) as a two-column markdown table
  (TensorBoard's text tab)."""
  rows = [f"| {k} | {v!r} |" for k, v in sorted(hparams.items())]
  return "\n".join(["| knob | value |", "|---|---|"] + rows)


def _start_wandb(options: ml_collections.ConfigDict, hparams: Mapping[str, Any],
                 workdir: str):
  """A W&B run (options: the run config's `wandb` block) recording hparams
  (optional dependency, imported only here)."""
  import wandb  # pylint: disable=g-import-not-at-top  # optional: only with config.wandb.project
  return wandb.init(
      project=options.project, entity=options.entity or None,
      name=options.name or os.path.basename(os.fspath(workdir).rstrip("/")),
      mode=options.mode, config=dict(hparams), resume="allow",
      dir=workdir if not fileio.is_url(workdir) else None)


class MetricWriter:
  """Writes {name: scalar} per step to `metrics.jsonl`, TensorBoard and W&B.

  hparams: the run's knobs by dotted name (flatten_config(config)): they go
  to TensorBoard as text and to the W&B run. wandb: the run config's `wandb`
  block; a W&B run starts when its `project` is set.
  """

  def __init__(self, workdir: str, tensorboard: bool = True,
               hparams: Optional[Mapping[str, Any]] = None,
               wandb: Optional[ml_collections.ConfigDict] = None):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._wandb = None
    if not self.enabled:
      return
    self._workdir = workdir
    directory = fileio.path(workdir)  # local path or gs:// URL
    directory.mkdir(parents=True, exist_ok=True)
    # Appended line by line (not rewritten), so not through fileio's atomic writes.
    self._file = (directory / METRICS_FILE).open("a")
    if tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, TB_SUBDIR),
                               max_queue=TB_MAX_QUEUE)
    if hparams is not None and self._tb is not None:
      self._tb.add_text("config", config_markdown(hparams), 0)
    if wandb is not None and wandb.project:
      self._wandb = _start_wandb(wandb, hparams or {}, workdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **row}) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._check_tensorboard()
      for k, v in row.items():
        self._tb.add_scalar(k.replace("@", "_at_"), v, int(step))  # TB: no '@'
    if self._wandb is not None:
      self._wandb.log(row, step=int(step))
    logging.info("step %d: %s", step,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))

  def _tensorboard_alive(self) -> bool:
    """Whether tensorboardX's event-writing thread still runs. It dies on
    the first failed write (a full disk) and leaves a bounded queue that
    nobody empties: the next add_scalar calls would then block forever (the
    trainer hung at a disk-full spell instead of stopping; BENCHMARKS.md
    "Soak"). Private attributes, read defensively: True when unknown."""
    try:
      worker = self._tb._get_file_writer().event_writer._worker  # pylint: disable=protected-access
    except AttributeError:
      return True
    return worker.is_alive()

  def _check_tensorboard(self) -> None:
    if not self._tensorboard_alive():
      directory = os.path.join(self._workdir, TB_SUBDIR)
      self._tb = None                  # close() must not wait on it either
      raise OSError(f"Writing TensorBoard events in {directory} failed (its "
                    "writer thread stopped; is the disk full?)")

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None and self._tensorboard_alive():
        self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def read_metrics(workdir: str) -> List[Dict[str, float]]:
  """The rows of WORKDIR/metrics.jsonl, one per step (a step logged twice, as
  after a resume, keeps its last row), in step order. [] when there is none."""
  path = fileio.path(workdir) / METRICS_FILE
  if not fileio.exists(path):
    return []
  rows = {}
  for number, line in enumerate(fileio.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash: skip it
      logging.warning("%s line %d is not JSON; skipped", path, number)
      continue
    # Training and evaluation rows of one step are merged.
    rows.setdefault(int(row["step"]), {}).update(row)
  return [rows[s] for s in sorted(rows)]


def drop_rows_after(workdir: str, step: int) -> int:
  """Cuts WORKDIR/metrics.jsonl back to the rows of steps <= `step`, the step
  a run resumes from: the rows a run killed after its last checkpoint wrote
  for later steps would stand next to the resumed run's rows of those steps.
  The rows kept stay byte for byte; a last line cut short (no newline: killed
  mid-write) goes too, or the next row would be appended to it. The file is
  replaced atomically. Returns the number of lines cut."""
  path = fileio.path(workdir) / METRICS_FILE
  if not fileio.exists(path):
    return 0
  lines = path.read_bytes().splitlines(keepends=True)
  kept = [line for line in lines
          if line.endswith(b"\n") and not _row_after(line, step)]
  if len(kept) < len(lines):
    fileio.atomic_write(path, b"".join(kept))
  return len(lines) - len(kept)


def _row_after(line: bytes, step: int) -> bool:
  try:
    return int(json.loads(line)["step"]) > step
  except (ValueError, KeyError, TypeError):  # not a row: left as it is
    return False
