"""Build small (or real-shaped) Hugging Face checkpoints without the model hub.

Tests, the demo and benchmarks use models edgetune builds itself:

- `tiny` (0.72M parameters, hidden 128, 4 layers): a byte-level BPE trained
  on the built-in corpus, an embedding/output head initialised large enough
  to give confident logits, then a brief full-parameter pre-training pass
  (150 steps, ~6 s of CPU) that teaches the chat layout and end of turn. Why:
  see `pretrain.py`. float32.
- `small` (~29M): benchmark shape, float32, random weights (pre-training it
  here would take minutes).
- `qwen2.5-0.5b`, `qwen2.5-1.5b`, `llama-3.2-1b`: the real shapes and config
  with random weights, no pre-training, written in bfloat16 one tensor at a
  time (the tokenizer is the small one; embedding rows past it are unused).

The folder is a standard Hugging Face layout that both `mlx_lm.load` and
`transformers` load; it is written atomically, and the same preset, arch and
seed give byte-identical files on the same machine (pre-training runs
OpenBLAS on one thread, so its thread count does not matter).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgetune.errors import UserError
from edgetune.fileio import atomic_dir, write_json
from edgetune.model import corpus
from edgetune.model.pretrain import pack_documents
from edgetune.model.pretrain import pretrain as run_pretrain  # `pretrain` is also a parameter below
from edgetune.model.tokenizer import CHAT_FORMATS, special_tokens_map, tokenizer_config, train_tokenizer
from edgetune.runtime import blas_info, mlx_core

ARCHS = ("qwen2", "llama")

LLAMA3_ROPE_SCALING = {
    "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3",
}

# What the arch decides when the preset does not: the family's own defaults.
# The tiny llama keeps a separate lm_head so the untied path gets exercised.
ARCH_DEFAULTS = {
    "qwen2": {"rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "max_position_embeddings": 32768},
    "llama": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SCALING, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "max_position_embeddings": 131072},
}

# Model shapes. `arch` pins a preset named after a real model to its family;
# `pretrain_steps` is the length of the built-in pass (0: none).
PRESETS: dict[str, dict] = {
    "tiny": {
        "arch": None, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1024,
        "dtype": "float32", "pretrain_steps": 150,
    },
    "small": {
        "arch": None, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 8, "intermediate_size": 1376, "vocab_size": 8192,
        "dtype": "float32", "pretrain_steps": 0,
    },
    "qwen2.5-0.5b": {
        "arch": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "dtype": "bfloat16", "pretrain_steps": 0,
    },
    "qwen2.5-1.5b": {
        "arch": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "dtype": "bfloat16", "pretrain_steps": 0,
    },
    "llama-3.2-1b": {
        "arch": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SCALING,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "dtype": "bfloat16", "pretrain_steps": 0,
    },
}

TOKENIZER_VOCAB = 1024  # the corpus supports ~1150 merges; 1024 keeps the tiny head small
INIT_STD = 0.02  # the usual Hugging Face initializer_range, for every matrix but the head
# The embedding and output head start at std gain/sqrt(hidden), not 0.02: at
# hidden 128 a 0.02 head caps every logit near 0.02 * 128 ~ 2.6, the LoRA
# plateau this builder exists to avoid (see pretrain.py). Measured with LoRA
# rank 8 on five unseen answers: gain 1 already makes a random model
# teachable; before the pre-training pass gain 4 works best (gain 1 or 2:
# LoRA several times slower afterwards; gain 8: 150 steps cannot tame it).
HEAD_GAIN = 1.0
PRETRAIN_HEAD_GAIN = 4.0

# The pre-training pass: 150 steps x 4 rows x 64 tokens, ~5 passes over the
# ~8k-token corpus. On a 2-core CPU MLX's exp() bounds the step time, so many
# small steps beat few large ones: 60 steps of 16 rows left the model in a
# degenerate state that LoRA taught more slowly than a random one. Measured
# over seeds 0-2: 2 layers or 100 steps sometimes left LoRA 3-10x slower;
# 4 layers and 150 steps never did.
PRETRAIN_BATCH = 4
PRETRAIN_SEQ_LEN = 64
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20


def resolve_shape(preset: str, arch: str | None) -> tuple[str, dict]:
    """Return `(arch, shape)` for a preset; raises UserError naming the bad value."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset])
    pinned = shape.pop("arch")
    if arch is not None and arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: unknown architecture; choose one of {', '.join(ARCHS)}")
    if pinned is not None and arch is not None and arch != pinned:
        raise UserError(f"--arch {arch}: preset {preset!r} is a {pinned} model; drop --arch or pass --arch {pinned}")
    arch = arch or pinned or "qwen2"
    return arch, {**ARCH_DEFAULTS[arch], **shape}


def hf_config(arch: str, shape: dict, token_ids: dict[str, int]) -> dict:
    """config.json in the form the real checkpoints on the hub use (rope_theta at top level)."""
    fmt = CHAT_FORMATS[arch]
    common = {
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": INIT_STD,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "rms_norm_eps": shape["rms_norm_eps"],
        "rope_scaling": shape["rope_scaling"],
        "rope_theta": shape["rope_theta"],
        "tie_word_embeddings": shape["tie_word_embeddings"],
        "torch_dtype": shape["dtype"],
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }
    if arch == "qwen2":
        # As in Qwen2.5: bos_token_id names <|endoftext|> though no BOS is ever added.
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "bos_token_id": token_ids[fmt.doc_end], "eos_token_id": token_ids[fmt.eos],
            "max_window_layers": shape["num_hidden_layers"], "sliding_window": None,
            "use_sliding_window": False, **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": token_ids[fmt.bos], "eos_token_id": [token_ids[t] for t in fmt.stop_tokens],
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"], **common,
    }


def generation_config(arch: str, token_ids: dict[str, int]) -> dict:
    fmt = CHAT_FORMATS[arch]
    out = {"eos_token_id": [token_ids[t] for t in fmt.stop_tokens], "pad_token_id": token_ids[fmt.pad]}
    if fmt.bos is not None:
        out = {"bos_token_id": token_ids[fmt.bos], **out}
    return out


def init_params(shapes: dict[str, tuple[int, ...]], seed: int, dtype, head_gain: float = HEAD_GAIN) -> Iterator:
    """Yield `(name, array)` in sorted name order, each from its own key split off `seed`.

    Matrices N(0, 0.02); the embedding and lm_head N(0, head_gain/sqrt(hidden));
    biases zero; norm weights one.

    One tensor at a time (lazy until the caller evaluates it), so a 1.5B model
    never needs more than one float32 tensor in memory at once.
    """
    mx = mlx_core()
    names = sorted(shapes)
    keys = mx.random.split(mx.random.key(seed), len(names))
    for i, name in enumerate(names):
        shape = shapes[name]
        if len(shape) == 1:  # norms are weights of ones, biases start at zero
            value = mx.zeros(shape) if name.endswith(".bias") else mx.ones(shape)
        else:
            std = head_gain * shape[-1] ** -0.5 if name in _HEAD_PARAMS else INIT_STD
            value = mx.random.normal(shape, key=keys[i]) * std
        yield name, value.astype(dtype)


_HEAD_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")

_SAFETENSORS_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, tensors) -> None:
    """Stream `tensors` ((name, mx.array) in sorted name order) into a .safetensors file.

    The header is computed from `shapes` first, so each tensor is evaluated,
    written and dropped in turn. Metadata says format "pt", which transformers
    requires. Raises ValueError if a tensor's name or shape disagrees.
    """
    mx = mlx_core()
    code, size = _SAFETENSORS_DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = size * math.prod(shapes[name])
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, array), expected in zip(tensors, sorted(shapes), strict=True):
            if name != expected or tuple(array.shape) != tuple(shapes[name]):
                raise ValueError(f"write_safetensors: got {name} {array.shape}, expected {expected} {shapes[expected]}")
            mx.eval(array)
            f.write(bytes(memoryview(array)))


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run OpenBLAS on one thread inside the block, then restore its thread count.

    For the tiny model's small matrices a second thread only adds spinning
    (on a busy 2-core machine: 33 s of system time in one test run, against
    2 s), and OpenBLAS sums in a different order with 1 and 2 threads, so one
    thread also makes the pre-trained weights the same whatever
    OPENBLAS_NUM_THREADS says. A no-op where OpenBLAS is not loaded (macOS,
    EDGETUNE_FAST_BLAS=0). Not safe while another thread runs BLAS work.
    """
    lib = ctypes.CDLL(None)  # runtime.setup_fast_blas loads OpenBLAS RTLD_GLOBAL
    if not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)


def _mlx_model(arch: str, config: dict):
    """The mlx-lm module for `config`; its own init is lazy and never evaluated."""
    from mlx_lm.models import llama, qwen2

    module = qwen2 if arch == "qwen2" else llama
    return module.Model(module.ModelArgs.from_dict(config))


def _pretrain_documents(folder: Path, arch: str) -> list[tuple[list[int], list[int]]]:
    """The built-in corpus as `(token_ids, loss_mask)`, rendered by the folder's own tokenizer.

    Going through transformers means pre-training sees exactly the token ids
    fine-tuning and inference will see. In chats only the assistant turns
    count, end-of-turn token included (as in SFT): a few seconds of training
    then go to answering and stopping, not to guessing user questions. Prose
    counts whole and ends with the document-end token.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    doc_end = tok.convert_tokens_to_ids(CHAT_FORMATS[arch].doc_end)

    def render(messages, add_generation_prompt=False):
        return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=False))

    docs = []
    for conv in corpus.conversations():
        ids = render(conv)
        mask = [0] * len(ids)
        for i, message in enumerate(conv):
            if message["role"] == "assistant":
                start, end = len(render(conv[:i], add_generation_prompt=True)), len(render(conv[:i + 1]))
                assert ids[:end] == render(conv[:i + 1]), "chat template must render prefixes consistently"
                mask[start:end] = [1] * (end - start)
        docs.append((ids + [doc_end], mask + [0]))
    for text in corpus.PROSE:
        ids = tok.encode(text, add_special_tokens=True) + [doc_end]
        docs.append((ids, [1] * len(ids)))
    return docs


def build_tiny_model(
    out_dir: str | Path,
    arch: str | None = None,
    preset: str = "tiny",
    seed: int = 0,
    pretrain: bool = True,
    force: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Write a Hugging Face model folder at `out_dir` and return its path.

    `arch=None` means the preset's own family (qwen2 for tiny and small).
    `pretrain` runs the built-in pass where the preset has one (only tiny:
    on this CPU it would take minutes for small); `on_step(step, loss)`
    reports its progress. Raises UserError for an unknown preset or arch, a
    preset/arch clash, or an existing `out_dir` without `force` (checked
    before any work is done).
    """
    arch, shape = resolve_shape(preset, arch)
    steps = shape["pretrain_steps"] if pretrain else 0
    head_gain = PRETRAIN_HEAD_GAIN if steps else HEAD_GAIN
    mx = mlx_core()
    from mlx.utils import tree_flatten, tree_unflatten

    with atomic_dir(out_dir, replace=force) as tmp:
        tok = train_tokenizer(arch, TOKENIZER_VOCAB)
        token_ids = {s: tok.token_to_id(s) for s in CHAT_FORMATS[arch].specials}
        assert tok.get_vocab_size() <= shape["vocab_size"], "a preset's vocab_size must cover the tokenizer"
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(arch, tok, shape["max_position_embeddings"]))
        write_json(tmp / "special_tokens_map.json", special_tokens_map(arch))
        config = hf_config(arch, shape, token_ids)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation_config(arch, token_ids))

        model = _mlx_model(arch, config)
        shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        dtype = getattr(mx, shape["dtype"])
        provenance = {
            "preset": preset, "arch": arch, "seed": seed, "params": sum(math.prod(s) for s in shapes.values()),
            "init_std": INIT_STD, "head_init_std": f"{head_gain:g}/sqrt(hidden_size)",
            "blas": blas_info()["why"], "pretrain": None,
        }
        if steps:
            model.update(tree_unflatten(list(init_params(shapes, seed, mx.float32, head_gain))))
            docs = _pretrain_documents(tmp, arch)
            rows, masks = pack_documents(docs, PRETRAIN_SEQ_LEN, steps * PRETRAIN_BATCH,
                                         np.random.default_rng(seed))
            shape3 = (steps, PRETRAIN_BATCH, PRETRAIN_SEQ_LEN + 1)
            with _one_blas_thread():
                losses = run_pretrain(model, rows.reshape(shape3), masks.reshape(shape3), PRETRAIN_LR,
                                      PRETRAIN_WARMUP, on_step)
            provenance["pretrain"] = {
                "steps": steps, "batch": PRETRAIN_BATCH, "seq_len": PRETRAIN_SEQ_LEN, "lr": PRETRAIN_LR,
                "warmup": PRETRAIN_WARMUP, "corpus_tokens": sum(len(ids) for ids, _ in docs),
                "counted_tokens": int(sum(sum(mask) for _, mask in docs)),
                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            }
            params = ((k, v.astype(dtype)) for k, v in sorted(tree_flatten(model.parameters())))
        else:
            params = init_params(shapes, seed, dtype, head_gain)
        write_safetensors(tmp / "model.safetensors", shapes, shape["dtype"], params)
        write_json(tmp / "edgetune_build.json", provenance)
    return Path(out_dir)
