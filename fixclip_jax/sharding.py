"""The device mesh, parameter sharding rules and host -> global batches.

One home for distribution (DEVELOPERS.md): a `jax.sharding.Mesh` with axes
("data", "fsdp"), parameters sharded by regex rules (big_vision's
`sharding_strategy` idea) or by the FSDP default (the largest axis divisible by
the fsdp size, small tensors replicated), and batches split along both axes.
"""
import re
from typing import Any, Sequence, Tuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Tensors smaller than this stay replicated: sharding them saves nothing and
# costs a collective per use.
MIN_FSDP_SIZE = 2 ** 18


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 takes what the other axis leaves."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data/fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} != {n} devices")
  return jax.make_mesh((data, fsdp), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * 2)


def path_str(path) -> str:
  """'visual/transformer/resblocks_0/attn/in_proj/kernel' from a tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shards the largest axis divisible by the fsdp size; replicates small arrays."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_specs(params: Any, mesh: Mesh,
                rules: Sequence[Tuple[str, Any]] = ()) -> Any:
  """PartitionSpecs for a params-like tree: the first matching (regex, spec)
  rule wins (spec a tuple of axis names/None, or "replicate"), else FSDP."""
  fsdp_size = mesh.shape["fsdp"]
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def spec_for(path, leaf):
    name = path_str(path)
    shape = np.shape(leaf)
    for pattern, spec in compiled:
      if pattern.fullmatch(name):
        return P() if spec == "replicate" else P(*spec)
    return fsdp_spec(shape, fsdp_size)

  return jax.tree_util.tree_map_with_path(spec_for, params)


def shardings_for(tree: Any, mesh: Mesh, rules=()) -> Any:
  """NamedShardings for a params-like tree (scalars replicated)."""
  specs = param_specs(tree, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def state_shardings(state: Any, mesh: Mesh, rules=(), params_key: str = "params"
                    ) -> Any:
  """NamedShardings for a train state {params, opt_state, ...}.

  Rules match parameter paths as the params tree names them
  ("visual/transformer/resblocks_3/mlp/c_fc/kernel"), whatever the state
  calls the subtree. Optimizer leaves that mirror a parameter (Adam's moments,
  whose paths end with the parameter's path) get that parameter's spec, so
  moments live where their parameter lives; other leaves are replicated or
  FSDP-sharded by size.
  """
  param_spec = {path_str(p): (np.shape(x), s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(state[params_key])[0],
      jax.tree.leaves(param_specs(state[params_key], mesh, rules)))}
  fsdp_size = mesh.shape["fsdp"]

  def spec_for(path, leaf):
    keys = path_str(path).split("/")
    for start in range(len(keys)):
      match = param_spec.get("/".join(keys[start:]))
      if match is not None and match[0] == np.shape(leaf):
        return NamedSharding(mesh, match[1])
    return NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size))

  return jax.tree_util.tree_map_with_path(spec_for, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces the global batch is split into (PCM's per-device groups)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: Any, mesh: Mesh) -> Any:
  """This host's slice of the batch (numpy) -> global jax.Arrays on the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local)


def describe(mesh: Mesh) -> str:
  """One log line about the device layout."""
  d = jax.devices()
  return (f"process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local / {len(d)} global devices "
          f"({d[0].platform}: {d[0].device_kind}), mesh {dict(mesh.shape)}")
