"""The accelerator speedrun: nmoe's 256-expert MoE ("super") on FineWeb-Edu 100B-shuffle, to a
validation loss of 3.28, then CORE (docs/speedrun.md, section 4).

Shape (nmoe configs/speedrun/super.toml): 12 layers, all MoE, d_model 768, 12 heads of 64 (MHA),
256 routed experts of FFN 384, top-7 + 1 shared (8 x 384 = 3072 = the dense baseline's FFN), GPT-2
tokens with the vocabulary padded to 50304 (a multiple of 128, as nmoe and modded-nanogpt pad the
50257 ids; ids 50257..50303 never occur). 2.84B parameters, 0.19B active per token.

Training as nmoe's: 256 sequences of 2048 tokens per step (524,288 tokens), AdamW lr 1.8e-3,
betas 0.9 / 0.95 (0.99 for the routed experts), weight decay 0.1, WSD with 880 warmup steps and a
32,800-step schedule whose last 7,040 steps decay (so 12,000 steps never reach the decay, as in
nmoe), router-bias update 1e-3, a 1e-3 load-balancing loss over the global batch, bf16 compute.

Data (data/fineweb_edu/README.md, "100B shuffle"): training reads the source `fineweb_edu`, the
train shards of karpathy/fineweb-edu-100b-shuffle; data.dir is nmoe's validation shard
(shard_01822.parquet) prepared on its own, so `eval/loss` -- the loss the target is checked
against -- is that shard: 20 batches of 256 x 2048 = 10,485,760 tokens (nmoe's validation budget)
every 128 steps (nmoe's validation_every).

Stops at eval/loss <= 3.28 (`train.target_loss`, nmoe's target) or after 12,000 steps; the
downstream tasks in data/fineweb_edu/tasks (`python -m moejax.hub_tasks download
--out=data/fineweb_edu/tasks`) are scored at the last step (eval/core).

Mesh: the experts on an `expert` axis of 8 (32 experts per device; the batch and the non-expert
weights split over it too); `data` takes any devices beyond 8 (a TPU slice of 16, 32... chips).
"""
import copy

from moejax.configs import base_config

VOCAB_SIZE = 50304        # GPT-2's 50257 (50256 ranks + <|endoftext|>) padded to a multiple of 128
TARGET_LOSS = 3.28
STEPS = 12000


def get_config():
  c = base_config()

  c.data.dir = 'data/fineweb_edu/prepared_100bt_val'    # nmoe's val shard: eval/loss, the tokenizer
  c.data.raw = ''                                       # prepared by the recipe, never on the fly
  c.data.sources = {'fineweb_edu': {'dir': 'data/fineweb_edu/prepared_100bt', 'weight': 1.0}}

  m = c.model
  m.vocab_size = VOCAB_SIZE
  m.d_model, m.num_layers, m.num_dense_layers = 768, 12, 0
  m.attention = 'mha'
  m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 12, 12, 64
  m.num_experts, m.top_k, m.expert_ffn_dim = 256, 7, 384
  m.num_shared_experts, m.shared_expert_ffn_dim = 1, 0   # one shared expert of FFN 384
  m.dispatch = 'auto'            # ragged_a2a on GPUs with an expert axis, gmm on TPU (moejax.moe)
  m.bias_update_rate = 1e-3      # nmoe's router_bias_update_rate
  m.loss.balance_weight = 1e-3   # nmoe's aux_loss_alpha (a Switch-style loss over the batch)
  m.loss.balance_scope = 'global'
  m.precision = 'bf16'
  m.remat = 'full'

  t = c.train
  t.steps = STEPS
  t.batch_size, t.seq_len = 256, 2048
  t.log_every = 100
  t.eval_every = 128
  t.eval_batches = 20            # 20 x 256 x 2048 = 10,485,760 validation tokens
  t.target_loss = TARGET_LOSS    # stop once eval/loss <= this

  o = c.optim
  o.name, o.lr, o.b1, o.b2, o.eps, o.weight_decay = 'adamw', 1.8e-3, 0.9, 0.95, 1e-8, 0.1
  o.schedule, o.warmup_steps = 'wsd', 880
  o.decay_steps = 32800          # nmoe: 25,760 hold + 7,040 decay steps of 524,288 tokens
  o.decay_frac = 7040 / 32800
  o.min_lr_ratio = 1e-6 / 1.8e-3   # nmoe's decay_floor 1e-6
  o.clip_norm = 1.0
  # The routed experts get their own group for nmoe's adam_beta2_expert = 0.99.
  o.groups.hidden.match = '*_blocks/* & matrix & !*/router & !axis=expert'
  o.groups.experts = copy.deepcopy(o.groups.hidden)
  o.groups.experts.match = 'axis=expert'
  o.groups.experts.kwargs = 'b2=0.99'

  c.eval.tasks = 'data/fineweb_edu/tasks'   # python -m moejax.hub_tasks download --out=data/fineweb_edu/tasks
  c.eval.every = STEPS                      # only at the last step (CORE at the end)
  c.eval.max_examples = 1000                # nmoe's eval_budget_max_examples

  c.checkpoint.every = 2000
  c.checkpoint.max_to_keep = 1

  c.mesh = {'data': -1, 'fsdp': 1, 'expert': 8, 'tensor': 1}
  return c
