"""PyTorch and safetensors files: reading (never an arbitrary unpickle) and
writing flat {key: array} state dicts. No key names of any layout live here
(layouts.py has them); loader.py and convert.py read and write through this.

Reading: .pt/.pth/.bin with `torch.load(weights_only=True)` (the [torch]
extra), refusing pickles of Python objects and TorchScript archives with a
one-line way out; .safetensors without torch (bfloat16 upcast exactly);
a Hugging Face save_pretrained directory's weight files, sharded or not.
Floats come back as float32 numpy arrays.
"""
import io
import json
import os
import pickle
import struct
import warnings
from typing import Dict, Tuple

from absl import logging
import numpy as np
from safetensors import numpy as safetensors_numpy

from fixclip_jax import fileio

StateDict = Dict[str, np.ndarray]

# Scalar (non-tensor) entries OpenAI's state dicts carry (the JIT archives'
# metadata); every other entry must be a tensor.
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")

TORCH_EXTRA = "pip install 'fixclip_jax[torch]'"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model."""


def require_torch(purpose: str):
  """The torch module, or a CheckpointError (one line at the CLI) naming the
  extra that installs it: the base install has no PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: PyTorch files only
  except ImportError as e:
    raise CheckpointError(
        f"{purpose} needs PyTorch, which is not installed: {TORCH_EXTRA} "
        "(.safetensors files and HF directories need no torch)") from e
  return torch


# ---------------------------------------------------------------------------
# Reading PyTorch files.

def _tensor_to_numpy(t):
  t = t.detach().cpu()
  if t.is_floating_point():
    t = t.float()  # numpy has no bfloat16; our params are float32 anyway
  return t.numpy()


def _local_or_bytes(path: str):
  """A local path as it is (torch maps it); a URL's bytes in memory."""
  return io.BytesIO(fileio.path(path).read_bytes()) if fileio.is_url(path) else path


def _refused_unpickle(path: str, detail: str) -> CheckpointError:
  return CheckpointError(
      f"{path}: refused: this file needs an arbitrary unpickle (it holds Python "
      f"objects, not only tensors: {detail}), which could run any code. If you "
      "trust it, convert it with python -c \"import torch; m = torch.load("
      f"'{path}', weights_only=False); torch.save(m.state_dict() if "
      "hasattr(m, 'state_dict') else m['state_dict'], 'weights.pt')\" or "
      "re-save with torch.save(state_dict) where it was made, then pass that "
      "file.")


def _torch_load(path: str):
  torch = require_torch(f"{path}: reading a PyTorch file")
  try:
    with warnings.catch_warnings():  # torch's notes on pickle protocols and
      warnings.simplefilter("ignore", UserWarning)  # TorchScript: errors say it
      return torch.load(_local_or_bytes(path), map_location="cpu",
                        weights_only=True)
  except pickle.UnpicklingError as e:
    msg = str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or
                   "Unsupported" in line), lines[0] if lines else msg)
    corrupt = any(w in msg for w in ("truncated", "EOF", "ran out of input"))
    if "Weights only load failed" in msg and not corrupt:
      raise _refused_unpickle(path, detail) from e
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {detail}") from e
  except RuntimeError as e:
    if "TorchScript" in str(e):  # OpenAI's original .pt files
      raise CheckpointError(
          f"{path}: refused: a TorchScript archive (OpenAI's original .pt "
          "files); loading it runs its code. If you trust it, convert it with "
          "python -c \"import torch; torch.save(torch.jit.load("
          f"'{path}', map_location='cpu').state_dict(), 'weights.pt')\", "
          "then pass that file.") from e
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e
  except Exception as e:  # zip/EOF/… errors of a truncated or foreign file
    raise CheckpointError(f"{path}: could not read the checkpoint (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e


# safetensors dtype names -> numpy; BF16 has no numpy dtype (read as uint16,
# upcast to float32 by bit shift: exact).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_}


def _safetensors_header(data: bytes, path: str) -> Tuple[dict, int]:
  """(header {key: {dtype, shape, data_offsets}}, offset of the tensor bytes)."""
  if len(data) < 8:
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): {len(data)} bytes")
  (size,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + size])
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): bad header ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          "(truncated or corrupt?): its header is a JSON "
                          f"{type(header).__name__}, not an object of tensors")
  header.pop("__metadata__", None)
  for key, info in header.items():
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
      raise CheckpointError(f"{path}: could not read the safetensors file "
                            f"(truncated or corrupt?): header entry {key!r} is "
                            "not {dtype, shape, data_offsets}")
  return header, 8 + size


def _safetensors_raw(data: bytes, header: dict, base: int, path: str
                     ) -> StateDict:
  """Tensors from their raw bytes (bfloat16 upcast to float32)."""
  out = {}
  for key, info in header.items():
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    raw = data[base + begin:base + end]
    bf16 = info["dtype"] == "BF16"
    if not bf16 and info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {key!r} has dtype "
                            f"{info['dtype']}, which is not read")
    dtype = np.dtype("<u2" if bf16 else _SAFETENSORS_DTYPES[info["dtype"]])
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"{path}: could not read the safetensors file "
                            f"(truncated or corrupt?): tensor {key!r} has "
                            f"{len(raw)} bytes for shape {shape}")
    array = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    out[key] = ((array.astype(np.uint32) << 16).view(np.float32) if bf16
                else array)
  return out


def _safetensors_load(path: str) -> StateDict:
  """A .safetensors file without torch: safetensors.numpy, or the raw bytes
  when it holds bfloat16 tensors (which numpy lacks). Floats -> float32."""
  data = fileio.path(path).read_bytes()
  header, base = _safetensors_header(data, path)
  try:
    if any(info.get("dtype") == "BF16" for info in header.values()):
      tensors = _safetensors_raw(data, header, base, path)
    else:
      tensors = safetensors_numpy.load(data)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a corrupt file
    raise CheckpointError(f"{path}: could not read the safetensors file "
                          f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
  return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating)
          else np.asarray(v) for k, v in tensors.items()}


def _unwrap(obj, path: str) -> StateDict:
  """torch.load result -> flat {key: array}: nested state_dict, module. prefix."""
  torch = require_torch(f"{path}: reading a PyTorch file")
  if isinstance(obj, dict):
    for wrapper in ("state_dict", "model_state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        logging.info("%s: using the state dict nested under %r", path, wrapper)
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  sd = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      sd[k] = _tensor_to_numpy(v)
    elif isinstance(v, (int, float)) and k in OPENAI_SCALARS:
      sd[k] = np.asarray(v)
    else:
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
  return sd


def read_state_dict(path: str) -> StateDict:
  """A .pt/.pth/.bin/.safetensors file -> {key: numpy array} (floats as float32)."""
  if not fileio.isfile(path):
    raise FileNotFoundError(f"No such checkpoint file: {path}")
  if path.endswith(".safetensors"):
    sd = _safetensors_load(path)
  else:
    sd = _unwrap(_torch_load(path), path)
  if sd and all(k.startswith("module.") for k in sd):
    logging.info("%s: stripping the 'module.' prefix (DDP)", path)
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def read_hf_weights(directory: str) -> StateDict:
  """The weights of a save_pretrained directory (single or sharded)."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(directory, index_name)
    if fileio.isfile(index):
      try:
        weight_map = json.loads(fileio.read_text(index))["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in shards):
          raise TypeError("a shard name is not a string")
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{index}: not a valid index of weight files ({type(e).__name__}:"
            f" {e}; expected {{\"weight_map\": {{key: file name}}}})") from None
      sd = {}
      for shard in shards:
        sd.update(read_state_dict(os.path.join(directory, shard)))
      return sd
  for name in ("model.safetensors", "pytorch_model.bin"):
    if fileio.isfile(os.path.join(directory, name)):
      return read_state_dict(os.path.join(directory, name))
  raise CheckpointError(f"{directory}: HF directory has config.json but no "
                        "model.safetensors / pytorch_model.bin")


# ---------------------------------------------------------------------------
# Writing.

def write_tensors(path: str, sd: StateDict, as_safetensors: bool) -> None:
  """One local file: safetensors, or torch.save of a plain dict of tensors."""
  if as_safetensors:
    # Written by us rather than save_file, which leaves files 0600: ours get
    # the mode fileio gave the temporary file (0644 under the usual umask).
    with open(path, "wb") as f:
      f.write(safetensors_numpy.save(sd, metadata={"format": "pt"}))
  else:
    torch = require_torch(f"{path}: writing a .pt file")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
