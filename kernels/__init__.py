"""The scoring engine: model loading, pair tokenization, batching and the forward pass.

Runs alone on a GPU box with only torch, transformers, numpy and pyarrow: nothing here imports ray or
polars. `jobs/` wraps it in Ray actors. Read top to bottom: config -> loading -> pairs -> batching ->
padded / packed forward -> engine.
"""
