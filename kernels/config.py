"""Engine settings, each with the reason for its default."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

DTYPES = ("auto", "float16", "bfloat16", "float32")
ENGINES = ("auto", "packed", "padded")
ACTIVATIONS = ("identity", "sigmoid")


@dataclass
class EngineConfig:
    device: str = "auto"  # "auto" = cuda when visible, else cpu
    dtype: str = "auto"  # auto = on CUDA bfloat16 for a checkpoint saved in it, else float16; float32 on CPU
    compile: bool | None = None  # None = on for CUDA, off for CPU (compile costs minutes, wins little on CPU)
    engine: str = "auto"  # auto = packed (padding-free) when the architecture supports it, else padded
    max_length: int | None = None  # None = the model's own limit; pairs longer are truncated longest-first
    # Tokens per forward. Padded engine: batch count x padded length; packed engine: sum of real lengths.
    # 16,384 is text-embeddings-inference's default budget; on CPU smaller batches keep caches warm.
    max_batch_tokens: int | None = None  # None = 16384 on CUDA, 4096 on CPU
    max_batch_size: int = 1024  # cap on pairs per batch, whatever the budget allows
    bucketing: bool = True  # sort by token length before cutting batches (False = input order, for benchmarks)
    activation: str = "identity"  # raw logits; "sigmoid" maps them to (0, 1) — still not probabilities
    chunk_pairs: int = 8192  # pairs tokenized and sorted together; the next chunk tokenizes during this one's forward
    # Threads tokenizing ahead of the device; 0 = inline (tokenize a chunk, run it). On 2 CPU cores, inline
    # measured no faster than 2 (0.94x, interleaved A/B, BENCHMARKS.md), so 2 everywhere.
    tokenizer_threads: int = 2
    extra: dict = field(default_factory=dict)  # free-form notes carried into stats (e.g. fault injection)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 16:
            raise ValueError(f"max_batch_tokens must be >= 16, got {self.max_batch_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)
