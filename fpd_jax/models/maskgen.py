"""The MaskGen-VQ generator (bytedance/1d-tokenizer `modeling/maskgen.py`, DESIGN.md §1.6) in Flax.

    c = text_embed_proj(text_states)                         text stream [B, L, D] (frozen encoder's token states)
    y = cond_pooled_proj([pooled, sinusoid(aesthetic * 100)]) the adaLN condition [B, D] (pooled text + micro-cond)
    x = embeddings[tokens] + pos_embed                        image stream [B, N, D] (learned positions)
    c, x = JointBlock_i(x, c, y)                              SD3 MMDiT blocks; the last is `context_pre_only`
    x = AdaLayerNormContinuous(x, y)                          LN without affine, * (1 + scale) + shift
    logits = x @ embeddings[:K].T                             head tied to the codebook rows, no bias
    r = repa_projector(x after block repa_layer)              optional (REPA, training only; `repa_loss`)

Joint block (diffusers' `JointTransformerBlock`): each stream has its own adaLN-Zero modulation from silu(y)
(shift/scale/gate for attention and MLP), its own q/k/v projections (`to_q/k/v` for the image stream,
`add_q/k/v_proj` for the text stream); attention runs over the concatenation [image; text]; each stream adds its
gated output projection (`to_out`, `to_add_out`) and gated MLP (`ff`, `ff_context`). A `context_pre_only` block
modulates the text with AdaLayerNormContinuous and returns no text stream. Every modulation is zero-initialised
(adaLN-Zero): at init each block is the identity on both streams. `qk_norm` (off in the released MaskGen and by
default) normalises each head's queries and keys with a learned RMSNorm before attention (diffusers'
`qk_norm='rms_norm'`, parameters `norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`), which bounds the attention
logits: on one token a cell (`fpd_jax.tools.layout_toy`) the demo's teacher without it drives them to hundreds, its
softmax turns nearly one-hot and it does not learn to lay out a position caption; with it, it does when trained on
position captions alone, and under four of the demo's six caption families only at 4-8x its batch (not under all
six at 4x or 8x). The real teacher (16 tokens a cell) does not, at 4x its batch nor on position captions alone
(docs/t2i_experiments.md, Binding).

Token layout: ids 0..K-1 are codebook entries, K is the mask token (as MaskGen's `mask_token_id`). The released
table has `extra_embedding_rows` = 1001 more rows after the mask row (unused class ids kept for compatibility); only
rows 0..K-1 reach the head. `MASKGEN_VQ_L` holds the released generator's sizes (configs/infer/MaskGen/maskgen_vq_l.yaml
of bytedance/1d-tokenizer: K 8192, 128 tokens, width 1024, 16 blocks, 16 heads, aesthetic score 6.5).

`generate` is the released sampler (`MaskGen_VQ.generate`) step for step, so that a fixed draw of its noise gives
the same tokens (see its docstring); `fpd_jax.sampling.iterative_decode` is the project's MaskGIT sampler.

`MaskGenModel` has the interface of `MaskGITModel` (`logits`, `guided_logits`, `init`, `mask_id`,
`codebook_size`), so the sampler, the teacher trainer and the FPD step use it unchanged. A condition is the caption
ids `[B, L]` (`conditioning.TextConditioner`); the frozen text encoder runs inside `logits` with its parameters held
by the model (never trained by the generator's optimizer).
"""

import copy
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax import conditioning as cond_lib
from fpd_jax.errors import UserError
from fpd_jax.models import clip_text
from fpd_jax.models.maskgit import truncated_normal

LN_EPS = 1e-6
# The released MaskGen-L (VQ): `MaskGenTransformer` fields, the text sizes it reads, and its sampling defaults.
MASKGEN_VQ_L = dict(codebook_size=8192, num_tokens=128, hidden_size=1024, num_layers=16, num_heads=16, mlp_ratio=4.0,
                    micro_condition_dim=256, extra_embedding_rows=1001)
MASKGEN_VQ_L_TEXT_DIM = 768  # Width of the CLIP token states and of the pooled vector it reads.
MASKGEN_VQ_L_AESTHETIC_SCORE = 6.5  # `sample_aesthetic_score` of the inference config.


def _ln(x):
  """LayerNorm without affine parameters (diffusers' `elementwise_affine=False`)."""
  return nn.LayerNorm(epsilon=LN_EPS, use_scale=False, use_bias=False)(x)


def sinusoidal_embedding(values: jax.Array, dim: int, max_period: float = 1000.0) -> jax.Array:
  """diffusers' timestep embedding as MaskGen calls it: [sin, cos] of values * exp(-log(P) * i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class FeedForward(nn.Module):
  dim: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = truncated_normal(0.02)
    h = nn.Dense(int(self.dim * self.mlp_ratio), kernel_init=init, dtype=self.dtype, name='fc1')(x)
    return nn.Dense(self.dim, kernel_init=init, dtype=self.dtype, name='fc2')(jax.nn.gelu(h, approximate=True))


def modulation(y: jax.Array, dim: int, chunks: int, name: str, dtype) -> list[jax.Array]:
  """adaLN(-Zero) parameters: `chunks` vectors [B, 1, dim] from Dense(silu(y)), zero-initialised."""
  out = nn.Dense(chunks * dim, kernel_init=nn.initializers.zeros, dtype=dtype, name=name)(jax.nn.silu(y))
  return jnp.split(out[:, None, :], chunks, axis=-1)


class JointBlock(nn.Module):
  """One MMDiT block over the image stream x [B, N, D] and the text stream c [B, L, D], conditioned on y [B, D]."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  context_pre_only: bool = False
  qk_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, y):
    dense = lambda name: nn.Dense(self.dim, kernel_init=truncated_normal(0.02), dtype=self.dtype, name=name)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(y, self.dim, 6, 'norm1', self.dtype)
    nx = _ln(x) * (1 + scale_msa) + shift_msa
    if self.context_pre_only:  # AdaLayerNormContinuous: scale first, then shift.
      c_scale, c_shift = modulation(y, self.dim, 2, 'norm1_context', self.dtype)
      nc = _ln(c) * (1 + c_scale) + c_shift
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(
          y, self.dim, 6, 'norm1_context', self.dtype)
      nc = _ln(c) * (1 + c_scale_msa) + c_shift_msa
    b, n, _ = x.shape
    def heads(t, norm=None):
      t = t.reshape(t.shape[0], t.shape[1], self.num_heads, self.dim // self.num_heads)
      if self.qk_norm and norm:  # diffusers' qk_norm='rms_norm': RMSNorm over each head's channels.
        t = nn.RMSNorm(epsilon=LN_EPS, dtype=self.dtype, name=norm)(t)
      return t
    q = jnp.concatenate([heads(dense('to_q')(nx), 'norm_q'), heads(dense('add_q_proj')(nc), 'norm_added_q')], 1)
    k = jnp.concatenate([heads(dense('to_k')(nx), 'norm_k'), heads(dense('add_k_proj')(nc), 'norm_added_k')], 1)
    v = jnp.concatenate([heads(dense('to_v')(nx)), heads(dense('add_v_proj')(nc))], axis=1)
    attn = jax.nn.dot_product_attention(q, k, v).reshape(b, q.shape[1], self.dim)
    attn_x, attn_c = attn[:, :n], attn[:, n:]
    x = x + gate_msa * dense('to_out')(attn_x)
    x = x + gate_mlp * FeedForward(self.dim, self.mlp_ratio, self.dtype, name='ff')(
        _ln(x) * (1 + scale_mlp) + shift_mlp)
    if self.context_pre_only:
      return None, x
    c = c + c_gate_msa * dense('to_add_out')(attn_c)
    c = c + c_gate_mlp * FeedForward(self.dim, self.mlp_ratio, self.dtype, name='ff_context')(
        _ln(c) * (1 + c_scale_mlp) + c_shift_mlp)
    return c, x


class MaskGenTransformer(nn.Module):
  """Image tokens [B, N] + text states [B, L, T] + pooled text [B, E] + aesthetic score [B] -> logits [B, N, K]."""
  codebook_size: int
  num_tokens: int
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  micro_condition_dim: int = 256  # Size of the aesthetic score's sinusoidal embedding (0 = no micro-condition).
  extra_embedding_rows: int = 0  # Unused rows after the mask row (1001 in the released table).
  # Representation alignment (REPA, Yu et al. 2024; `repa_loss`): an MLP `repa_projector` of width `repa_hidden` maps
  # the image stream after block `repa_layer` to `repa_dim` features (0 = no projector, as the released model).
  repa_dim: int = 0
  repa_layer: int = 1
  repa_hidden: int = 256
  qk_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, text_states, pooled, aesthetic, embedding_noise: float = 0.0,
               return_repa: bool = False):
    """`embedding_noise` sigma > 0 (Di[M]O's one-step generator input) turns the image tokens' embeddings e into
    sigma * eps + sqrt(1 - sigma^2) * e, eps ~ N(0, I) from the `'embedding_noise'` RNG stream, before the position
    embeddings are added (as `maskgit.Embed` does for MaskGIT). `return_repa`: also return the projector's output
    `[B, N, repa_dim]` (logits, projection)."""
    init = truncated_normal(0.02)
    rows = self.codebook_size + 1 + self.extra_embedding_rows  # + the mask token (+ unused rows).
    table = self.param('embeddings', init, (rows, self.hidden_size))
    pos = self.param('pos_embed', init, (1, self.num_tokens, self.hidden_size))
    words = jnp.take(table, tokens.astype(jnp.int32), axis=0)
    if embedding_noise > 0:
      eps = jax.random.normal(self.make_rng('embedding_noise'), words.shape, words.dtype)
      words = embedding_noise * eps + (1.0 - embedding_noise ** 2) ** 0.5 * words
    x = (words + pos[:, :tokens.shape[1]]).astype(self.dtype)
    c = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='text_embed_proj')(text_states)
    if self.micro_condition_dim:
      pooled = jnp.concatenate([pooled, sinusoidal_embedding(aesthetic * 100.0, self.micro_condition_dim)], -1)
    y = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='cond_pooled_proj')(pooled)
    if return_repa and not self.repa_dim:
      raise ValueError('return_repa needs a model with repa_dim > 0.')
    projection = None
    for i in range(self.num_layers):
      c, x = JointBlock(self.hidden_size, self.num_heads, self.mlp_ratio, i == self.num_layers - 1, self.qk_norm,
                        self.dtype, name=f'blocks_{i}')(x, c, y)
      if i == self.repa_layer and self.repa_dim and (return_repa or self.is_initializing()):
        projection = RepaProjector(self.repa_hidden, self.repa_dim, self.dtype, name='repa_projector')(x)
    scale, shift = modulation(y, self.hidden_size, 2, 'norm_out', self.dtype)
    x = _ln(x) * (1 + scale) + shift
    logits = (x @ table[:self.codebook_size].T.astype(x.dtype)).astype(jnp.float32)
    return (logits, projection.astype(jnp.float32)) if return_repa else logits


class RepaProjector(nn.Module):
  """REPA's projector: Dense -> SiLU -> Dense -> SiLU -> Dense, per token."""
  hidden: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = jax.nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name=f'fc{i + 1}')(x))
    return nn.Dense(self.out, dtype=self.dtype, name='fc3')(x)


def repa_loss(projection: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """REPA's alignment loss: (mean of 1 - cos(projection, target) over tokens, that mean cosine); `[B, N, F]` each."""
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  cosine = jnp.mean(jnp.sum(unit(projection) * unit(jax.lax.stop_gradient(target)), axis=-1))
  return 1.0 - cosine, cosine


class MaskGenModel:
  """The generator behind the conditioning interface, with its frozen text encoder (see module docstring)."""

  def __init__(self, net: MaskGenTransformer, conditioner: 'cond_lib.TextConditioner',
               text_encoder: clip_text.TextTransformer, text_params, aesthetic_score: float = 6.0):
    self.net = net
    self.conditioner = conditioner
    self.text_encoder = text_encoder
    self.text_params = text_params
    self.aesthetic_score = aesthetic_score
    self.codebook_size = net.codebook_size
    self.mask_id = net.codebook_size

  def bind_text(self, text_params) -> 'MaskGenModel':
    """The same model reading `text_params` (e.g. traced inputs of a jitted step: parameters held by the model are
    otherwise baked into the compiled program as constants, 0.5 GB for the released CLIP text tower)."""
    bound = copy.copy(self)
    bound.text_params = text_params
    return bound

  def encode_text(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token states, pooled vector) of caption ids from the frozen encoder."""
    states, pooled = self.text_encoder.apply({'params': self.text_params}, ids)
    return jax.lax.stop_gradient(states), jax.lax.stop_gradient(pooled)

  def _apply(self, fn, params_or_rng, tokens, ids):
    states, pooled = self.encode_text(ids)
    aesthetic = jnp.full((tokens.shape[0],), self.aesthetic_score, jnp.float32)
    return fn(params_or_rng, tokens.astype(jnp.int32), states, pooled, aesthetic)

  def init(self, rng: jax.Array, num_tokens: int, example_cond) -> dict:
    """Initial parameters `{'params': ...}` for `num_tokens` image tokens."""
    tokens = jnp.zeros((1, num_tokens), jnp.int32)
    return self._apply(self.net.init, rng, tokens, jnp.asarray(example_cond)[:1])

  def logits(self, params, tokens: jax.Array, cond, *, deterministic: bool = True,
             dropout_rng: jax.Array | None = None, embedding_noise: float = 0.0,
             noise_rng: jax.Array | None = None) -> jax.Array:
    """Logits `[B, N, K]` (MaskGen has no dropout: `deterministic` and `dropout_rng` are accepted and unused).
    `embedding_noise` sigma > 0 perturbs the image tokens' embeddings with noise drawn from `noise_rng`."""
    del deterministic, dropout_rng
    if embedding_noise > 0 and noise_rng is None:
      raise ValueError('embedding_noise > 0 needs noise_rng.')
    rngs = {'embedding_noise': noise_rng} if embedding_noise > 0 else None
    return self._apply(lambda p, *a: self.net.apply({'params': p}, *a, embedding_noise, rngs=rngs), params, tokens,
                       cond)

  def logits_and_repa(self, params, tokens: jax.Array, cond) -> tuple[jax.Array, jax.Array]:
    """(logits `[B, N, K]`, REPA projection `[B, N, repa_dim]`) of a model built with `repa_dim > 0`."""
    return self._apply(lambda p, *a: self.net.apply({'params': p}, *a, return_repa=True), params, tokens, cond)

  def guided_logits(self, params, tokens: jax.Array, cond, cfg_scale) -> jax.Array:
    """(1 + w) * cond - w * uncond with the empty caption as uncond; `cfg_scale` may be traced (guidance ramps)."""
    if isinstance(cfg_scale, (int, float)) and cfg_scale == 0:
      return self.logits(params, tokens, cond)
    both = jnp.concatenate([cond, self.conditioner.null(cond)])
    c, u = jnp.split(self.logits(params, jnp.concatenate([tokens, tokens]), both), 2)
    return (1.0 + cfg_scale) * c - cfg_scale * u


EMBEDDING_INITS = ('random', 'codebook')


def codebook_embedding_rows(codebook: jax.Array, hidden_size: int, rng: jax.Array, std: float = 0.02) -> jax.Array:
  """Initial token rows `[K, hidden_size]` from the tokenizer's codebook `[K, D]`: the standardised code vectors
  through a random Gaussian projection, scaled to the table's init std, so that codes that decode alike start with
  alike rows (and alike logits through the tied head) instead of independent random ones."""
  book = (codebook - codebook.mean(0)) / (codebook.std() + 1e-8)
  proj = jax.random.normal(rng, (codebook.shape[1], hidden_size), jnp.float32) / math.sqrt(codebook.shape[1])
  return (std * book @ proj).astype(jnp.float32)


def init_embeddings_from_codebook(params: dict, codebook: jax.Array, rng: jax.Array) -> dict:
  """`params` with the first K rows of the `embeddings` table (the codebook rows, tied to the head) replaced by
  `codebook_embedding_rows`; the mask row and any extra rows keep their random init."""
  table = params['embeddings']
  return {**params, 'embeddings': table.at[:codebook.shape[0]].set(
      codebook_embedding_rows(codebook, table.shape[1], rng))}


def from_config(cfg, conditioner, codebook_size: int, num_tokens: int, text_encoder, text_params,
                dtype: Any = jnp.float32, repa_dim: int = 0) -> MaskGenModel:
  """The generator of a config section like `configs/t2i_demo.py`'s `teacher`; `repa_dim` > 0 adds the REPA
  projector of `cfg.repa` (`layer`, `hidden`) with that output size."""
  repa = cfg.get('repa', None) if repa_dim else None
  net = MaskGenTransformer(codebook_size=codebook_size, num_tokens=num_tokens, hidden_size=cfg.hidden_size,
                           num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                           micro_condition_dim=cfg.micro_condition_dim,
                           extra_embedding_rows=cfg.get('extra_embedding_rows', 0),
                           repa_dim=repa_dim if repa else 0, repa_layer=repa.layer if repa else 1,
                           repa_hidden=repa.hidden if repa else 256, qk_norm=cfg.get('qk_norm', False), dtype=dtype)
  return MaskGenModel(net, conditioner, text_encoder, text_params, cfg.aesthetic_score)


def gumbel_from_uniform(u: jax.Array) -> jax.Array:
  """-log(-log(u)) with MaskGen's clamps (log of max(t, 1e-20)), so a recorded uniform draw replays exactly."""
  log = lambda t: jnp.log(jnp.maximum(t, 1e-20))
  return -log(-log(u))


def generate(model: MaskGenModel, params, cond: jax.Array, rng: jax.Array | None = None, *, num_steps: int = 16,
             guidance_scale: float = 12.0, randomize_temperature: float = 1.5, guidance_decay_scale_pow: float = 1.0,
             softmax_temperature_annealing: bool = True, uniforms=None) -> jax.Array:
  """The released `MaskGen_VQ.generate` (guidance_decay='cosine', prob_sorting=True): tokens `[B, N]`.

  Step t of T (ratio r = (t+1)/T), starting from all mask ids:
    w = (guidance_scale - 1) * (1 - cos(pi * r^pow)) / 2 + 1;  logits = c + (c - u) * w  (u: the empty caption)
    logits /= 0.5 + 0.8 * (1 - r)  (or / (randomize_temperature * (1 - r)) without annealing)
    sampled = argmax(logits + a * g1),  a = randomize_temperature * (1 - r)    known tokens are kept
    confidence = logits[sampled] + a * g2 (known positions +inf);  k = floor(N * arccos(r) / (pi/2)) clamped to
    [1, masked - 1]; positions with confidence <= the k-th smallest are masked again (not after the last step).
  g1 [B, N, K], g2 [B, N] are Gumbel noise -log(-log(U)) of uniforms U.

  Args:
    model: the generator; `cond` its caption ids `[B, L]`.
    params: its parameters.
    rng: draws the uniforms when `uniforms` is None (step t, draw i from fold_in(fold_in(rng, t), i)).
    num_steps, guidance_scale, randomize_temperature, guidance_decay_scale_pow, softmax_temperature_annealing: the
      released sampler's arguments (defaults: the released ones; the inference config sets guidance 12, 16 steps).
    uniforms: optional recorded draws `(u1 [T, B, N, K], u2 [T, B, N])` (the official sampler's `uniform_` calls in
      order), for a token-for-token replay.
  """
  batch = cond.shape[0]
  n, k = model.net.num_tokens, model.codebook_size

  def run(params, cond, rng, uniforms):
    def draw(i, step, shape):  # The recorded draw, else a fresh one per step (never all T at once).
      if uniforms is not None:
        return uniforms[i][step]
      return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, step), i), shape)

    ids = jnp.full((batch, n), model.mask_id, jnp.int32)
    for step in range(num_steps):
      ratio = (step + 1) / num_steps
      annealed = randomize_temperature * (1.0 - ratio)
      is_mask = ids == model.mask_id
      scale = (guidance_scale - 1) * (1 - math.cos((ratio ** guidance_decay_scale_pow) * math.pi)) / 2 + 1
      logits = model.guided_logits(params, ids, cond, scale)
      logits = logits / ((0.5 + 0.8 * (1 - ratio)) if softmax_temperature_annealing else annealed)
      sampled = jnp.argmax(logits + annealed * gumbel_from_uniform(draw(0, step, (batch, n, k))),
                           axis=-1).astype(jnp.int32)
      picked = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
      sampled = jnp.where(is_mask, sampled, ids)
      if step == num_steps - 1:
        return sampled
      picked = jnp.where(is_mask, picked, jnp.inf)
      mask_len = jnp.floor(n * jnp.arccos(jnp.float32(ratio)) / (math.pi * 0.5))
      mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(is_mask[0]) - 1, mask_len)).astype(jnp.int32)
      confidence = picked + annealed * gumbel_from_uniform(draw(1, step, (batch, n)))
      cut_off = jnp.take(jnp.sort(confidence, axis=-1), mask_len - 1, axis=-1)[:, None]
      ids = jnp.where(confidence <= cut_off, model.mask_id, sampled)
    return ids

  if uniforms is not None:
    uniforms = (jnp.asarray(uniforms[0]), jnp.asarray(uniforms[1]))
  return jax.jit(run)(params, cond, rng if rng is not None else jax.random.key(0), uniforms)
