"""The scoring engine: model loading, pair tokenization, batching and the forward pass.

Runs alone on a GPU box with only torch, transformers, numpy and pyarrow: nothing here imports ray or
polars. `jobs/` wraps it in Ray actors. Read top to bottom: config -> loading -> pairs -> batching ->
padded / packed forward -> engine (-> overflow: NaN scores again in float32).
"""

# How a pair becomes a score, as a number a resume compares: committed shards scored under another rule
# must not be mixed with new ones. Bump it whenever the same model and pair would score differently; not for
# differences in the last bits, which another GPU, CPU or kernel (e.g. kernels/linear.py) makes anyway.
# 2: two-class heads scored by their margin; truncation_side and split_special_tokens kept; a literal pad
#    token in RoBERTa text positioned as Hugging Face does.
# 3: a pair whose fp16/bf16 score is NaN/inf is scored again in float32 (kernels/overflow.py), one still NaN
#    is rejected, and a NaN pair no longer spreads to its packed batch's other pairs on the CPU attention path.
SCORE_RULE = 3
