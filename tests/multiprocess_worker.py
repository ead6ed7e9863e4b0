"""One process of the multi-process training test (tests/multiprocess_test.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT.json

Runs 5 train steps of the tiny FIX-CLIP on a fixed global batch of which this
process feeds its own rows, and writes the losses seen.
"""
import json
import os
import sys


def main(process_id, num_processes, port, local_devices, out):
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
       sys.argv[5])
