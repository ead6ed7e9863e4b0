"""Swap Stable Diffusion's 77-token CLIP text encoder for a 248-token
Long-CLIP / FIX-CLIP one (plug-and-play, method.md §3). Not run in CI: it needs
diffusers and Stable Diffusion weights, which this project does not ship.

  # 1. Export the text encoder of a trained L/14 checkpoint (SD 1.x uses L/14's
  #    768-wide text tower) together with a 248-token CLIPTokenizer:
  python -m fixclip_jax.convert --src=/ckpt/fixclip_l14 --dst=/ckpt/te248 --to=hf_text
  # 2. Generate:
  python examples/diffusion_plug_and_play.py --text_encoder=/ckpt/te248 \
      --pipeline=/weights/stable-diffusion-v1-5 --prompt="a long description ..."
"""
import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--text_encoder", required=True,
                      help="directory written by convert --to=hf_text")
  parser.add_argument("--pipeline", required=True,
                      help="a diffusers StableDiffusionPipeline directory")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--out", default="sample.png")
  args = parser.parse_args()

  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  text_encoder = transformers.CLIPTextModel.from_pretrained(args.text_encoder)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(args.text_encoder)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      args.pipeline, text_encoder=text_encoder, tokenizer=tokenizer)
  # The pipeline pads/truncates to tokenizer.model_max_length, now 248.
  image = pipe(args.prompt).images[0]
  image.save(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
