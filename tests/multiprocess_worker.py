"""One process of the multi-process training test (tests/multiprocess_test.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT.json
  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT.json \
      --lock=WORKDIR

Runs 5 train steps of the tiny FIX-CLIP on a fixed global batch of which this
process feeds its own rows, and writes the losses seen; or, with --lock, takes
WORKDIR's run lock as a multi-process run does and writes the outcome.
"""
import json
import os
import sys


def lock_main(workdir, out):
  """Takes WORKDIR's run lock (process 0 locks, the others learn the outcome)."""
  from fixclip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    checkpoint.WorkdirLock(workdir).acquire()
    outcome = "locked"
  except checkpoint.WorkdirLockedError as e:
    outcome = f"refused: {e}"
  with open(out, "w") as f:
    json.dump({"outcome": outcome, "pid": os.getpid()}, f)


def main(process_id, num_processes, port, local_devices, out, lock=None):
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if lock is not None:
    return lock_main(lock, out)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fixclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from fixclip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from fixclip_jax.models import sizes  # pylint: disable=g-import-not-at-top
  from tests import train_test  # pylint: disable=g-import-not-at-top

  config = train_test.demo_config()
  cfg = sizes.model_config(config)
  mesh = sharding.make_mesh()
  model = step_lib.make_model(config, cfg)
  state, shardings, tx = step_lib.init_state(config, model, mesh)
  step_fn = None
  losses = []
  global_rows = 8
  rows = global_rows // num_processes
  for step in range(5):
    full = train_test.random_batch(cfg, global_rows, seed=step)
    mine = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in full.items()}
    batch = sharding.global_batch(mine, mesh)
    if step_fn is None:
      step_fn = step_lib.jit_train_step(
          step_lib.make_train_step(config, model, tx),
          mesh, shardings, batch)
    state, metrics = step_fn(state, batch)
    losses.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  with open(out, "w") as f:
    json.dump({"losses": losses, "devices": jax.device_count(),
               "processes": jax.process_count()}, f)


if __name__ == "__main__":
  lock_flag = [a[len("--lock="):] for a in sys.argv[6:] if a.startswith("--lock=")]
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
       sys.argv[5], lock=lock_flag[0] if lock_flag else None)
