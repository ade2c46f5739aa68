# A tiny model for CPU: the README demo and the tests. ~3M non-embedding parameters.
# On 2 CPU cores (bf16 autocast) its 500 steps take 3 to 6 minutes, depending on the host's bf16 speed.
out_dir = "out/tiny"
data_dir = "data/pydocs"
device = "cpu"
dtype = "auto"
compile = False
batch_size = 16
block_size = 256
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 256
intermediate_size = 688     # ~8/3 * n_embd, rounded to a multiple of 16
learning_rate = 2e-3        # small models tolerate (and need) a larger step
min_lr = 2e-4
max_iters = 500
lr_decay_iters = 500
warmup_iters = 50
eval_interval = 100
val_tokens = 20480
log_interval = 20
