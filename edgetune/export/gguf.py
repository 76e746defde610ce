"""Write a fused Hugging Face model folder as one GGUF file that llama.cpp and Ollama run.

Input: a folder with config.json (`model_type` llama or qwen2), `model*.safetensors`
with Hugging Face tensor names in float32, float16 or bfloat16, and the
tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json).
The output follows what llama.cpp's own `convert_hf_to_gguf.py` writes for these
two families:

- tensor names `token_embd`, `blk.N.attn_q` ... `output_norm`, `output`; no
  `output` when the embeddings are tied (llama.cpp then reuses `token_embd`);
- for `llama` the q/k rows are permuted as `LlamaModel.permute` does (llama.cpp
  rotates interleaved pairs there); `qwen2` keeps Hugging Face's layout (NeoX
  rotation in llama.cpp);
- Llama 3 rope scaling becomes a `rope_freqs` tensor of per-dimension factors;
- a `gpt2` (byte-level BPE) tokenizer: tokens in id order, padded with
  `[PAD{i}]` up to the embedding rows, added special tokens typed CONTROL, the
  merges, and the pre-tokenizer llama.cpp must use (recognised from the split
  regex in tokenizer.json).

Tensor types (`quant`): 1-D tensors (norms, biases, rope_freqs) are always F32.
Every 2-D weight, token_embd and output included, gets the requested type, as
the converter does for f16/q8_0 -- except for q4_0, where the output head
(`output`, or `token_embd` when tied, since it then is the head) is written Q8_0:
llama-quantize keeps the head at Q6_K for Q4_0 files because 4-bit logits cost
the most quality, and Q8_0 is the nearest type the `gguf` package can write.
A row length that is not a multiple of the block size (32) falls back to F16,
as in the converter. K-quants (q4_k_m ...) are refused: `gguf.quants` has no
quantizer for them; run llama.cpp's `llama-quantize` on the f16 file instead.

Memory stays bounded by one chunk of rows (~32 MiB of float32), never a whole
tensor: the tensor directory and metadata go out first (GGUFWriter's header,
key-value and tensor-info steps), then each tensor is read from the
safetensors file a chunk of rows at a time, converted and appended (measured
at the qwen2.5-0.5b shape, bf16: peak RSS 185 MiB for f16, q8_0 and q4_0,
against 1.9 GiB of float32 weights). The file is written to a temporary
sibling and renamed, so a failure leaves no partial .gguf behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from edgetune.errors import UserError

ARCHS = ("llama", "qwen2")

QUANTS: dict[str, QType] = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0}

_FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}

# The head's stand-in type for q4_0 files (see the module docstring).
_Q4_HEAD_TYPE = QType.Q8_0

# Rows per chunk are chosen so one chunk holds about this many float32 values.
CHUNK_ELEMENTS = 8 * 1024 * 1024

# Hugging Face name -> GGUF name. Per-layer names are relative to `model.layers.N.`.
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# q/k/v biases: always there in qwen2 (llama.cpp requires them); llama has them only with attention_bias.
_QKV_BIASES = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp), keyed by the split regex
# a Hugging Face tokenizer.json carries for that family. The regex decides how
# text is cut before BPE, so a wrong name silently changes tokenization.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCT_SPACE = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _CONTRACTIONS + r"\p{N}" + _PUNCT_SPACE: "qwen2",  # digits one at a time
    _CONTRACTIONS + r"\p{N}{1,3}" + _PUNCT_SPACE: "llama-bpe",  # Llama 3: digits in groups of up to three
}

# safetensors dtype -> (numpy dtype as stored, bytes per value). bfloat16 is read
# as uint16 and widened by hand: numpy has no bfloat16, and safetensors' numpy
# loader raises TypeError on BF16 tensors.
_SOURCE_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


# --- the model folder -------------------------------------------------------------------------

@dataclass(frozen=True)
class Hyper:
    """The config.json values the GGUF header and the tensor checks need."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab_rows: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    rope_scaling: dict | None  # llama3 parameters, or None
    explicit_head_dim: bool  # config.json names head_dim: written as key/value length, as the converter does


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise UserError(f"{path}: missing; a model folder needs it (is this a Hugging Face model folder?)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_hyper(model_dir: Path) -> Hyper:
    """Validate config.json; raises UserError naming every missing key at once."""
    path = model_dir / "config.json"
    config = read_json(path)
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise UserError(f"{path}: model_type {arch!r} is not supported for GGUF export; "
                        f"supported: {', '.join(ARCHS)}")
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings", "rms_norm_eps")
    missing = [k for k in needed if config.get(k) is None]
    # transformers 5 moves rope_theta/rope_scaling into `rope_parameters`.
    rope_params = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope_params.get("rope_theta"))
    if rope_theta is None:
        missing.append("rope_theta")
    if missing:
        raise UserError(f"{path}: missing {', '.join(repr(k) for k in missing)}; GGUF export needs them")
    scaling = config.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default"
                                             else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type != "llama3" or arch != "llama":
        raise UserError(f"{path}: rope scaling {rope_type!r} on a {arch} model is not supported for GGUF export "
                        f"(supported: none, or llama3 on llama models)")
    heads = config["num_attention_heads"]
    return Hyper(
        arch=arch, hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn=config["intermediate_size"], vocab_rows=config["vocab_size"],
        context=config["max_position_embeddings"], rope_theta=float(rope_theta),
        rms_eps=float(config["rms_norm_eps"]), tied=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=scaling, explicit_head_dim=config.get("head_dim") is not None,
    )


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    offset: int  # absolute byte offset of the first value
    dtype: str  # safetensors code: F32, F16, BF16
    shape: tuple[int, ...]

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` as a float32 array of shape (stop - start, row_len)."""
        stored, size = _SOURCE_DTYPES[self.dtype]
        count = (stop - start) * self.row_len
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * self.row_len * size)
            raw = np.fromfile(f, dtype=stored, count=count)
        if raw.size != count:
            raise UserError(f"{self.file}: ends early (truncated download or copy?)")
        if self.dtype == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        return values.reshape(stop - start, self.row_len)


def index_safetensors(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor in `model*.safetensors` (the files mlx-lm and transformers load), by name."""
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no model*.safetensors; export needs the fused model's weights")
    out: dict[str, SourceTensor] = {}
    for file in files:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{file}: not a safetensors file (too short)")
            n = int.from_bytes(head, "little")  # the format: u64 header length, JSON header, raw data
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{file}: not a safetensors file (bad header)") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise UserError(f"{file}: tensor {name!r} also appears in {out[name].file.name}")
            if info["dtype"] not in _SOURCE_DTYPES:
                raise UserError(f"{file}: tensor {name!r} is {info['dtype']}; export reads float32, float16 or "
                                f"bfloat16 (dequantize when fusing: mlx_lm.fuse --dequantize)")
            out[name] = SourceTensor(file, 8 + n + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
    return out


# --- which tensors, named how, in which type ---------------------------------------------------

@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its name, shape (numpy order), type, and where its values come from."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    source: str | None  # Hugging Face name; None for rope_freqs, computed from config
    permute_heads: int | None = None  # llama q/k: heads whose rows are re-ordered

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * type_size


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name, or None when it has none."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def tensor_type(name: str, shape: tuple[int, ...], quant: QType, tied: bool) -> QType:
    """The type a tensor is written in, for a file of type `quant` (policy in the module docstring)."""
    if len(shape) == 1:
        return QType.F32
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    want = _Q4_HEAD_TYPE if quant == QType.Q4_0 and head else quant
    block, _ = gguf.GGML_QUANT_SIZES[want]
    return want if shape[-1] % block == 0 else QType.F16


def plan_tensors(hp: Hyper, sources: dict[str, SourceTensor], quant: QType, model_dir: Path) -> list[TensorPlan]:
    """Map, check and type every tensor; raises UserError listing missing, unknown or misshapen ones."""
    expected: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_rows, hp.hidden),
        "model.norm.weight": (hp.hidden,),
    }
    if not hp.tied:
        expected["lm_head.weight"] = (hp.vocab_rows, hp.hidden)
    q_rows, kv_rows = hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim
    per_layer = {
        "input_layernorm.weight": (hp.hidden,), "post_attention_layernorm.weight": (hp.hidden,),
        "self_attn.q_proj.weight": (q_rows, hp.hidden), "self_attn.k_proj.weight": (kv_rows, hp.hidden),
        "self_attn.v_proj.weight": (kv_rows, hp.hidden), "self_attn.o_proj.weight": (hp.hidden, q_rows),
        "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
        "mlp.gate_proj.weight": (hp.ffn, hp.hidden), "mlp.up_proj.weight": (hp.ffn, hp.hidden),
        "mlp.down_proj.weight": (hp.hidden, hp.ffn),
    }
    optional = set()
    for i in range(hp.layers):
        for key, shape in per_layer.items():
            expected[f"model.layers.{i}.{key}"] = shape
            if key in _QKV_BIASES and hp.arch == "llama":
                optional.add(f"model.layers.{i}.{key}")

    problems = []
    if any(n.endswith((".scales", ".biases")) for n in sources):
        problems.append("holds quantized weights (.scales/.biases); export needs an unquantized model "
                        "(fuse with mlx_lm.fuse --dequantize)")
    missing = [n for n in expected if n not in sources and n not in optional]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    # A tied model's checkpoint may still carry a copy of the head; llama.cpp reads token_embd.
    skipped = {"lm_head.weight"} if hp.tied else set()
    unknown = [n for n in sources if n not in expected and n not in skipped and not n.endswith(_IGNORED_SUFFIXES)
               and not n.endswith((".scales", ".biases"))]
    if unknown:
        problems.append(f"tensors with no GGUF mapping for {hp.arch}: {', '.join(sorted(unknown)[:5])}")
    for n, shape in expected.items():
        if n in sources and sources[n].shape != shape:
            problems.append(f"{n} has shape {list(sources[n].shape)}, config.json implies {list(shape)}")
    if problems:
        raise UserError(f"{model_dir}: cannot export to GGUF:\n  " + "\n  ".join(problems))

    plan = []
    if hp.rope_scaling is not None:
        plan.append(TensorPlan("rope_freqs.weight", (hp.head_dim // 2,), QType.F32, None))
    for hf_name in expected:
        if hf_name not in sources:
            continue
        name = gguf_name(hf_name)
        shape = expected[hf_name]
        permute = None
        if hp.arch == "llama" and ".q_proj." in hf_name:
            permute = hp.heads
        elif hp.arch == "llama" and ".k_proj." in hf_name:
            permute = hp.kv_heads
        plan.append(TensorPlan(name, shape, tensor_type(name, shape, quant, hp.tied), hf_name, permute))
    return plan


def llama_row_order(rows: int, n_heads: int) -> np.ndarray:
    """Source row of each output row for llama's q/k (convert_hf_to_gguf.py's `LlamaModel.permute`).

    Hugging Face stores each head's rotary pairs as two halves (dims i and
    i + d/2); llama.cpp's llama rotates adjacent pairs (2i, 2i+1). The converter
    does `w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2).reshape(w.shape)`;
    this is the same re-ordering as an index, so it can be applied a chunk of
    whole heads at a time.
    """
    return np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def llama3_rope_factors(hp: Hyper) -> np.ndarray:
    """`rope_freqs`: per-dimension divisors of the rotary frequency (convert_hf_to_gguf.py, LlamaModel)."""
    s = hp.rope_scaling
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_context = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    out = np.where(wavelen < old_context / high, 1.0,
                   np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


# --- the tokenizer ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecialTokens:
    """Special-token ids and text from the tokenizer files (shared with the Modelfile writer)."""

    ids: dict[str, int]  # token text -> id, every token in tokenizer.json
    bos: int | None
    eos: int | None
    pad: int | None
    stops: tuple[int, ...]  # eos first, then every other id generation stops on
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def text(self, token_id: int) -> str | None:
        return next((t for t, i in self.ids.items() if i == token_id), None)


def _token_text(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def read_special_tokens(model_dir: Path) -> SpecialTokens:
    """eos/bos/pad/stops, add-BOS and the chat template, the way the model's own tokenizer uses them.

    eos is tokenizer_config's eos_token (for chat models the end-of-turn token
    generation must stop on); when it has none, the first eos id of
    generation_config.json, then config.json. `stops` adds every other eos id
    those files list. BOS is added when tokenizer_config says so or when the
    tokenizer.json post-processor prepends it (Llama 3 does the latter).
    """
    tok = read_json(model_dir / "tokenizer.json")
    tok_config = read_json(model_dir / "tokenizer_config.json", required=False)
    gen_config = read_json(model_dir / "generation_config.json", required=False)
    config = read_json(model_dir / "config.json", required=False)
    ids = dict(tok.get("model", {}).get("vocab", {}))
    ids.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})

    def lookup(key: str) -> int | None:
        text = _token_text(tok_config.get(key))
        return ids.get(text) if text is not None else None

    eos = lookup("eos_token")
    listed = _id_list(gen_config.get("eos_token_id")) + _id_list(config.get("eos_token_id"))
    if eos is None and listed:
        eos = listed[0]
    stops = tuple(dict.fromkeys(([eos] if eos is not None else []) + listed))
    bos = lookup("bos_token")
    if bos is None:  # Qwen2.5 names <|endoftext|> here though it never adds a BOS
        bos = next(iter(_id_list(config.get("bos_token_id"))), None)

    add_bos, add_eos = tok_config.get("add_bos_token"), tok_config.get("add_eos_token")
    post = tok.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0].get("SpecialToken", {}).get("id")
            last = proc["single"][-1].get("SpecialToken", {}).get("id")
            if add_bos is None:
                add_bos = first is not None and ids.get(first) == bos
            if add_eos is None:
                add_eos = last is not None and ids.get(last) == eos
    template = tok_config.get("chat_template")
    jinja = model_dir / "chat_template.jinja"  # newer transformers save the template in its own file
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: llama.cpp wants the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return SpecialTokens(ids=ids, bos=bos, eos=eos, pad=lookup("pad_token"), stops=stops,
                         add_bos=bool(add_bos), add_eos=bool(add_eos), chat_template=template)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    warnings: tuple[str, ...]


def pre_tokenizer_name(tok: dict) -> str | None:
    """llama.cpp's pre-tokenizer for tokenizer.json's split regex, or None when it has no match."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and "Regex" in splits[0].get("pattern", {}):
        return PRE_TOKENIZERS.get(splits[0]["pattern"]["Regex"])
    return None


def read_vocab(model_dir: Path, vocab_rows: int) -> Vocab:
    """The token list (padded to `vocab_rows`), token types and merges of a byte-level BPE tokenizer.json."""
    path = model_dir / "tokenizer.json"
    tok = read_json(path)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports byte-level BPE "
                        f"tokenizers (the llama 3 and qwen2 families)")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model.get("vocab", {}).items()}
    for t in tok.get("added_tokens", []):
        by_id[t["id"]] = (t["content"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    if not by_id:
        raise UserError(f"{path}: no tokens in model.vocab or added_tokens")
    if max(by_id) >= vocab_rows:
        raise UserError(f"{path}: token id {max(by_id)} is past the model's {vocab_rows} embedding rows "
                        f"(config.json vocab_size); tokenizer and model do not match")
    # Rows past the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 rows) get
    # placeholder tokens, as llama.cpp's converter writes them: the token list
    # must have one entry per embedding row.
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_rows)]
    merges = model.get("merges", [])
    if merges and isinstance(merges[0], list):
        # Newer tokenizer.json stores pairs; GGUF stores "a b" strings, so a space
        # inside a part is written as U+0120 (the gguf package's convention).
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    warnings = []
    pre = pre_tokenizer_name(tok)
    if pre is None:
        warnings.append(f"{path}: pre-tokenizer not recognised; wrote 'default', so llama.cpp may split text "
                        f"differently from the model's tokenizer (recognised: {', '.join(PRE_TOKENIZERS.values())})")
        pre = "default"
    return Vocab([t for t, _ in tokens], [int(k) for _, k in tokens], merges, pre, tuple(warnings))


# --- writing ---------------------------------------------------------------------------------

def _add_metadata(w: gguf.GGUFWriter, hp: Hyper, vocab: Vocab, special: SpecialTokens, quant: QType,
                  name: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.layers)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.heads)
    w.add_head_count_kv(hp.kv_heads)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.vocab_rows)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.explicit_head_dim:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, token_id in (("bos", special.bos), ("eos", special.eos), ("pad", special.pad)):
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(token_id)
    if special.eos is not None and special.chat_template is not None:
        w.add_eot_token_id(special.eos)  # for a chat model the eos is the end of a turn
    # Written even when false: llama.cpp's default for some pre-tokenizers is to add a BOS.
    w.add_add_bos_token(special.add_bos)
    w.add_add_eos_token(special.add_eos)
    if special.chat_template:
        w.add_chat_template(special.chat_template)


def _chunks(t: TensorPlan, src: SourceTensor | None, hp: Hyper) -> Iterator[np.ndarray]:
    """The tensor's values as float32 row chunks, q/k already permuted for llama."""
    if src is None:
        yield llama3_rope_factors(hp)
        return
    if len(t.shape) == 1:
        values = src.read_rows(0, 1).reshape(-1)
        yield values[llama_row_order(values.size, t.permute_heads)] if t.permute_heads else values
        return
    rows_per_chunk = max(1, CHUNK_ELEMENTS // src.row_len)
    if t.permute_heads:  # the permutation moves rows only within a head: chunk whole heads
        head_rows = src.rows // t.permute_heads
        rows_per_chunk = max(1, rows_per_chunk // head_rows) * head_rows
    for start in range(0, src.rows, rows_per_chunk):
        stop = min(src.rows, start + rows_per_chunk)
        values = src.read_rows(start, stop)
        if t.permute_heads:
            values = values[llama_row_order(stop - start, (stop - start) // head_rows)]
        yield values


def _write_tensor(f, t: TensorPlan, src: SourceTensor | None, hp: Hyper) -> int:
    written = 0
    for values in _chunks(t, src, hp):
        if not np.isfinite(values).all():
            raise UserError(f"{t.source or t.name}: contains NaN or inf values; the model folder is broken")
        data = gguf.quants.quantize(values, t.qtype)
        if t.qtype == QType.F16 and not np.isfinite(data).all():
            raise UserError(f"{t.source}: values beyond the float16 range (max |x| {np.abs(values).max():.3g}); "
                            f"export with quant f32")
        written += f.write(np.ascontiguousarray(data).data)
    if written != t.nbytes:  # the tensor directory promised t.nbytes: a mismatch would corrupt every later offset
        raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
    return written


def _pad(f, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed to `path` on success and removed on failure.

    fileio.atomic_write hands out an open file; GGUFWriter opens its output by path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; an export is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_quant(quant: str) -> QType:
    key = quant.lower()
    if key in QUANTS:
        return QUANTS[key]
    supported = ", ".join(QUANTS)
    if key.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")):
        raise UserError(f"quant {quant!r}: K-quants need llama.cpp's C quantizer; edgetune writes {supported}. "
                        f"Export f16 and run `llama-quantize MODEL-f16.gguf OUT.gguf {quant.upper()}`")
    raise UserError(f"quant {quant!r}: unknown; choose one of {supported}")


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f16", echo: Callable[[str], None] = print,
               name: str | None = None) -> dict:
    """Write `model_dir` (a fused, unquantized Hugging Face folder) as the GGUF file `out_file`.

    `quant` is one of f32, f16, q8_0, q4_0; `name` (general.name, shown by
    llama.cpp and Ollama) defaults to the folder's name. Overwrites `out_file` (whether that
    is allowed is the caller's decision). Returns what a model card needs:
    path, quant, size_bytes, n_tensors, arch, tensor_types (type name -> count),
    pre_tokenizer and warnings (also echoed). Raises UserError for an
    unsupported quant or architecture, missing/misshapen tensors, unreadable
    files or non-finite weights; nothing is left at `out_file` then.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    qtype = parse_quant(quant)
    hp = read_hyper(model_dir)
    sources = index_safetensors(model_dir)
    plan = plan_tensors(hp, sources, qtype, model_dir)
    vocab = read_vocab(model_dir, hp.vocab_rows)
    special = read_special_tokens(model_dir)
    warnings = list(vocab.warnings)
    if special.eos is None:
        warnings.append(f"{model_dir}: no eos token in tokenizer_config.json, generation_config.json or "
                        f"config.json; llama.cpp will not know where an answer ends")
    fallback = [t.name for t in plan if len(t.shape) == 2 and t.qtype == QType.F16 and qtype not in (QType.F16,
                                                                                                    QType.F32)]
    if fallback:
        echo(f"gguf: {len(fallback)} tensor(s) with rows not a multiple of 32 written as F16: "
             f"{', '.join(fallback[:3])}{' ...' if len(fallback) > 3 else ''}")
    for message in warnings:
        echo(f"warning: {message}")

    writer = gguf.GGUFWriter(path=None, arch=hp.arch)
    _add_metadata(writer, hp, vocab, special, qtype, name or model_dir.resolve().name)
    for t in plan:
        # With raw_dtype set and a uint8 array shape, the writer records the element shape.
        byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    echo(f"gguf: writing {out_file} ({hp.arch}, {quant}, {len(plan)} tensors)")
    with _atomic_path(out_file) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            for t in plan:  # the data section: each tensor aligned, in directory order
                _pad(f, writer.data_alignment)
                _write_tensor(f, t, sources.get(t.source), hp)
            _pad(f, writer.data_alignment)
            f.flush()
            os.fsync(f.fileno())
    return {
        "path": str(out_file), "quant": quant.lower(), "size_bytes": out_file.stat().st_size,
        "n_tensors": len(plan), "arch": hp.arch,
        "tensor_types": dict(sorted(Counter(t.qtype.name for t in plan).items())),
        "pre_tokenizer": vocab.pre, "warnings": warnings,
    }
