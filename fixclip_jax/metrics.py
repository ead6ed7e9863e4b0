"""Scalar metrics: a JSON-lines file and TensorBoard events (process 0 only)."""
import json
import os
from typing import Mapping

from absl import logging
import jax
import numpy as np
from tensorboardX import SummaryWriter

from fixclip_jax import fileio


class MetricWriter:
  """Writes {name: scalar} per step to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    directory = fileio.path(workdir)  # local path or gs:// URL
    directory.mkdir(parents=True, exist_ok=True)
    # Appended line by line (not rewritten), so not through fileio's atomic writes.
    self._file = (directory / "metrics.jsonl").open("a")
    if tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **row}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        self._tb.add_scalar(k.replace("@", "_at_"), v, int(step))  # TB: no '@'
    logging.info("step %d: %s", step,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
