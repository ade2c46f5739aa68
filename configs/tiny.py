# Phase 1 of the tiny CPU recipe (the quick start): 4 layers x 96 on pydocs with a 2048-token BPE
# (python prepare_data.py --vocab_size 2048), 0.44M non-embedding parameters, 2.8M tokens (~4.3 epochs), with Muon.
# Sized by measurement for 2 CPU cores (docs/performance.md, "The quick start per host kind"): at this budget the
# loss is bought by tokens more than by width (4 x 128 and 4 x 256 were no better per token up to 0.7M tokens, and
# cost 1.3x and 4x as much per token), and a 2048-token vocabulary makes the lm_head, most of a narrow model's FLOPs,
# half as costly for the same bytes.
# Muon for the blocks' matrices (muon.py) ended phase 1 at 1.703 bits per byte where AdamW ended at 1.837 (2.5M tokens
# each), at ~11% more time per step; 2,700 steps of it end the quick start at 1.667 bits per byte (AdamW's 2,400:
# 1.808).
out_dir = "out/tiny"
data_dir = "data/pydocs"
device = "cpu"
dtype = "auto"  # fp32 on a CPU without native bf16 (AVX2: bf16 autocast is 7-20x slower), bf16 with it
# torch.compile does not pay back in the quick start: its step took 0.71-0.89x the CPU time, but compiling took
# ~51 CPU-seconds on a fresh clone's cold cache where phase 1 saves ~39 (bf16, AVX-512 BF16 host, 1e62797;
# docs/performance.md)
compile = False
batch_size = 8  # 8 x 128 = 1,024 tokens per step: small steps (512 tokens per step learned no more per token)
block_size = 128
gradient_accumulation_steps = 1
n_layer = 4
n_head = 3  # head_dim 32
n_kv_head = 3
n_embd = 96
intermediate_size = 256  # 8/3 * n_embd
tie_embeddings = True  # the lm_head is the embedding: less to learn from 0.6M tokens, no second 2048 x 96 matrix
muon = True  # Muon for the blocks' matrices, AdamW for the embedding and gains
learning_rate = 6e-3  # Muon's peak (its update has AdamW's RMS): 6e-3 ended 0.013 bits per byte below 4e-3
min_lr = 6e-4
max_iters = 2700
lr_decay_iters = 2700
warmup_iters = 100
eval_interval = 450
val_tokens = 20480  # the val set: the first 20,480 tokens of the val split, in every phase
log_interval = 100
