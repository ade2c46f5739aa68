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
muon = True  # as phase 1 (a fresh optimizer: stack.py's default --optim reset)
learning_rate = 1e-3  # a sixth of phase 1's peak: the copies start trained, and with Muon the grown model
min_lr = 1e-4  # ended at 1e-3 and 2e-3 alike (1.694, 1.697) and far worse at 4e-3 (docs/performance.md)
max_iters = 500
lr_decay_iters = 500
warmup_iters = 50  # a fresh AdamW needs its own warmup: its moments start at zero
eval_interval = 100
val_tokens = 20480  # the same val set as phase 1's
log_interval = 50
