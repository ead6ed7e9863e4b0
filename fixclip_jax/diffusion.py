"""Long prompts for Stable Diffusion 1.x and SDXL from a 248-token text encoder
(docs/method.md §3, plug-and-play). Needs the `diffusion` extra:
`pip install fixclip_jax[diffusion]` (torch, transformers, diffusers).

  fixclip-convert --src=/ckpt/fixclip_l14 --dst=/ckpt/te248 --to=hf_text
  from fixclip_jax import diffusion
  encoder, tokenizer = diffusion.load_text_encoder("/ckpt/te248")
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
      SDXL, text_encoder=encoder, tokenizer=tokenizer)   # or an SD 1.x pipeline
  image = pipe(**diffusion.prompt_embeds(pipe, long_prompt)).images[0]

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
from typing import Any, Dict, List, Optional, Tuple

from absl import logging

from fixclip_jax.data import tokenizers

SECOND_ENCODER_CONTEXT = 77  # OpenCLIP-bigG's positions in SDXL


def load_text_encoder(path: str, torch_dtype: Any = None) -> Tuple[Any, Any]:
  """(transformers CLIPTextModel, CLIPTokenizer) of a `convert --to=hf_text`
  directory: the 248-token encoder and its tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top  # optional: the diffusion extra
  encoder = transformers.CLIPTextModel.from_pretrained(path, torch_dtype=torch_dtype)
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
