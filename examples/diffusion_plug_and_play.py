"""Swap Stable Diffusion's 77-token CLIP text encoder for a 248-token
Long-CLIP / FIX-CLIP one (plug-and-play, docs/method.md §3).

  # 1. Export the text encoder of a trained model together with a 248-token
  #    tokenizer. SD 1.x cross-attends 768-wide text features: an L/14 model
  #    (B/16's text tower is 512 wide and is refused, see check_widths).
  fixclip-convert --src=/ckpt/fixclip_l14 --dst=/ckpt/te248 --to=hf_text
  # 2. Generate (needs `pip install diffusers` and the pipeline's weights):
  python examples/diffusion_plug_and_play.py --text_encoder=/ckpt/te248 \\
      --pipeline=/weights/stable-diffusion-v1-5 --prompt="a long description ..." \\
      [--device=cuda --dtype=float16] [--save_embeddings=prompt.npy]

The pipeline pads and cuts prompts at the tokenizer's model_max_length, now
248 tokens, so words after token 77 reach the UNet (tests/
diffusion_example_test.py checks this on a tiny random pipeline). The prompt
is first normalised as our tokenizer does (fixclip_jax.data.tokenizers.
normalize_text: ftfy, HTML unescape), which HF's tokenizer skips.
"""
import argparse
import json
import os
import sys

import numpy as np

from fixclip_jax.data import tokenizers

DTYPES = ("float32", "float16", "bfloat16")


class WidthMismatch(ValueError):
  """The text encoder's features do not fit the UNet's cross-attention."""


def check_widths(text_width: int, cross_attention_dim: int, text_encoder: str,
                 pipeline: str) -> None:
  """WidthMismatch unless the text encoder's hidden size is what the UNet
  cross-attends to (SD 1.x: 768, i.e. an L/14 text tower)."""
  if text_width != cross_attention_dim:
    raise WidthMismatch(
        f"the text encoder {text_encoder} is {text_width} wide but the UNet of "
        f"{pipeline} cross-attends {cross_attention_dim}-wide text features. "
        "Export the text tower of a model of that width (Stable Diffusion 1.x: "
        "768, an L/14 model; B/16's text tower is 512 wide).")


def unet_cross_attention_dim(pipeline: str) -> int:
  """cross_attention_dim from PIPELINE/unet/config.json (read before any weights)."""
  path = os.path.join(pipeline, "unet", "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{pipeline} is not a diffusers pipeline directory "
                            f"(no {path})")
  with open(path) as f:
    value = json.load(f)["cross_attention_dim"]
  return value[0] if isinstance(value, (list, tuple)) else int(value)


def load_pipeline(text_encoder: str, pipeline: str, device: str, dtype: str):
  """The pipeline with our text encoder and tokenizer in place of its own."""
  import diffusers  # pylint: disable=g-import-not-at-top  # optional: the example's own dependency
  import torch  # pylint: disable=g-import-not-at-top  # optional: the example's own dependency
  import transformers  # pylint: disable=g-import-not-at-top  # optional: the example's own dependency

  encoder_config = transformers.CLIPTextConfig.from_pretrained(text_encoder)
  check_widths(encoder_config.hidden_size, unet_cross_attention_dim(pipeline),
               text_encoder, pipeline)
  torch_dtype = getattr(torch, dtype)
  encoder = transformers.CLIPTextModel.from_pretrained(text_encoder,
                                                       torch_dtype=torch_dtype)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(text_encoder)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      pipeline, text_encoder=encoder, tokenizer=tokenizer, torch_dtype=torch_dtype,
      safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe.to(device)


def prompt_embeddings(pipe, prompt: str) -> np.ndarray:
  """[tokens, width]: what the UNet cross-attends to for `prompt`."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: the example's own dependency
  with torch.no_grad():
    embeds, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
  return embeds[0].float().cpu().numpy()


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--text_encoder", required=True,
                      help="directory written by convert --to=hf_text")
  parser.add_argument("--pipeline", required=True,
                      help="a diffusers StableDiffusionPipeline directory")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--out", default="sample.png")
  parser.add_argument("--device", default=None,
                      help="cuda, cpu, mps, ... (default: cuda if available)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES)
  parser.add_argument("--steps", type=int, default=30, help="denoising steps")
  parser.add_argument("--height", type=int, default=None)
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save_embeddings", default=None,
                      help="also write the prompt embeddings [tokens, width] (.npy)")
  args = parser.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top  # optional: the example's own dependency
  device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  try:
    pipe = load_pipeline(args.text_encoder, args.pipeline, device, args.dtype)
  except (WidthMismatch, FileNotFoundError, OSError) as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    return 2
  prompt = tokenizers.normalize_text(args.prompt)
  count = len(pipe.tokenizer(prompt)["input_ids"])  # with start and end tokens
  limit = pipe.tokenizer.model_max_length
  print(f"prompt: {count} tokens; the text encoder reads {limit}"
        + (f" (cut: {count - limit} dropped)" if count > limit else "")
        + (f"; a 77-token encoder would drop {count - 77}" if count > 77 else ""))
  if args.save_embeddings:
    np.save(args.save_embeddings, prompt_embeddings(pipe, prompt))
  generator = torch.Generator(device="cpu").manual_seed(args.seed)
  image = pipe(prompt, num_inference_steps=args.steps, height=args.height,
               width=args.width, generator=generator).images[0]
  image.save(args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
