"""The 248-token text encoder exported for transformers / diffusers (issue 9)."""
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import torch
import transformers

from fixclip_jax import convert
from fixclip_jax.data import tokenizers
from fixclip_jax.models import clip
from fixclip_jax.models import sizes


class HFTextEncoderExportTest(absltest.TestCase):

  def test_loads_in_transformers_with_equal_hidden_states(self):
    cfg = sizes.get_config("tiny", context_length=248, positional_keep=20,
                           num_prompts=2, gta_groups=2)
    params = jax.device_get(clip.init_params(cfg, jax.random.PRNGKey(7)))
    # Distinct tables so that a wrong fold of the two would show.
    params["text"]["positional_embedding_res"] = (
        params["text"]["positional_embedding_res"] + 0.1)
    out = os.path.join(tempfile.mkdtemp(), "text_encoder")
    convert.save_hf_text_encoder(out, params, cfg)

    tok = tokenizers.ClipTokenizer(context_length=248)
    texts = ["a red circle at the top left of a blue square",
             "a long description " * 40]
    ids = tok(texts)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(out)
    self.assertEqual(hf_tok.model_max_length, 248)
    self.assertEqual(transformers.CLIPTokenizerFast.from_pretrained(out).model_max_length,
                     248)
    self.assertEqual(transformers.CLIPTextConfig.from_pretrained(out)
                     .max_position_embeddings, 248)
    hf_ids = hf_tok(texts, padding="max_length", max_length=248, truncation=True,
                    return_tensors="np")["input_ids"]
    # HF pads with EOT where we pad with 0; the tokens up to EOT agree.
    for row, n in enumerate((ids == tok.eot_token_id).argmax(1)):
      np.testing.assert_array_equal(hf_ids[row, :n + 1], ids[row, :n + 1])

    model = transformers.CLIPTextModel.from_pretrained(out).eval()
    with torch.no_grad():
      hf_out = model(torch.from_numpy(ids.astype(np.int64)))
    hidden = hf_out.last_hidden_state.numpy()
    ours = clip.CLIP(cfg).apply({"params": params}, ids, method=clip.CLIP.encode_text)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    err_hidden = rel(hidden, np.asarray(ours["tokens"]))
    err_pooled = rel(hf_out.pooler_output.numpy(), np.asarray(ours["pooled"]))
    print(f"HF CLIPTextModel vs ours at 248 tokens: last_hidden_state rel err "
          f"{err_hidden:.2e}, pooler_output rel err {err_pooled:.2e}")
    self.assertLess(err_hidden, 1e-4)
    self.assertLess(err_pooled, 1e-4)

    proj = transformers.CLIPTextModelWithProjection.from_pretrained(out).eval()
    with torch.no_grad():
      embeds = proj(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    np.testing.assert_allclose(embeds, np.asarray(ours["embedding"]), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
