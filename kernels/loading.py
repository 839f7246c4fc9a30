"""Load a cross-encoder (Hugging Face id or local folder) and say exactly which weights scored."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # *ForSequenceClassification, eval mode, on its device
    tokenizer: object  # a fast tokenizer
    max_length: int  # longest pair the model accepts (position table and tokenizer limit)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, saved: torch.dtype | str | None = None) -> torch.dtype:
    """`auto`: float32 on CPU; on CUDA bfloat16 for a checkpoint saved in bfloat16 (trained in it, its
    activations may pass fp16's 65,504) where the GPU has it, else float16 (vLLM's rule). `saved` is the
    config's `dtype`."""
    if dtype != "auto":
        return DTYPE_BY_NAME[dtype]
    if device.type != "cuda":
        return torch.float32
    if str(saved).removeprefix("torch.") == "bfloat16" and native_bf16(device):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability 8.0 on): older GPUs (T4, V100) only emulate bf16, slowly, though
    `torch.cuda.is_bf16_supported()` says yes there by default."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def saved_dtype(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The dtype a checkpoint's config says it was saved in (None when it does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return getattr(config, "dtype", None)


def model_max_length(config, tokenizer, model=None) -> int:
    """The position table's usable length (RoBERTa's starts past the padding index), capped by the tokenizer."""
    positions = getattr(config, "max_position_embeddings", 512)
    table = getattr(getattr(getattr(model, "base_model", None), "embeddings", None), "position_embeddings", None)
    if getattr(table, "padding_idx", None) is not None:  # RoBERTa-style positions (data2vec, MPNet, XLM-R XL, ...)
        positions -= table.padding_idx + 1
    elif config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (config.pad_token_id or 1) + 1
    limit = getattr(tokenizer, "model_max_length", None) or positions
    return int(min(positions, limit if limit < 1_000_000 else positions))


def load_model(name_or_path: str, *, device: torch.device, dtype: torch.dtype, revision: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name_or_path}: crossrank needs a fast (Rust) tokenizer; none found")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                  use_safetensors=True)  # remote code only when asked; never unpickle weights
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
    except ValueError as e:  # DeBERTa(-v2/v3), MPNet, ...: no SDPA in transformers; their own attention then
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, attn_implementation="eager", **kwargs)
    model.eval().to(device=device, dtype=dtype)  # the dtype again: remote-code models may ignore the argument
    return LoadedModel(model=model, tokenizer=tokenizer, max_length=model_max_length(model.config, tokenizer, model))


def model_provenance(name_or_path: str, revision: str | None = None, *, trust_remote_code: bool = False) -> dict:
    """What is needed to load the very same weights again: the resolved hub commit, or a hash of local files."""
    out: dict = {"model": name_or_path, "requested_revision": revision}
    path = Path(name_or_path).expanduser()
    if not path.is_dir() and _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no model folder at {path.resolve()} (a hub id is 'name' or 'org/name')")
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path.resolve()} holds no config.json: not a Hugging Face model folder")
    if path.is_dir():
        from transformers import AutoConfig

        check_head(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))  # fails early
        out["model_path"] = str(path.resolve())
        out["weights_sha256"] = _hash_files(sorted(path.glob("*.safetensors")))
        out["tokenizer_sha256"] = _hash_files(sorted(p for p in path.glob("*") if "tok" in p.name or p.name == "vocab.txt"))
        out["config_sha256"] = _hash_files([path / "config.json"])  # labels, activation, ... (checked above)
        out["resolved_revision"] = None
        return out
    from transformers import AutoConfig

    # The hub commit the revision resolved to (from the local cache when offline): replays load exactly it.
    cfg = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    check_head(cfg)
    out["resolved_revision"] = getattr(cfg, "_commit_hash", None)
    return out


def check_head(config) -> None:
    """crossrank scores one number per pair: a one-logit head's logit, or a two-class head's margin
    logit[1] - logit[0] (whose sigmoid is softmax[1], the usual reading of a two-class reranker). A head with
    more classes (an NLI model: entailment, neutral, contradiction) has no such number: refused, never guessed."""
    n = int(getattr(config, "num_labels", 1) or 1)
    kind = getattr(config, "problem_type", None)
    if n == 2 and kind in ("multi_label_classification", "regression"):
        raise ValueError(f"the model's two-output head is {kind!r}: two independent outputs, not two classes; "
                         "crossrank cannot pick one score for it")
    if n > 2:
        labels = ", ".join(str(v) for v in (getattr(config, "id2label", None) or {}).values())
        raise ValueError(f"the model's head has {n} labels ({labels}); crossrank scores rerankers with one "
                         "logit, or two classes (scored as logit[1] - logit[0])")


def _looks_like_path(name: str) -> bool:
    """A folder the user meant, not a hub id: an explicit path, more parts than 'org/name', or a first part
    that is a folder here (`examples/tiny-model` with a typo)."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def model_identity(provenance: dict) -> dict:
    """Which weights score (from `model_provenance`): a local folder by its files' hashes (wherever it lives,
    however the path is spelt; new weights under the same path are another model), a hub id by the commit
    its revision resolved to."""
    if provenance.get("model_path"):
        return {k: provenance.get(k) for k in ("weights_sha256", "tokenizer_sha256", "config_sha256")}
    return {"model": provenance["model"],
            "revision": provenance.get("resolved_revision") or provenance.get("requested_revision")}


def then_now(before, now) -> str:
    """Two values side by side for an error message, cut to a readable length."""
    text = f"{json.dumps(before, sort_keys=True)} then, {json.dumps(now, sort_keys=True)} now"
    return text if len(text) <= 300 else text[:297] + "..."


def _hash_files(paths: list[Path]) -> str | None:
    if not paths:
        return None
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def cpu_threads() -> int:
    """Cores this process may use: OMP_NUM_THREADS when a scheduler (Ray) set it, else the affinity mask."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
