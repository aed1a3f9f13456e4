"""CLIP score: how well images match their captions in CLIP's joint embedding (higher is better, 0 to 100).

    clip_score(image, caption) = 100 * max(cos(E_image, E_caption), 0)        averaged over the images

E_image is the vision tower's projected class token (`clip_vision.VisionTransformer`, open_clip's `encode_image`) of
the image after `clip_vision.preprocess`; E_caption the text tower's pooled, projected end-of-text state
(`clip_text.TextTransformer`'s second output, open_clip's `encode_text`). This is the formula of torchmetrics'
`CLIPScore` documentation (`max(100 * cos(E_I, E_C), 0)`); Hessel et al. (2021, CLIPScore) define CLIP-S as
`w * max(cos, 0)` with w = 2.5 (so their numbers are ours x 0.025). torchmetrics' code clamps the mean instead of
each image (`max(mean(100 cos), 0)`); the two agree whenever no cosine is negative, which is the case in practice
for trained CLIP models (image-caption cosines of ViT-L/14 lie around 0.1 to 0.4). torchmetrics reads the Hugging
Face copy of the same OpenAI weights and preprocesses with PIL (`clip_vision.preprocess` says what differs).

`make_scorer` compiles one batch program (images are padded to whole batches), so every model scored with one scorer
shares it.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import batching
from fpd_jax.models import clip_text
from fpd_jax.models import clip_vision

# What report.json says the number is.
DEFINITION = ('100 * max(cos(CLIP image embedding, CLIP caption embedding), 0), averaged over the images '
              '(torchmetrics CLIPScore formula; Hessel et al. CLIP-S = 0.025 x this)')


def score_from_embeddings(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """Per-pair CLIP scores `100 * max(cos, 0)` of embeddings `[N, E]` (row i of each is one image and its caption)."""
  image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  return 100.0 * jnp.maximum(jnp.sum(image_embeds * text_embeds, axis=-1), 0.0)


def make_scorer(vision: clip_vision.VisionTransformer, vision_params, text: clip_text.TextTransformer, text_params,
                batch_size: int = 32) -> Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]:
  """`score(images, ids) -> (mean CLIP score, per-image scores [N])` for images `[N, S, S, 3]` in [0, 1] (any square
  size S; resized to the vision tower's) and their caption ids `[N, L]` (`clip_tokenizer.ClipTokenizer`)."""

  @jax.jit
  def batch_scores(v_params, t_params, images, ids):
    image_embeds = vision.apply({'params': v_params}, clip_vision.preprocess(images, vision.image_size))
    _, text_embeds = text.apply({'params': t_params}, ids)
    return score_from_embeddings(image_embeds, text_embeds)

  def score(images: np.ndarray, ids: np.ndarray) -> tuple[float, np.ndarray]:
    images, ids = np.asarray(images), np.asarray(ids)
    if len(images) != len(ids) or not len(images):
      raise ValueError(f'{len(images)} images and {len(ids)} captions; pass one caption per image (at least one).')
    n = len(images)
    images, ids = batching.pad_rows(images, batch_size), batching.pad_rows(ids, batch_size)  # One program.
    values = np.concatenate([np.asarray(batch_scores(vision_params, text_params, images[i:i + batch_size],
                                                     ids[i:i + batch_size]))
                             for i in range(0, len(images), batch_size)])[:n]
    return float(values.mean()), values

  return score
