"""Perplexity and bits per byte of an HF model on a ted-prep split (CPU or GPU, no process group).

Bits per byte = total negative log-likelihood / (ln 2 × UTF-8 bytes of the scored text), with the
bytes of each window's target tokens counted by decoding them (``target_bytes``: an EOS is one byte, the
separator between documents, whatever the tokenizer calls it); it compares models with different
tokenizers, perplexity does not.  The trainer's own eval counts bytes the same way.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable

import torch

from data_prep.tokenizer import load_tokenizer
from ted_ds.data import PackedShardDataset, collate
from ted_ds.errors import ConfigError


@torch.inference_mode()
def evaluate_hf(model_dir: str, data_dir: str, split: str = "valid", seq_len: int | None = None,
                batch_size: int = 8, max_samples: int | None = None, device: str = "auto",
                progress: bool = True, trust_remote_code: bool = False, per_window: bool = False) -> dict:
    """Perplexity, bits per byte and counts; with ``per_window`` also each window's mean NLL
    (``window_loss``), for paired comparisons of models on the same windows."""
    from ted_ds.architectures import load_hf_config, max_positions, vocab_size
    from ted_ds.export import trained_seq_len
    from ted_ds.plan import check_tokenizer
    from ted_ds.weights import load_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    config = load_hf_config(model_dir, trust_remote_code)
    limit = max_positions(config) or 1024
    seq_len = seq_len or trained_seq_len(model_dir) or min(limit, 1024)
    if seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
    data = PackedShardDataset(data_dir, split, seq_len)
    if vocab_size(config) < data.manifest["vocab_size"]:
        raise ConfigError(f"{model_dir}: vocab_size {vocab_size(config)} is smaller than the data's "
                          f"{data.manifest['vocab_size']}")
    check_tokenizer(model_dir, data.manifest, "model", data_dir)  # shards of another tokenizer score nonsense
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(model_dir, trust_remote_code, dtype=dtype, device=dev).eval()
    n = len(data) if max_samples is None else min(max_samples, len(data))
    nll, tokens, nbytes, windows = 0.0, 0, 0, []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="sample", desc="eval", file=sys.stderr, leave=False)
    for start in range(0, n, batch_size):
        x, y = collate(data, list(range(start, min(n, start + batch_size))))
        logits = model(input_ids=x.to(dev)).logits.float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.to(dev), reduction="none")  # (B, T)
        nll += token_nll.sum().item()
        windows += token_nll.mean(1).tolist()
        tokens += y.numel()
        nbytes += sum(target_bytes(tok, window) for window in torch.cat([x[:, :1], y], 1).tolist())
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    loss = nll / tokens
    result = {"model": model_dir, "data": data_dir, "split": split, "samples": n, "seq_len": seq_len,
              "tokens": tokens, "bytes": nbytes, "loss": loss, "ppl": math.exp(loss),
              "bits_per_byte": bits_per_byte(nll, nbytes)}
    return {**result, "window_loss": windows} if per_window else result


def bits_per_byte(nll: float, nbytes: int) -> float:
    """Bits per byte of text scored with a summed negative log-likelihood of ``nll`` nats."""
    return nll / (math.log(2) * nbytes)


def target_bytes(tok, window: list[int]) -> int:
    """UTF-8 bytes of the text a window's targets (``window[1:]``) spell after its first token, decoded a
    token at a time, each document apart: an EOS counts one byte (the separator; its name is no text), the
    first token is context (a SentencePiece word it precedes keeps its space), special tokens spell nothing
    and a character whose bytes run past the window's end is not counted."""
    from tokenizers.decoders import DecodeStream

    backend, eos = tok.backend_tokenizer, tok.eos_token_id
    stream = DecodeStream(skip_special_tokens=True)
    if window[0] != eos:
        stream.step(backend, window[0])
    n = 0
    for i in window[1:]:
        if i == eos:
            n, stream = n + 1, DecodeStream(skip_special_tokens=True)
        else:
            n += len((stream.step(backend, i) or "").encode("utf-8"))
    return n


def window_bytes(dataset: PackedShardDataset, tok) -> Callable[[int], int]:
    """Window index → ``target_bytes`` of that window of ``dataset``, each counted once."""
    return functools.lru_cache(maxsize=None)(lambda i: target_bytes(tok, dataset[i].tolist()))


def paired_difference(a: list[float], b: list[float], z: float = 1.96) -> dict:
    """Mean of ``a − b`` over the same evaluation windows with its normal 95 % interval; ``within_noise``
    when the interval holds 0. This is the evaluation sample's noise only, not a training seed's."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("inf")
    return {"mean": mean, "low": mean - z * se, "high": mean + z * se, "within_noise": abs(mean) <= z * se}


def write_rolling_task(task_dir: str, name: str, jsonl: str) -> str:
    """An lm-evaluation-harness task scoring whole documents (``{"text": ...}`` per line of
    ``jsonl``) with loglikelihood_rolling: word/byte perplexity and bits per byte, offline."""
    os.makedirs(task_dir, exist_ok=True)
    path = os.path.join(task_dir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.abspath(jsonl)}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""")
    return path
