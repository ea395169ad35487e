"""The base config every experiment starts from (ml_collections, data only).

Experiments in `experiments/` call `base_config()` and change what they need; any field can be
overridden on the command line (`--config.model.num_experts=64`).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.dir = 'data/shakespeare/prepared'   # prepared token shards (moejax.data.prepare)
  c.data.raw = 'data/shakespeare/raw'        # prepared into data.dir on first use when missing
  c.data.vocab_size = 4096                   # of the BPE tokenizer trained when preparing

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 4096          # must cover the tokenizer's vocabulary
  m.d_model = 128
  m.num_layers = 4
  m.num_dense_layers = 1       # the first blocks use a dense FFN
  m.dense_ffn_dim = 512
  m.attention = 'gqa'          # name in moejax.attention.ATTENTIONS, or a per-layer pattern
                               # 'kda,kda,kda,mla' repeated to num_layers (layer i, dense first)
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.rope_theta = 10000.0
  # MLA (DeepSeek-V2/V3) shapes, used when attention == 'mla'.
  m.q_lora_rank = 0            # 0 = full-rank query projection
  m.kv_lora_rank = 64
  m.qk_nope_head_dim = 32
  m.qk_rope_head_dim = 32
  m.v_head_dim = 64
  m.window = 32                # SWA window; NSA sliding branch
  # NSA (native sparse attention): cmp blocks of nsa_block tokens every nsa_stride tokens;
  # the top nsa_num_selected blocks of nsa_select_block tokens are attended in full.
  m.nsa_block = 16
  m.nsa_stride = 8
  m.nsa_select_block = 16
  m.nsa_num_selected = 4
  # KDA (Kimi delta attention): chunk length of the chunkwise-parallel form; short conv width.
  m.kda_chunk = 16
  m.kda_conv = 4
  # Mixture of experts.
  m.num_experts = 16
  m.top_k = 2
  m.expert_ffn_dim = 128
  m.num_shared_experts = 1
  m.router_score = 'sigmoid'   # 'sigmoid' (DeepSeek-V3) or 'softmax'
  m.norm_topk = True           # renormalise the top-k weights to sum to one
  m.routed_scaling = 1.0
  m.bias_update_rate = 1e-2    # auxiliary-loss-free balancing (DeepSeek-V3 uses 1e-3 over far longer runs); 0 disables
  m.balance_loss_weight = 0.0  # sequence-wise balance loss (DeepSeek-V3 eq. 17-20)
  m.z_loss_weight = 0.0        # router z-loss (ST-MoE)
  m.dispatch = 'dropless'      # name in moejax.moe.DISPATCHES
  m.capacity_factor = 1.25     # used by dispatch == 'capacity'
  m.block_size = 0             # rows per expert block in dropless dispatch; 0 = choose from the shapes
  m.tie_embeddings = False
  m.init_std = 0.02
  m.norm_eps = 1e-6
  m.scan_unroll = 1            # layers per scan iteration (True = fully unrolled)
  m.remat = 'none'             # name in moejax.model.REMAT_POLICIES
  m.compute_dtype = 'float32'

  t = c.train = ml_collections.ConfigDict()
  t.steps = 200
  t.batch_size = 16
  t.seq_len = 128
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.peak_flops_per_device = 0.0  # 0 = look up the platform's peak (moejax.flops)

  o = c.optim = ml_collections.ConfigDict()
  o.name = 'adamw'             # name in moejax.optim.OPTIMIZERS
  o.lr = 3e-3
  o.warmup_steps = 20
  o.min_lr_ratio = 0.1         # cosine decays to lr * min_lr_ratio
  o.decay_steps = 0            # schedule length; 0 = train.steps (set it to extend a run later)
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.clip_norm = 1.0
  o.router_lr_scale = 1.0      # router learning rate = lr * router_lr_scale

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 100
  k.max_to_keep = 2
  k.async_save = True

  # Mesh axis name -> size; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'expert': 1})
  # Logical axis name -> mesh axis (or tuple of axes, or None = replicated).
  c.sharding = ml_collections.ConfigDict({
      'batch': ('data', 'expert'),
      'expert': 'expert',
  })
  return c
