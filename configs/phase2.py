# Phase 2 of the MTLM1-200M recipe: the 24-layer model grown from phase 1, trained on for 3.5B tokens.
#   python stack.py                 # out/phase1 -> out/stacked.pt: stack, factor 2 (its defaults)
#   torchrun --standalone --nproc_per_node=8 train.py configs/phase2.py
# 24 layers x 768: 169.9M non-embedding + 38.6M tied embedding = 208.5M parameters
# (python bench.py configs/phase2.py --params, once out/stacked.pt exists; before: configs/phase1.py --n_layer 24).
# The architecture comes from the stacked checkpoint; only training settings live here.
out_dir = "out/phase2"
data_dir = "data/reference"  # the same data: training continues where phase 1's loader stopped
init_from = "out/stacked.pt"
block_size = 2048
# twice the depth: half phase 1's micro-batch, twice the accumulation, ~29 GiB a GPU; on 24 GB: --batch_size=4
# --gradient_accumulation_steps=64 (docs/training.md, "Memory: what fits on one GPU")
batch_size = 8
gradient_accumulation_steps = 32
# 6,676 steps x 524,288 tokens = 3.5B tokens, as the reference model
max_iters = 6676
lr_decay_iters = 6676
warmup_iters = 500  # a fresh AdamW needs its own warmup: its moments start at zero
learning_rate = 3e-4  # lower than phase 1: the copied layers start from trained weights
min_lr = 3e-5
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 500
val_tokens = 8_388_608  # 4,096 windows of 2048 tokens: the same val set in both phases and on any number of GPUs
dtype = "auto"  # bf16 on GPUs that have it (common.auto_dtype)
compile = True
keep_last = 3
wandb_log = False
wandb_run_name = "phase2"
