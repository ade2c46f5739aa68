# Phase 2 of the tiny CPU recipe: the 4-layer tiny model grown to 8 layers, trained on for 500 steps (0.5M tokens).
#   python train.py configs/tiny.py
#   python stack.py --src out/tiny --out out/tiny_stacked.pt
#   python train.py configs/tiny_stack.py
# The architecture comes from the stacked checkpoint; only training settings live here.
out_dir = "out/tiny_stack"
data_dir = "data/pydocs"  # the same data: the loader continues where phase 1 stopped
init_from = "out/tiny_stacked.pt"
device = "cpu"
dtype = "auto"
compile = False
batch_size = 8
block_size = 128
gradient_accumulation_steps = 1
muon = True  # as phase 1; a fresh optimizer (stack.py's default --optim reset): Muon's momentum starts at zero
# a sixth of phase 1's peak: the copies start trained, and Muon's grown phase wants a low peak. After a phase 1 at
# 6e-3 (2.46M tokens) 1e-3 ended this phase at 1.682 bits per byte (after the quick start's 2,700 steps: 1.667);
# after one at 4e-3, 1e-3 and 2e-3 ended alike (1.694, 1.697) and 4e-3 far worse (1.867 at its step 200); the runs
# that sized the quick start, docs/performance.md
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 500
lr_decay_iters = 500
warmup_iters = 50  # a fresh optimizer needs its own warmup: its momentum (and AdamW's moments) start at zero
eval_interval = 100
val_tokens = 20480  # the same val set as phase 1's
log_interval = 50
