"""The conversion CLI: any checkpoint we read -> orbax | openai | hf | hf_text
(docs/method.md §1, §2).

Reading is loader.py's (formats: orbax model dir, training workdir, OpenAI /
open_clip / Long-CLIP / FIX-CLIP state dicts, HF CLIPModel directories); the
key rules are layouts.py's; files are torch_files.py's. Written here:
orbax (default), openai (.pt or .safetensors; FIX-CLIP's extra parameters
under `fixclip.*` keys), hf (a directory that transformers' CLIPModel,
CLIPProcessor, CLIPTokenizer and CLIPTokenizerFast load: weights, tokenizer
files at the model's context, preprocessor_config.json), hf_text (the text
encoder + tokenizer files, for diffusion pipelines). HF's tokenizers skip
ftfy and HTML unescaping: `tokenizers.normalize_text` first gives our ids on
any text.

  fixclip-convert --src=longclip-B.pt --dst=/ckpt/longclip_b16
  python -m fixclip_jax.convert --src=/ckpt/longclip_b16 --dst=out.pt --to=openai
  python -m fixclip_jax.convert --src=WORKDIR --dst=hf_dir --to=hf

FIX-CLIP's extra parameters (regional prompts, mask token, GTA heads) go
under `fixclip.*` keys in the openai layout; HF's CLIPModel has no place for
them, so --to=hf and --to=hf_text write the model without them and warn
(as transformers' from_pretrained does for unused weights): the prompts
change the image CLS, so --to=hf's image features are plain CLIP's; the text
encoder is complete. --drop_extra drops them from openai/orbax outputs too.
Writing a .pt file (and reading one) needs PyTorch: the [torch] extra.
"""
import json
import os
from typing import Callable, Optional, Tuple

from absl import flags
from absl import logging
import jax

from fixclip_jax import checkpoint
from fixclip_jax import cli
from fixclip_jax import fileio
from fixclip_jax import layouts
from fixclip_jax import loader
from fixclip_jax import torch_files
from fixclip_jax.data import tokenizers
from fixclip_jax.data import transforms
from fixclip_jax.models import positional
from fixclip_jax.models.sizes import CLIPConfig

# The readers define these (torch_files.py); the same classes, named here too.
CheckpointError = torch_files.CheckpointError
StateDict = torch_files.StateDict

ParamsTransform = Callable[[dict, CLIPConfig], Tuple[dict, CLIPConfig]]


# ---------------------------------------------------------------------------
# Writing checkpoints. Everything goes to a temporary path next to the
# destination and is renamed into place, so failures leave nothing behind.

def save_openai(path: str, params: dict, cfg: CLIPConfig, *,
                overwrite: bool = False) -> None:
  """OpenAI-layout .pt (plain dict of tensors) or .safetensors."""
  fileio.refuse_existing(path, overwrite)
  if not path.endswith(".safetensors"):
    torch_files.require_torch(f"{path}: writing a .pt file")
  sd = layouts.params_to_openai_state_dict(params, cfg)
  with fileio.atomic_file(path, overwrite=overwrite) as tmp:
    torch_files.write_tensors(tmp, sd, as_safetensors=path.endswith(".safetensors"))
  logging.info("Wrote OpenAI-layout checkpoint (%d tensors) to %s", len(sd), path)


def hf_preprocessor_config(cfg: CLIPConfig) -> dict:
  """preprocessor_config.json of a CLIPImageProcessor doing our eval
  transform: bicubic resize of the short side, centre crop, CLIP mean/std."""
  return {
      "image_processor_type": "CLIPImageProcessor",
      "processor_class": "CLIPProcessor",
      "do_resize": True, "size": {"shortest_edge": cfg.image_size},
      "resample": 3,  # PIL.Image.BICUBIC
      "do_center_crop": True,
      "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
      "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": list(transforms.CLIP_MEAN),
      "image_std": list(transforms.CLIP_STD), "do_convert_rgb": True,
  }


def _write_hf_preprocessing(directory: str, cfg: CLIPConfig) -> None:
  """Tokenizer files at cfg's context and the image processor's config."""
  tokenizers.ClipTokenizer(context_length=cfg.context_length).save_hf_files(directory)
  fileio.atomic_write(os.path.join(directory, "preprocessor_config.json"),
                      json.dumps(hf_preprocessor_config(cfg), indent=2))


def save_hf(directory: str, params: dict, cfg: CLIPConfig, *,
            overwrite: bool = False) -> None:
  """A transformers directory: CLIPModel weights + config.json, the tokenizer
  files (model_max_length = the context) and preprocessor_config.json, so
  CLIPModel / CLIPProcessor / CLIPTokenizer(Fast).from_pretrained load it."""
  fileio.refuse_existing(directory, overwrite)
  params, cfg = layouts.strip_fixclip(params, cfg, written="the HF CLIPModel")
  sd = layouts.params_to_hf_state_dict(params, cfg)
  _, cfg = layouts.single_position_table(params, cfg)
  with fileio.atomic_directory(directory, overwrite=overwrite) as tmp:
    _write_hf_weights(tmp, layouts.hf_config_dict(cfg), sd)
    _write_hf_preprocessing(tmp, cfg)
  logging.info("Wrote HF CLIPModel directory (%d-token tokenizer, %dpx image "
               "processor) to %s", cfg.context_length, cfg.image_size, directory)


def _write_hf_weights(directory: str, config: dict, sd: StateDict) -> None:
  """config.json + model.safetensors, the save_pretrained layout."""
  fileio.atomic_write(os.path.join(directory, "config.json"),
                      json.dumps(config, indent=2))
  torch_files.write_tensors(os.path.join(directory, "model.safetensors"), sd, as_safetensors=True)


def save_hf_text_encoder(directory: str, params: dict, cfg: CLIPConfig, *,
                         overwrite: bool = False) -> None:
  """The text tower alone as a HF `CLIPTextModelWithProjection` directory plus
  its `CLIPTokenizer` files at cfg.context_length (248 for Long-/FIX-CLIP):
  `CLIPTextModel.from_pretrained` loads it too (ignoring the projection), and
  a diffusers pipeline takes it as `text_encoder` (plug-and-play, docs/method.md §3).
  """
  fileio.refuse_existing(directory, overwrite)
  params, cfg = layouts.single_position_table(params, cfg)
  params, cfg = layouts.strip_fixclip(params, cfg, written="the HF text encoder",
                                      text_only=True)
  full = layouts.params_to_state_dict(params, cfg, "hf")
  sd = {k: v for k, v in full.items()
        if k.startswith("text_model.") or k == "text_projection.weight"}
  text_config = dict(layouts.hf_config_dict(cfg)["text_config"],
                     architectures=["CLIPTextModelWithProjection"],
                     projection_dim=cfg.embed_dim, dtype="float32")
  with fileio.atomic_directory(directory, overwrite=overwrite) as tmp:
    _write_hf_weights(tmp, text_config, sd)
    tokenizers.ClipTokenizer(context_length=cfg.context_length).save_hf_files(tmp)
  # (No image processor: a text encoder alone.)
  logging.info("Wrote HF text encoder (%d tokens) + tokenizer to %s",
               cfg.context_length, directory)


def save_orbax(path: str, params: dict, cfg: CLIPConfig, *,
               overwrite: bool = False) -> None:
  checkpoint.save_model(path, params, cfg, overwrite=overwrite)


SAVERS = {"orbax": save_orbax, "openai": save_openai, "hf": save_hf,
          "hf_text": save_hf_text_encoder}


def convert(src: str, dst: str, to: str = "orbax", *, act: Optional[str] = None,
            params_transform: Optional[ParamsTransform] = None,
            overwrite: bool = False) -> Tuple[CLIPConfig, str]:
  """Reads src (any format), optionally transforms the params, writes dst.

  `params_transform(params, cfg) -> (params, cfg)` runs between load and save
  (e.g. Long-CLIP positional stretching). Returns (cfg written, source format).
  """
  if to not in SAVERS:
    raise ValueError(f"--to={to!r}: must be one of {sorted(SAVERS)}")
  fileio.refuse_existing(dst, overwrite)
  # PyTorch files need the [torch] extra: said before anything is read.
  if fileio.isfile(src) and not src.endswith(".safetensors"):
    torch_files.require_torch(f"--src={src}: reading a PyTorch file")
  if to == "openai" and not dst.endswith(".safetensors"):
    torch_files.require_torch(f"--to=openai --dst={dst}: writing a .pt file")
  params, cfg, fmt = loader.load_any(src, act=act)
  if params_transform is not None:
    params, cfg = params_transform(params, cfg)
  SAVERS[to](dst, params, cfg, overwrite=overwrite)
  logging.info("Converted %s (%s) -> %s (%s): %s", src, fmt, dst, to, cfg)
  return cfg, fmt


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("src", None, "Checkpoint to read: .pt/.bin/.safetensors, a HF "
                      "CLIPModel directory, one of our model dirs or a training workdir.")
  flags.DEFINE_string("dst", None, "Where to write (must not exist).")
  flags.DEFINE_enum("to", "orbax", sorted(SAVERS), "Output format: orbax | openai | "
                    "hf (CLIPModel + tokenizer + image processor) | hf_text "
                    "(text encoder + tokenizer).")
  flags.DEFINE_enum("act", None, ["quick_gelu", "gelu"], "Activation of an "
                    "OpenAI-layout source (not stored in the file); default quick_gelu.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dst.")
  flags.DEFINE_integer(
      "stretch", None, "Prepare for long-text training: stretch the text "
      "positions to this many rows with Long-CLIP's knowledge-preserved "
      "stretching (248 from 77) and create the two-table scheme (docs/method.md §2).")
  flags.DEFINE_bool(
      "drop_extra", False, "Write without FIX-CLIP's prompts / mask token / GTA "
      "heads: a plain Long-CLIP-layout model (text encoder complete). For "
      "--to=openai|orbax, which keep them otherwise; --to=hf|hf_text always "
      "drop them (HF's CLIP has no place for them), with a warning.")
  flags.mark_flags_as_required(["src", "dst"])


def stretch_transform(context_length: int, keep: int = positional.LONGCLIP_KEEP) -> ParamsTransform:
  """params_transform for --stretch: KPS to `context_length`, two tables."""

  def transform(params, cfg):
    if cfg.context_length == context_length:
      raise CheckpointError(f"--stretch={context_length}: the checkpoint already "
                            f"has {context_length} text positions")
    try:
      params = positional.fit_text_positions(
          jax.device_get(params), src_length=cfg.context_length,
          src_keep=cfg.positional_keep, length=context_length, keep=keep,
          source=f"--stretch={context_length}")
    except ValueError as e:
      raise CheckpointError(str(e)) from e
    return params, cfg.replace(context_length=context_length, positional_keep=keep)

  return transform


def compose(*transforms: Optional[ParamsTransform]) -> Optional[ParamsTransform]:
  active = [t for t in transforms if t is not None]
  if not active:
    return None

  def run(params, cfg):
    for t in active:
      params, cfg = t(params, cfg)
    return params, cfg

  return run


def main(argv):
  cli.reject_positional_arguments(argv)
  if not fileio.exists(FLAGS.src):
    raise cli.UserError(f"--src={FLAGS.src}: no such file or directory")
  transform = compose(
      stretch_transform(FLAGS.stretch) if FLAGS.stretch else None,
      layouts.strip_fixclip if FLAGS.drop_extra else None)
  cfg, fmt = convert(FLAGS.src, FLAGS.dst, FLAGS.to, act=FLAGS.act,
                     params_transform=transform, overwrite=FLAGS.overwrite)
  print(f"Wrote {FLAGS.dst} ({FLAGS.to}) from {FLAGS.src} ({fmt}): "
        f"{cfg.vision_layers}-layer {cfg.image_size}px vision, "
        f"{cfg.context_length}-token text, embed_dim {cfg.embed_dim}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
