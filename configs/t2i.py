"""Text-to-image: distil the released MaskGen-L (VQ) teacher into a one-step student (DESIGN.md §1.3, §1.6).

Before the first run, import the released weights once (`fpd_jax/tools/import_maskgen.py` names the files):

  python -m fpd_jax.tools.import_maskgen --generator=model.safetensors --tokenizer=tatitok_bl128_vq.bin \
      --clip=open_clip_model.safetensors --out=imports/maskgen_vq_l
  python -m fpd_jax.tools.import_dino --weights=dinov3_vitb16_pretrain_lvd1689m.pth --layout=dinov3_vitb16 \
      --out=imports/dinov3_vitb16

Then, with one prompt per line in prompts.txt (distillation needs prompts only, no images):

  pip download open_clip_torch==2.31.0 --no-deps -d wheels    # CLIP's BPE vocabulary (read from the zip; no torch)
  python -m fpd_jax.main --config=configs/t2i.py:gpu --workdir=runs/t2i --config.data.prompts_file=prompts.txt \
      --config.text_encoder.vocab=wheels/open_clip_torch-2.31.0-py3-none-any.whl
  python -m fpd_jax.main --config=configs/t2i.py:pod --workdir=/mnt/gcs/t2i --config.data.prompts_file=...
  python -m fpd_jax.main --config=configs/t2i.py:smoke --workdir=/tmp/smoke --config.data.prompts_file=... \
      --config.text_encoder.vocab=bpe_simple_vocab_16e6.txt.gz     # CPU, tiny shapes, random weights
  python -m fpd_jax.sample --workdir=runs/t2i --model=student --prompts_file=prompts.txt --num=4 --out=x.png

The evaluate stage (after distill) writes DIR/report.json and report.md: the CLIP score (fpd_jax/eval/clip_score.py)
and images/s of the student and the teacher on `evaluate.prompts_file` (GenEval's evaluation_metadata.jsonl or a text
file), with the CLIP vision tower that import_maskgen --clip wrote to imports/maskgen_vq_l/clip_vision.

Variants: '' (= 'gpu'), 'gpu', 'pod', 'smoke'. Every knob is a field below; override with `--config.a.b=v`.
"""

import ml_collections

from configs import demo
from configs import imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the MaskGen-L text-to-image config of variant `arg` ('gpu' by default, 'pod' or 'smoke')."""
  c = ml_collections.ConfigDict()
  c.task = 'maskgen'  # The released-MaskGen stages (fpd_jax/train/maskgen.py).
  c.seed = 0
  c.stages = ('distill', 'evaluate')  # Teacher, tokenizer and text tower are imported, not trained here.
  c.verbose = False  # Full tracebacks for user errors.
  c.distributed = False  # Multi-process run (the launch/ scripts set it): jax.distributed.initialize() first.
  c.concurrent_stages = 1  # One stage: nothing to overlap.
  c.compilation_cache = ''  # Persistent XLA compilation cache: '' = DIR/jax_cache, 'off', or a shared path.
  c.heartbeat_timeout_s = 100  # Multi-process runs: seconds of silence before a process is declared dead.

  # ---- Data: prompts only.
  c.data = ml_collections.ConfigDict()
  c.data.prompts_file = ''  # Text file, one prompt per line; each step draws groups_per_batch of them.
  c.data.image_size = 256  # Decoded image side (TA-TiTok's).
  c.data.channels = 3

  # ---- Text tower: open_clip ViT-L-14-336 with OpenAI weights (clip_text.VIT_L_14_336), frozen.
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.pretrained = 'imports/maskgen_vq_l'  # `--out` of import_maskgen (reads text_encoder/), or 'random'.
  c.text_encoder.vocab = ''  # bpe_simple_vocab_16e6.txt.gz, an open_clip_torch wheel, or '' (installed open_clip).
  c.text_encoder.vocab_size = 49408  # BPE ids; <end_of_text> = 49407 is the largest (pooling).
  c.text_encoder.context_length = 77  # Every caption is padded to 77 ids (pad 0); all positions are read.
  c.text_encoder.width = 768
  c.text_encoder.num_layers = 12
  c.text_encoder.num_heads = 12
  c.text_encoder.mlp_ratio = 4.0
  c.text_encoder.embed_dim = 768  # Pooled end-of-text vector x text_projection.
  c.text_encoder.activation = 'quick_gelu'  # OpenAI weights.
  c.text_encoder.state_layer = -2  # The generator reads the penultimate block's states (no ln_final).

  # ---- Teacher: MaskGen-L (VQ) (maskgen.MASKGEN_VQ_L); the student starts as a copy.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.pretrained = 'imports/maskgen_vq_l'  # `--out` of import_maskgen (reads teacher/), or 'random'.
  c.teacher.codebook_size = 8192  # K; the mask id is K.
  c.teacher.num_tokens = 128  # 1-D TA-TiTok tokens.
  c.teacher.hidden_size = 1024
  c.teacher.num_layers = 16  # MMDiT blocks; the last is context_pre_only.
  c.teacher.num_heads = 16
  c.teacher.mlp_ratio = 4.0
  c.teacher.qk_norm = False  # The released blocks have no query/key RMSNorm (an opt-in of configs/t2i_demo.py).
  c.teacher.micro_condition_dim = 256  # Sinusoidal embedding of the aesthetic score x 100.
  c.teacher.extra_embedding_rows = 1001  # Unused class rows of the released embedding table.
  c.teacher.aesthetic_score = 6.5  # The micro-condition (the released inference config's sample_aesthetic_score).

  # ---- Tokenizer: the TA-TiTok VQ decoder (tatitok.TATITOK_BL128_VQ), reading the caption's ln_final states.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.pretrained = 'imports/maskgen_vq_l'  # `--out` of import_maskgen (reads tokenizer/), or 'random'.
  c.tokenizer.codebook_size = 8192
  c.tokenizer.token_size = 64  # Codebook vector size D.
  c.tokenizer.num_tokens = 128
  c.tokenizer.image_size = 256
  c.tokenizer.patch_size = 16
  c.tokenizer.width = 1024  # ViT-L decoder.
  c.tokenizer.num_layers = 24
  c.tokenizer.num_heads = 16
  c.tokenizer.text_length = 77  # Text guidance positions.
  c.tokenizer.text_dim = 768  # Width of the text states.

  # ---- Feature encoder phi and FPD: as configs/imagenet.py (DINOv3 ViT-B/16 blocks 2, 5, 8, 11 pooled to 4x4 at
  # 224 px; Adam lr 1e-5, EMA 0.999, bandwidths 0.02/0.05/0.2, bf16 compute), with prompts as groups.
  base = imagenet.get_config('gpu')
  c.dino = base.dino
  c.distill = base.distill
  c.distill.groups_per_batch = 16  # Prompts per batch ...
  c.distill.samples_per_group = 4  # ... x samples per prompt = batch 64 (the paper's).
  # w_T of the refinement step, as c + (c - u) * w with the empty caption as u. Not stated by the paper (an open
  # choice; the released 16-step sampler ramps its guidance from 1 to 12).
  c.distill.teacher_cfg_scale = 3.0
  c.distill.dimo.teacher_cfg_scale = 3.0  # The same guidance for the Di[M]O baseline's teacher.

  # ---- The teacher's sampler (`fpd_jax.sample --model=teacher`): the released `MaskGen_VQ.generate`.
  c.sampling = ml_collections.ConfigDict()
  c.sampling.guidance_scale = 12.0  # Guidance rises from 1 to this with a cosine ramp (c + (c - u) * w).
  c.sampling.randomize_temperature = 2.0  # Gumbel noise scale, annealed to 0 (the released README example's value).

  # ---- Evaluation (stage 'evaluate'): CLIP score and images/s of the student and the teacher.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.prompts_file = ''  # '' = data.prompts_file; or GenEval's evaluation_metadata.jsonl (its 'prompt's).
  c.evaluate.images_per_prompt = 4  # Images sampled per prompt (GenEval's protocol: 4).
  c.evaluate.teacher_steps = (16,)  # The teacher rows: the released sampler at these step counts (() = none).
  c.evaluate.batch_size = 32  # Images per sampling and scoring call.

  # ---- CLIP score's image tower: open_clip ViT-L-14-336, OpenAI weights (clip_vision.VIT_L_14_336); its embedding
  # size is text_encoder.embed_dim. Captions go through the frozen text tower above (its pooled output).
  c.clip_score = ml_collections.ConfigDict()
  c.clip_score.pretrained = 'imports/maskgen_vq_l'  # `--out` of import_maskgen (reads clip_vision/), or 'random'.
  c.clip_score.image_size = 336  # Images are resized to this (bicubic) and normalised with OpenAI's mean/std.
  c.clip_score.patch_size = 14
  c.clip_score.width = 1024
  c.clip_score.num_layers = 24
  c.clip_score.num_heads = 16
  c.clip_score.mlp_ratio = 4.0
  c.clip_score.activation = 'quick_gelu'  # OpenAI weights.

  c.mesh = demo.mesh_config(data=-1, fsdp=1)  # Batch over data x fsdp; rules of configs/demo.py.
  c.train = base.train  # Checkpointing, logging, gradient clipping (see configs/imagenet.py).

  variant = arg or 'gpu'
  if variant == 'gpu':
    pass
  elif variant == 'pod':
    _make_pod(c)
  elif variant == 'smoke':
    _make_smoke(c)
  else:
    raise ValueError(f'Unknown t2i config variant {arg!r}; use gpu, pod or smoke.')
  return c


def _make_pod(c: ml_collections.ConfigDict) -> None:
  """A TPU pod slice: global batch 256 (64 prompts x 4), parameters and optimizer states sharded 4 ways."""
  imagenet.make_pod(c)
  c.teacher.pretrained = c.tokenizer.pretrained = c.text_encoder.pretrained = '/mnt/gcs/imports/maskgen_vq_l'
  c.clip_score.pretrained = '/mnt/gcs/imports/maskgen_vq_l'


def _make_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny shapes and random weights: a few FPD steps on a CPU (tests); needs a prompts file and the BPE vocabulary."""
  c.compilation_cache = 'off'
  c.data.image_size = 32
  c.text_encoder.pretrained = c.teacher.pretrained = c.tokenizer.pretrained = 'random'
  c.text_encoder.width = 16
  c.text_encoder.num_layers = 2
  c.text_encoder.num_heads = 2
  c.text_encoder.embed_dim = 16
  c.teacher.codebook_size = c.tokenizer.codebook_size = 16
  c.teacher.num_tokens = c.tokenizer.num_tokens = 8
  c.teacher.hidden_size = 32
  c.teacher.num_layers = 1  # A single (context_pre_only) block.
  c.teacher.num_heads = 2
  c.teacher.micro_condition_dim = 8
  c.teacher.extra_embedding_rows = 3
  c.tokenizer.token_size = 8
  c.tokenizer.image_size = 32
  c.tokenizer.patch_size = 8
  c.tokenizer.width = 32
  c.tokenizer.num_layers = 1
  c.tokenizer.num_heads = 2
  c.tokenizer.text_dim = 16
  c.dino.layout = 'dinov3_tiny16'
  c.dino.depth = 2  # Of the layout's 3 blocks.
  c.dino.weights = 'random'
  c.dino.layers = (0, 1)
  c.dino.grid = 2
  c.dino.image_size = 32
  c.dino.dtype = 'float32'
  c.distill.compute_dtype = 'float32'
  c.distill.groups_per_batch = 2
  c.distill.samples_per_group = 2
  c.distill.num_steps = 2
  c.distill.warmup_steps = 1
  c.distill.learning_rate = 1e-4
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.evaluate.images_per_prompt = 2
  c.evaluate.teacher_steps = (2,)
  c.evaluate.batch_size = 4
  c.clip_score.pretrained = 'random'
  c.clip_score.image_size = 16  # The 32 px images are resized (antialiased) to 16.
  c.clip_score.patch_size = 8
  c.clip_score.width = 16
  c.clip_score.num_layers = 1
  c.clip_score.num_heads = 2
