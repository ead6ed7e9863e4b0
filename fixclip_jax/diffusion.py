"""Long prompts for Stable Diffusion 1.x and SDXL from a 248-token text encoder
(docs/method.md §3, plug-and-play). Needs the `diffusion` extra:
`pip install fixclip_jax[diffusion]` (torch, transformers, diffusers).

  fixclip-convert --src=/ckpt/fixclip_l14 --dst=/ckpt/te248 --to=hf_text
  from fixclip_jax import diffusion
  encoder, tokenizer = diffusion.load_text_encoder("/ckpt/te248")
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
      SDXL, text_encoder=encoder, tokenizer=tokenizer)   # or an SD 1.x pipeline
  image = pipe(**diffusion.prompt_embeds(pipe, long_prompt)).images[0]

or from the command line (SD 1.x or SDXL, read from the pipeline's
model_index.json):

  python -m fixclip_jax.diffusion --text_encoder=/ckpt/te248 \
      --pipeline=/weights/sdxl-base --prompt="a long description ..." \
      [--out=sample.png --device=cuda --dtype=float16 --steps=30]

What the UNet gets (`prompt_embeds` returns the pipeline's keyword arguments,
negative ones included, for classifier-free guidance):

  SD 1.x   prompt_embeds [1, 248, w]: the long encoder's last hidden states
           (as the pipeline computes them; a 248-token tokenizer alone
           already works there, this is the same computation).
  SDXL     prompt_embeds [1, 248, w1 + w2]: per token, the long CLIP-L's
           penultimate hidden states (what SDXL reads) next to the second
           encoder's (OpenCLIP-bigG, 77 tokens). The second encoder reads
           the prompt in 77-token chunks (start token, 75 ids, end token,
           as users chunk prompts by hand), its penultimate hidden states of
           the chunks concatenated and cut to 248 rows (chunks past the
           prompt are empty prompts). pooled_prompt_embeds [1, p]: the
           second encoder's projected pooled output of the first chunk, the
           prompt as SDXL alone would read it (77 tokens).

Without a negative prompt, SDXL's `force_zeros_for_empty_prompt` pipelines
(the base model) get zeros, as diffusers gives them; other pipelines get the
empty prompt's embeddings. Prompts are normalised first as our tokenizer
normalises them (data/tokenizers.normalize_text: ftfy, HTML unescape), which
Hugging Face's tokenizers skip. A prompt longer than 248 tokens is cut, with
one warning line.
"""
import contextlib
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

from absl import flags
from absl import logging

from fixclip_jax import cli
from fixclip_jax.data import tokenizers

SECOND_ENCODER_CONTEXT = 77  # OpenCLIP-bigG's positions in SDXL


@contextlib.contextmanager
def _quiet_transformers():
  """transformers without its progress bars and warnings (a local read)."""
  import transformers  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  verbosity = transformers.logging.get_verbosity()
  bar = transformers.logging.is_progress_bar_enabled()
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  try:
    yield
  finally:
    transformers.logging.set_verbosity(verbosity)
    if bar:
      transformers.logging.enable_progress_bar()


def load_text_encoder(path: str, torch_dtype: Any = None) -> Tuple[Any, Any]:
  """(transformers CLIPTextModel, CLIPTokenizer) of a `convert --to=hf_text`
  directory: the 248-token encoder and its tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  # transformers reports the export's text_projection (CLIPTextModel has
  # none: it pools without projecting) in a many-line table; a real mismatch
  # is said below in one line.
  with _quiet_transformers():
    encoder, info = transformers.CLIPTextModel.from_pretrained(
        path, torch_dtype=torch_dtype, output_loading_info=True)
  unexpected = sorted(set(info.get("unexpected_keys") or ()) - {"text_projection.weight"})
  missing = sorted(info.get("missing_keys") or ())
  if unexpected or missing:
    logging.warning("%s is not a text encoder CLIPTextModel reads whole (missing "
                    "%s, unexpected %s): export it again with fixclip-convert "
                    "--to=hf_text", path, missing[:5], unexpected[:5])
  return encoder, transformers.CLIPTokenizer.from_pretrained(path)


def is_sdxl(pipe) -> bool:
  """Whether the pipeline has SDXL's second text encoder."""
  return getattr(pipe, "text_encoder_2", None) is not None


def _long_ids(tokenizer, prompt: str):
  """[1, L] ids of the long tokenizer (L = its model_max_length, 248), cut with
  a warning line when the prompt is longer."""
  length = tokenizer.model_max_length
  # With start and end tokens; verbose=False: the warning below says it once.
  count = len(tokenizer(prompt, verbose=False)["input_ids"])
  if count > length:
    logging.warning("The prompt has %d tokens; the text encoder reads %d, the "
                    "last %d are dropped (shorten the prompt to keep them)",
                    count, length, count - length)
  return tokenizer(prompt, padding="max_length", max_length=length,
                   truncation=True, return_tensors="pt").input_ids


def chunk_ids(tokenizer, prompt: str, num_rows: int,
              context: int = SECOND_ENCODER_CONTEXT) -> List[List[int]]:
  """The prompt's ids in chunks of `context` tokens (start token, up to
  context - 2 ids, end token, padding), as many chunks as cover `num_rows`
  rows; chunks past the prompt are empty prompts."""
  ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
  room = context - 2
  pad = tokenizer.pad_token_id
  pad = tokenizer.eos_token_id if pad is None else pad
  chunks = []
  for start in range(0, -(-num_rows // context) * room, room):
    row = [tokenizer.bos_token_id] + ids[start:start + room] + [tokenizer.eos_token_id]
    chunks.append(row + [pad] * (context - len(row)))
  return chunks


def _sd_embeds(pipe, prompt: str):
  """[1, L, w]: the long encoder's last hidden states (SD 1.x)."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  ids = _long_ids(pipe.tokenizer, prompt).to(pipe.text_encoder.device)
  with torch.no_grad():
    return pipe.text_encoder(ids)[0]


def _sdxl_embeds(pipe, prompt: str):
  """([1, L, w1 + w2] penultimate hidden states of both encoders, [1, p]
  pooled output of the second encoder's first chunk)."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  ids = _long_ids(pipe.tokenizer, prompt).to(pipe.text_encoder.device)
  rows = ids.shape[1]                                              # L = 248
  chunks = torch.tensor(chunk_ids(pipe.tokenizer_2, prompt, rows),
                        device=pipe.text_encoder_2.device)         # [K, 77]
  with torch.no_grad():
    long_out = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(chunks, output_hidden_states=True)
  first = long_out.hidden_states[-2]                               # [1, L, w1]
  width = second.hidden_states[-2].shape[-1]
  rest = second.hidden_states[-2].reshape(1, -1, width)[:, :rows]  # [1, L, w2]
  embeds = torch.cat([first, rest.to(first.dtype)], dim=-1)        # [1, L, w1+w2]
  pooled = second[0][:1]                                           # [1, p]
  return embeds, pooled


def prompt_embeds(pipe, prompt: str, negative_prompt: Optional[str] = None
                  ) -> Dict[str, Any]:
  """The keyword arguments that give `pipe` the whole long prompt:
  prompt_embeds and negative_prompt_embeds (SDXL: also pooled_prompt_embeds
  and negative_pooled_prompt_embeds). `pipe.text_encoder` / `pipe.tokenizer`
  are the 248-token ones (load_text_encoder)."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  prompt = tokenizers.normalize_text(prompt)
  zero_negative = negative_prompt is None and bool(
      getattr(pipe.config, "force_zeros_for_empty_prompt", False))
  negative = tokenizers.normalize_text(negative_prompt or "")
  if not is_sdxl(pipe):
    embeds = _sd_embeds(pipe, prompt)
    return {"prompt_embeds": embeds,
            "negative_prompt_embeds": _sd_embeds(pipe, negative)}
  embeds, pooled = _sdxl_embeds(pipe, prompt)
  if zero_negative:
    neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
  else:
    neg, neg_pooled = _sdxl_embeds(pipe, negative)
  return {"prompt_embeds": embeds, "negative_prompt_embeds": neg,
          "pooled_prompt_embeds": pooled,
          "negative_pooled_prompt_embeds": neg_pooled}


# ----------------------------------------------------------------------------
# The command line.

DTYPES = ("float32", "float16", "bfloat16")


def pipeline_class(pipeline: str) -> str:
  """The diffusers class a pipeline directory names (model_index.json)."""
  path = os.path.join(pipeline, "model_index.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{pipeline} is not a diffusers pipeline directory "
                            f"(no {path})")
  with open(path) as f:
    return json.load(f)["_class_name"]


def _config(directory: str, what: str) -> Dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not {what} (no {path})")
  with open(path) as f:
    return json.load(f)


def check_widths(text_encoder: str, pipeline: str) -> None:
  """ValueError unless the text features fit the UNet's cross-attention
  (SDXL: the long encoder's width plus the second encoder's); read from the
  config files, before any weights."""
  width = _config(text_encoder, "a convert --to=hf_text directory")["hidden_size"]
  second = os.path.join(pipeline, "text_encoder_2")
  if os.path.isdir(second):
    width += _config(second, "SDXL's second text encoder")["hidden_size"]
  want = _config(os.path.join(pipeline, "unet"), "a UNet")["cross_attention_dim"]
  want = want[0] if isinstance(want, (list, tuple)) else want
  if width != want:
    raise ValueError(
        f"the text features are {width} wide but the UNet of {pipeline} "
        f"cross-attends {want}-wide ones: export the text tower of a model as "
        "wide as the pipeline's CLIP-L (768: an L/14; B/16's is 512)")


def load_pipeline(text_encoder: str, pipeline: str, device: str, dtype: str):
  """The pipeline (SD 1.x or SDXL) with our encoder and tokenizer in place of
  its CLIP-L."""
  import diffusers  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  import torch  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  name = pipeline_class(pipeline)
  check_widths(text_encoder, pipeline)
  torch_dtype = getattr(torch, dtype)
  encoder, tokenizer = load_text_encoder(text_encoder, torch_dtype)
  extra = {} if "XL" in name else {"safety_checker": None,
                                   "requires_safety_checker": False}
  # Loading a local pipeline: no progress bars, no many-line advice (e.g.
  # to install accelerate, a matter of loading speed).
  verbosity = diffusers.utils.logging.get_verbosity()
  diffusers.utils.logging.set_verbosity_error()
  diffusers.utils.logging.disable_progress_bar()
  with _quiet_transformers(), warnings.catch_warnings():
    # torch_dtype: the name every diffusers release since 0.30 reads (newer
    # ones also read dtype, and warn about the old name).
    warnings.simplefilter("ignore", FutureWarning)
    try:
      pipe = getattr(diffusers, name).from_pretrained(
          pipeline, text_encoder=encoder, tokenizer=tokenizer,
          torch_dtype=torch_dtype, **extra)
    finally:
      diffusers.utils.logging.set_verbosity(verbosity)
      diffusers.utils.logging.enable_progress_bar()
  pipe.set_progress_bar_config(disable=True)
  return pipe.to(device)


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program: no clash on import)."""
  flags.DEFINE_string("text_encoder", None, "Directory of convert --to=hf_text.")
  flags.DEFINE_string("pipeline", None, "A diffusers StableDiffusionPipeline or "
                      "StableDiffusionXLPipeline directory.")
  flags.DEFINE_string("prompt", None, "The prompt (up to 248 tokens).")
  flags.DEFINE_string("negative_prompt", None, "The negative prompt.")
  flags.DEFINE_string("out", "sample.png", "The image file to write.")
  flags.DEFINE_string("device", None, "cuda, cpu, mps, ... (default: cuda if "
                      "available)")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Weights' dtype.")
  flags.DEFINE_integer("steps", 30, "Denoising steps.", lower_bound=1)
  flags.DEFINE_integer("height", None, "Image height (default: the pipeline's).")
  flags.DEFINE_integer("width", None, "Image width (default: the pipeline's).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.mark_flags_as_required(["text_encoder", "pipeline", "prompt"])


def main(argv):
  cli.reject_positional_arguments(argv)
  import torch  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  device = FLAGS.device or ("cuda" if torch.cuda.is_available() else "cpu")
  pipe = load_pipeline(FLAGS.text_encoder, FLAGS.pipeline, device, FLAGS.dtype)
  kwargs = prompt_embeds(pipe, FLAGS.prompt, FLAGS.negative_prompt)
  count = len(pipe.tokenizer(tokenizers.normalize_text(FLAGS.prompt),
                             verbose=False)["input_ids"])
  print(f"{type(pipe).__name__}: the prompt's {count} tokens (of "
        f"{pipe.tokenizer.model_max_length}) reach the UNet as prompt_embeds "
        f"{tuple(kwargs['prompt_embeds'].shape)}", flush=True)
  image = pipe(**kwargs, num_inference_steps=FLAGS.steps, height=FLAGS.height,
               width=FLAGS.width,
               generator=torch.Generator(device="cpu").manual_seed(FLAGS.seed)
               ).images[0]
  image.save(FLAGS.out)
  print(f"Wrote {FLAGS.out}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
