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

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tensorboard"


def flatten_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """{"optim.lr": 1e-3, ...}: every knob by its dotted name."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        visit(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  visit(config, "")
  return flat


def config_markdown(config: ml_collections.ConfigDict) -> str:
  """The config as a two-column markdown table (TensorBoard's text tab)."""
  rows = [f"| {k} | {v!r} |" for k, v in sorted(flatten_config(config).items())]
  return "\n".join(["| knob | value |", "|---|---|"] + rows)


def _start_wandb(config: ml_collections.ConfigDict, workdir: str):
  """A W&B run for config.wandb (optional dependency, imported only here)."""
  import wandb  # pylint: disable=g-import-not-at-top  # optional: only with config.wandb.project
  return wandb.init(
      project=config.wandb.project, entity=config.wandb.entity or None,
      name=config.wandb.name or os.path.basename(os.fspath(workdir).rstrip("/")),
      mode=config.wandb.mode, config=flatten_config(config), resume="allow",
      dir=workdir if not fileio.is_url(workdir) else None)


class MetricWriter:
  """Writes {name: scalar} per step to `metrics.jsonl`, TensorBoard and W&B.

  With a `config`, its knobs go to TensorBoard as text and, when
  config.wandb.project is set, to a W&B run.
  """

  def __init__(self, workdir: str, tensorboard: bool = True,
               config: Optional[ml_collections.ConfigDict] = None):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._wandb = None
    if not self.enabled:
      return
    directory = fileio.path(workdir)  # local path or gs:// URL
    directory.mkdir(parents=True, exist_ok=True)
    # Appended line by line (not rewritten), so not through fileio's atomic writes.
    self._file = (directory / METRICS_FILE).open("a")
    if tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, TB_SUBDIR))
    if config is not None:
      if self._tb is not None:
        self._tb.add_text("config", config_markdown(config), 0)
      if config.get("wandb") and config.wandb.project:
        self._wandb = _start_wandb(config, workdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **row}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        self._tb.add_scalar(k.replace("@", "_at_"), v, int(step))  # TB: no '@'
    if self._wandb is not None:
      self._wandb.log(row, step=int(step))
    logging.info("step %d: %s", step,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
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
