"""The memory a training run will need, by part, before the model loads: `edgetune plan`.

Why plan at all: on a Mac, running out of Metal memory aborts the process
(`Insufficient Memory`) instead of raising, so "try, catch, retry smaller"
cannot work in-process. The plan is made from the model's config.json alone
(no weights loaded), and a run that cannot fit is refused before loading,
with what to change.

The parts (one function each, formula in its docstring):

    base weights          parameters at the compute dtype, or b-bit groups (QLoRA)
    LoRA + optimizer      trainable parameters x 20 bytes (weight, grad, summed grad, AdamW m and v)
    activations           kept for the backward pass, per adapted layer
    backward working set  one layer's backward temporaries
    logits                the output head at supervised positions only
    packing mask          one block-diagonal mask (packing: true only)
    reference cache       DPO/KTO reference log-probs: one float per completion

The peak is their sum. The activation, working-set and logits coefficients
are fitted to `mx.get_peak_memory()` of real training steps on MLX's Linux CPU
backend (float32, edgetune's CPU kernels), over hidden sizes 128-1024,
intermediate 256-4864, vocabularies 1k-152k, 1-8 layers, batch 1-8 x 128-2048
tokens, with and without gradient checkpointing: all 29 fitted cases within
±9% of the measured total. `scripts/check_plan.py` checks whole `edgetune sft`
and `edgetune dpo` runs against the plan. On Metal the same counts are used at
the stored dtype's width (bf16: 2 bytes); that is not measured here.

`mx.get_peak_memory()` excludes MLX's buffer cache, so the process footprint
can exceed it (mlx issue 3993): on macOS the run caps the cache at the plan's
headroom (`apply_memory_limits`), and `auto` values keep AUTO_HEADROOM spare.

Pure functions over a config dict, the recipe's section and a `Budget`; only
`device_budget`, `model_config` and `apply_memory_limits` touch the machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetune.errors import UserError

GB = 1e9
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZE_BITS = {"q4": 4, "q8": 8}  # as models.QUANTIZE_BITS (kept here so planning never imports MLX)
QUANTIZE_GROUP = 64  # models.load_for_training quantizes with mlx-lm's group size 64
SELECT_BUCKET = 64  # sft.SELECT_BUCKET: supervised positions are padded to a multiple of this
PREFERENCE_ROWS = {"sft": 1, "dpo": 2, "orpo": 2, "kto": 1}  # rows per batch item (a pair is 2 rows)

# Fitted coefficients, in elements of the compute dtype (see the module docstring and
# activation_bytes / backward_working_bytes / logits_bytes for what each counts). "Blocks" are
# [rows, heads, T, T] attention-probability arrays.
SAVED_PER_TOKEN = {"hidden": 4.0, "kv": 1.5, "intermediate": 5.0}  # per adapted layer, plus 1 block
SAVED_PER_TOKEN_CHECKPOINTED = {"hidden": 1.0}  # per adapted layer, grad_checkpoint: true
WORKING_PER_TOKEN = {"intermediate": 4.0}  # once, the layer being differentiated
WORKING_ATTENTION_BLOCKS = {False: 4.5, True: 7.0}  # once; checkpointing also recomputes the forward's
LOGITS_FLOAT32_COPIES = 2  # token_logprobs works in float32: its log-softmax and gradient

# `auto` values are chosen so that the predicted peak leaves this share of the budget spare:
# the planner's error bound, plus allocator slack.
AUTO_HEADROOM = 0.2
AUTO_SEQ_LENS = (2048, 1024, 512, 256)  # longest first: a shorter limit truncates or drops rows
# Up to 8 rows per micro-batch: a bigger one mostly cuts the number of steps of a
# feedback-sized dataset, and the recipe's grad_accumulation sets the effective batch.
AUTO_BATCH_SIZES = (8, 4, 2, 1)
REFERENCE_COMPLETIONS = 1_000_000  # the reference cache is shown for this many completions

# Metal's recommended working set (what `mx.device_info()` reports as
# max_recommended_working_set_size) is about 2/3 of the RAM on Macs up to 32 GB and 3/4 above.
# Used to check shipped recipes against Mac tiers; on a Mac the real value is read.
MAC_TIERS_GB = (8, 16, 32, 64)


# --- the model --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a Hugging Face config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    stored_bytes: int  # bytes per weight as stored (bf16/fp16: 2)
    quant_bits: int | None = None  # an already-quantized checkpoint (mlx-community 4-bit)
    quant_group: int = QUANTIZE_GROUP
    attention_bias: bool = False  # qwen2 has q/k/v biases

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "ModelShape":
        """Raises UserError naming the keys a decoder-only config lacks."""
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in need if not isinstance(config.get(k), int)]
        if missing:
            raise UserError(f"{where}: cannot plan memory: missing or non-integer {', '.join(missing)} (edgetune plans "
                            "decoder-only models with a Llama/Qwen2-style config)")
        heads = config["num_attention_heads"]
        quant = config.get("quantization") or {}
        return cls(
            model_type=str(config.get("model_type", "?")),
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            stored_bytes=DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4),
            quant_bits=quant.get("bits"),
            quant_group=quant.get("group_size", QUANTIZE_GROUP),
            attention_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
        )


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one block, by mlx-lm's short name."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    d, i = shape.hidden, shape.intermediate
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def parameter_counts(shape: ModelShape) -> tuple[int, int]:
    """(matrix weights, vector weights) of the whole model.

    Matrices: the embedding V*D, per block the seven linear layers (sum of in*out), and an untied
    output head V*D. Vectors: two norms per block (2D), q/k/v biases where the family has them,
    the final norm (D). Example, Qwen2.5-0.5B: 136.2M + 24 * 14.9M = 494.0M matrix weights.
    """
    per_block = sum(i * o for i, o in linear_shapes(shape).values())
    matrices = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.layers * per_block
    bias = (shape.heads + 2 * shape.kv_heads) * shape.head_dim if shape.attention_bias else 0
    vectors = shape.layers * (2 * shape.hidden + bias) + shape.hidden
    return matrices, vectors


# --- the parts ----------------------------------------------------------------------------------------

def weight_bytes(shape: ModelShape, bits: int | None, float_bytes: int, group: int = QUANTIZE_GROUP) -> int:
    """The frozen base model in memory.

    Unquantized: every parameter at `float_bytes` (float32 on the CPU, the stored dtype on a GPU).
    Quantized to `bits` (QLoRA, or a checkpoint stored quantized): every matrix at bits/8 bytes
    per weight plus one scale and one bias per `group` weights at `float_bytes` (MLX's affine
    quantization; mlx-lm quantizes the embedding too); vectors at `float_bytes`.
    Example: 1M matrix weights at 4 bits, group 64, float32 scales: 0.5 MB + 2 * 15,625 * 4 B = 0.625 MB.
    """
    matrices, vectors = parameter_counts(shape)
    if bits is None:
        return (matrices + vectors) * float_bytes
    return matrices * bits // 8 + 2 * (matrices // group) * float_bytes + vectors * float_bytes


def lora_parameter_count(shape: ModelShape, rank: int, targets: tuple[str, ...] | list[str], layers: int) -> int:
    """rank * (in + out) per adapted linear layer, times the adapted blocks.

    Raises UserError for a target this family does not have. Example: rank 8 on q_proj (896 -> 896)
    and v_proj (896 -> 128) of 24 blocks: 8 * (1792 + 1024) * 24 = 540,672.
    """
    dims = linear_shapes(shape)
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise UserError(f"lora.targets: {', '.join(unknown)} not planned for; the linear layers of a "
                        f"{shape.model_type} block are {', '.join(dims)}")
    return rank * sum(dims[t][0] + dims[t][1] for t in targets) * layers


def lora_state_bytes(n_params: int) -> int:
    """LoRA weights, their gradient, the gradient summed over accumulated micro-batches, and
    AdamW's two moments: 5 float32 copies = 20 bytes per trainable parameter (LoRA weights are
    float32 whatever the base dtype)."""
    return 5 * FLOAT32 * n_params


def activation_bytes(shape: ModelShape, rows: int, seq_len: int, layers: int, grad_checkpoint: bool,
                     act_bytes: int) -> int:
    """What the forward pass keeps for the backward pass, over the `layers` adapted blocks.

    Blocks below the lowest adapted one need no gradient, so they keep nothing. Per adapted
    block and token, without checkpointing: 4*D + 1.5*KV + 5*I elements (D hidden, KV =
    kv_heads*head_dim, I intermediate: the block input and norm outputs, k/v, the MLP's gate, up
    and product), plus one [B, H, T, T] array of attention probabilities per block (measured:
    inside the compiled step, edgetune's CPU attention keeps one per block although it is written
    to recompute them in the backward pass; the uncompiled step does not).
    With grad_checkpoint: D per block and token (its input), plus one block's full set while it
    is recomputed. Coefficients fitted to measured peaks (module docstring).
    Example: D=512, KV=512, I=1376, H=8, 4 rows x 512 tokens, 8 blocks, float32:
    8 * (2048 * (2048 + 768 + 6880) + 4*8*512*512) * 4 = 0.904 GB.
    """
    tokens = rows * seq_len
    full = tokens * (SAVED_PER_TOKEN["hidden"] * shape.hidden + SAVED_PER_TOKEN["kv"] * shape.kv_heads
                     * shape.head_dim + SAVED_PER_TOKEN["intermediate"] * shape.intermediate)
    full += rows * shape.heads * seq_len * seq_len
    if grad_checkpoint:
        elements = layers * tokens * SAVED_PER_TOKEN_CHECKPOINTED["hidden"] * shape.hidden + (full if layers else 0)
    else:
        elements = layers * full
    return int(elements * act_bytes)


def backward_working_bytes(shape: ModelShape, rows: int, seq_len: int, grad_checkpoint: bool,
                           act_bytes: int) -> int:
    """Temporaries of the block being differentiated, once: 4*I elements per token (MLP
    gradients) plus 4.5 [B, H, T, T] blocks (attention scores, probabilities and their
    gradients; 7 with grad_checkpoint, which also recomputes the block's forward pass). Fitted to
    measured peaks. Example: I=1376, H=8, 4 x 512, float32, no checkpointing:
    (2048 * 5504 + 4.5 * 4*8*512*512) * 4 = 0.196 GB.
    """
    tokens = rows * seq_len
    elements = (tokens * WORKING_PER_TOKEN["intermediate"] * shape.intermediate
                + WORKING_ATTENTION_BLOCKS[bool(grad_checkpoint)] * rows * shape.heads * seq_len * seq_len)
    return int(elements * act_bytes)


def supervised_positions(rows: int, seq_len: int, share: float = 1.0) -> int:
    """Positions the loss head runs at: rows * seq_len * share, padded up to a multiple of 64
    (as `sft.to_micro_batch` pads them). share 1.0 is the worst case: every position supervised
    (completion-heavy rows; prompts are never scored)."""
    n = max(1, math.ceil(rows * seq_len * share))
    return -(-n // SELECT_BUCKET) * SELECT_BUCKET


def logits_bytes(shape: ModelShape, positions: int, act_bytes: int) -> int:
    """The output head at `positions` supervised positions: the [S, V] logits in the compute
    dtype plus two float32 [S, V] arrays (the log-softmax of `losses.token_logprobs`, which
    upcasts, and its gradient). On the CPU that is 3 float32 copies (measured: 3.0).
    Example: 1,024 positions x 151,936 vocabulary on the CPU: 1024 * 151936 * 12 = 1.867 GB.
    """
    return positions * shape.vocab * (act_bytes + LOGITS_FLOAT32_COPIES * FLOAT32)


def packing_mask_bytes(rows: int, seq_len: int, act_bytes: int) -> int:
    """packing: true builds one additive block-diagonal mask [B, 1, T, T], shared by all layers."""
    return rows * seq_len * seq_len * act_bytes


def reference_bytes(completions: int) -> int:
    """DPO/KTO reference log-probs: one float32 per completion, computed once before training
    and kept in the run folder; no second model is held. 1M completions: 4 MB."""
    return FLOAT32 * completions


# --- the device -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """Memory a run may use, where that number came from, and whether compute runs on a GPU
    (weights and activations in the stored dtype) or the CPU (float32, `models.training_dtype`)."""

    bytes: int
    source: str
    gpu: bool = False


def mac_tier_budget(ram_gb: int) -> Budget:
    """What a Mac with `ram_gb` GB of RAM offers MLX: Metal's recommended working set,
    ~2/3 of RAM up to 32 GB and ~3/4 above (approximate; a Mac reports its own)."""
    share = 2 / 3 if ram_gb <= 32 else 3 / 4
    return Budget(int(ram_gb * 2**30 * share), f"Mac {ram_gb} GB (Metal working set ~{share:.0%} of RAM)", gpu=True)


def device_budget(backend: str = "mlx") -> Budget:
    """What this machine offers a training run.

    macOS with Metal: `max_recommended_working_set_size`. Linux (MLX's CPU backend):
    MemAvailable from /proc/meminfo. backend `torch` on CUDA: `cuda_budget` (the hook for the
    torch backend). EDGETUNE_MEMORY_BUDGET_GB overrides all of these (a shared machine, a test).
    """
    gpu = sys.platform == "darwin" and _metal_available()
    override = os.environ.get("EDGETUNE_MEMORY_BUDGET_GB")
    if override:
        try:
            return Budget(int(float(override) * GB), "EDGETUNE_MEMORY_BUDGET_GB", gpu)
        except ValueError:
            raise UserError(f"EDGETUNE_MEMORY_BUDGET_GB={override!r}: expected a number of gigabytes") from None
    if backend == "torch" and _torch_cuda():
        return cuda_budget()
    if gpu and backend != "torch":
        from edgetune.runtime import mlx_core

        info = mlx_core().device_info()
        return Budget(int(info["max_recommended_working_set_size"]), "Metal recommended working set", gpu=True)
    if sys.platform.startswith("linux"):
        return Budget(mem_available(), "Linux MemAvailable")
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Budget(int(pages * 2 / 3), "2/3 of physical memory")


def mem_available(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes: what Linux can give a new allocation without swapping."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise UserError(f"{meminfo}: no MemAvailable line; set EDGETUNE_MEMORY_BUDGET_GB to the memory a run may use")


def cuda_budget() -> Budget:
    """Free memory of the current CUDA device, for a torch backend. The coefficients above are
    MLX's; a torch backend will need its own calibration (scripts/check_plan.py)."""
    try:
        import torch
    except ImportError:
        raise UserError("backend: torch needs PyTorch installed to size the run") from None
    if not torch.cuda.is_available():
        raise UserError("backend: torch: no CUDA device; set backend: mlx, or EDGETUNE_MEMORY_BUDGET_GB")
    free, _total = torch.cuda.mem_get_info()
    return Budget(int(free), f"CUDA free memory ({torch.cuda.get_device_name()})", gpu=True)


def _torch_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _metal_available() -> bool:
    from edgetune.runtime import mlx_core

    return bool(mlx_core().metal.is_available())


# --- the plan ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What a stage's memory depends on, with `auto` resolved (see `resolve_settings`)."""

    stage: str
    batch_size: int
    max_seq_len: int
    grad_checkpoint: bool
    packing: bool
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_layers: int | None  # None: every block
    quantize: str | None
    supervised_share: float = 1.0


@dataclass
class Part:
    name: str
    bytes: int
    note: str


@dataclass
class Plan:
    settings: Settings
    shape: ModelShape
    budget: Budget
    parts: list[Part]
    chosen: dict[str, str] = field(default_factory=dict)  # auto key -> why this value

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget.bytes

    @property
    def fits_with_headroom(self) -> bool:
        return self.total <= self.budget.bytes * (1 - AUTO_HEADROOM)

    def to_json(self) -> dict:
        s = self.settings
        return {
            "stage": s.stage, "total_bytes": self.total, "total_gb": round(self.total / GB, 3),
            "budget_bytes": self.budget.bytes, "budget_gb": round(self.budget.bytes / GB, 3),
            "budget_source": self.budget.source, "fits": self.fits,
            "settings": dataclasses.asdict(s), "auto": self.chosen,
            "parts": [{"name": p.name, "bytes": p.bytes, "gb": round(p.bytes / GB, 3), "note": p.note}
                      for p in self.parts],
        }


def rows_per_item(s: Settings) -> int:
    """Rows per batch item: a pair is 2 rows, except when packed (`batch_size` then counts rows)."""
    return 1 if s.packing else PREFERENCE_ROWS[s.stage]


def smallest_batch(stage: str, packing: bool) -> int:
    """The smallest batch_size worth proposing: 2 rows for packed pairs (a pair's chosen and
    rejected rarely fit one row together), else 1."""
    return 2 if (packing and PREFERENCE_ROWS[stage] == 2) else 1


def estimate(shape: ModelShape, settings: Settings, budget: Budget) -> Plan:
    """Every part of the peak for one stage on one device (pure)."""
    s = settings
    float_bytes = shape.stored_bytes if budget.gpu else FLOAT32
    dtype = {4: "float32", 2: "16-bit"}.get(float_bytes, f"{float_bytes}-byte")
    bits = QUANTIZE_BITS[s.quantize] if s.quantize and shape.quant_bits is None else shape.quant_bits
    lora_layers = shape.layers if s.lora_layers is None else s.lora_layers
    if not 1 <= lora_layers <= shape.layers:
        raise UserError(f"{s.stage}.lora.layers: {lora_layers} is out of range; this model has {shape.layers} layers")
    rows = s.batch_size * rows_per_item(s)
    positions = supervised_positions(rows, s.max_seq_len, s.supervised_share)
    n_lora = lora_parameter_count(shape, s.lora_rank, s.lora_targets, lora_layers)
    matrices, vectors = parameter_counts(shape)
    group = shape.quant_group if shape.quant_bits else QUANTIZE_GROUP
    what_rows = (f"{s.batch_size} pair{'s' * (s.batch_size > 1)} = {rows} rows" if rows_per_item(s) == 2
                 else f"{rows} row{'s' * (rows > 1)}")
    parts = [
        Part("base weights", weight_bytes(shape, bits, float_bytes, group),
             f"{(matrices + vectors) / 1e6:,.0f}M parameters at " + (f"{bits}-bit (group {group})" if bits else dtype)),
        Part("LoRA + optimizer", lora_state_bytes(n_lora),
             f"{n_lora / 1e6:.2f}M trainable (rank {s.lora_rank}, {len(s.lora_targets)} targets x {lora_layers} "
             "layers) x 20 bytes"),
        Part("activations", activation_bytes(shape, rows, s.max_seq_len, lora_layers, s.grad_checkpoint, float_bytes),
             f"{what_rows} x {s.max_seq_len} tokens, {lora_layers} adapted layers"
             + (", checkpointed" if s.grad_checkpoint else "")),
        Part("backward working set", backward_working_bytes(shape, rows, s.max_seq_len, s.grad_checkpoint,
                                                            float_bytes),
             "one layer's gradients and recomputed attention"),
        Part("logits", logits_bytes(shape, positions, float_bytes),
             f"{positions:,} supervised positions x {shape.vocab:,} vocabulary"
             + (" (worst case: every position)" if s.supervised_share >= 1 else "")),
    ]
    if s.packing:
        parts.append(Part("packing mask", packing_mask_bytes(rows, s.max_seq_len, float_bytes),
                          "block-diagonal attention mask"))
    if s.stage in ("dpo", "kto"):
        parts.append(Part("reference cache", reference_bytes(REFERENCE_COMPLETIONS),
                          f"reference log-probs, 1 float per completion (shown for {REFERENCE_COMPLETIONS:,}); "
                          "no second model"))
    return Plan(s, shape, budget, parts)


# --- recipes: config, settings, auto --------------------------------------------------------------------

def model_config(recipe) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for the recipe's model, without the weights:
    read from a local folder, or only config.json fetched from the hub for a hub id.
    Raises UserError when neither works."""
    name = recipe.model
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        path = local / "config.json"
        if not path.is_file():
            raise UserError(f"model {name}: no config.json there; point model: at a model folder or a hub id")
        return _read_json(path), str(path)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, "config.json", revision=recipe.revision)
    except Exception as e:  # network, auth, unknown repo: all user-fixable
        raise UserError(f"model {name}: could not fetch its config.json from the Hugging Face hub to plan memory "
                        f"({type(e).__name__}: {e}). Check the id, your network and HF_TOKEN, or point model: at a "
                        "local folder") from None
    return _read_json(Path(path)), f"{name} (hub)"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the model config ({e})") from None


def _init_adapter_lora(init_from: str) -> dict | None:
    """The `lora_parameters` + `num_layers` of a preference stage's starting adapter, when it exists
    (the same folders `preference.resolve_init_adapter` accepts); None for `base` or not yet trained."""
    if init_from == "base":
        return None
    for folder in (Path(init_from) / "adapter", Path(init_from)):
        path = folder / "adapter_config.json"
        if path.is_file():
            cfg = _read_json(path)
            try:
                lp = cfg["lora_parameters"]
                return {"rank": int(lp["rank"]), "targets": tuple(k.rsplit(".", 1)[-1] for k in lp["keys"]),
                        "layers": int(cfg["num_layers"])}
            except (KeyError, TypeError, ValueError):
                return None  # the stage itself names a bad adapter config
    return None


def section_settings(recipe, stage: str, batch_size: int, max_seq_len: int, grad_checkpoint: bool,
                     shape: ModelShape) -> Settings:
    """Settings of `stage` with the given (resolved) batch, length and checkpointing."""
    cfg = getattr(recipe, stage)
    lora = _init_adapter_lora(getattr(cfg, "init_from", "base"))
    if lora is None:
        layers = None if cfg.lora.layers in (None, "all") else min(int(cfg.lora.layers), shape.layers)
        lora = {"rank": cfg.lora.rank, "targets": tuple(cfg.lora.targets), "layers": layers}
    return Settings(stage, batch_size, max_seq_len, grad_checkpoint, cfg.packing, lora["rank"], lora["targets"],
                    lora["layers"], recipe.quantize)


def plan_recipe(recipe, stage: str, budget: Budget, config: dict | None = None, where: str = "config.json",
                previous: dict | None = None) -> Plan:
    """The plan of `stage` with its `auto` values chosen (`Plan.chosen` says why).

    `auto` choices, in this order of preference: the longest max_seq_len of AUTO_SEQ_LENS (up to
    the model's context), then no gradient checkpointing (it recomputes the forward pass), then
    the largest batch of AUTO_BATCH_SIZES, such that the predicted peak leaves AUTO_HEADROOM of
    the budget spare. `previous`: the section as a resumed run resolved it (kept, so that resuming
    never changes the batch shape). Raises UserError when even the smallest choice cannot fit.
    """
    cfg = getattr(recipe, stage)
    if config is None:
        config, where = model_config(recipe)
    shape = ModelShape.from_config(config, where)
    previous = previous or {}

    def given(key: str, ladder: tuple) -> tuple:
        value = getattr(cfg, key)
        if value != "auto":
            return (value,)
        if key in previous and previous[key] != "auto":
            return (previous[key],)
        return ladder

    context = config.get("max_position_embeddings")
    seq_lens = given("max_seq_len", tuple(n for n in AUTO_SEQ_LENS if not context or n <= context) or (256,))
    checkpoints = given("grad_checkpoint", (False, True))
    batches = given("batch_size", tuple(b for b in AUTO_BATCH_SIZES if b >= smallest_batch(stage, cfg.packing)))
    autos = [k for k in ("batch_size", "max_seq_len", "grad_checkpoint") if getattr(cfg, k) == "auto"]

    candidates = [estimate(shape, section_settings(recipe, stage, batch, seq, ckpt, shape), budget)
                  for seq in seq_lens for ckpt in checkpoints for batch in batches]
    # With headroom first; failing that, any that fits (the caller warns); failing that, the
    # smallest candidate, which the caller refuses with `advice`.
    plan = (next((p for p in candidates if p.fits_with_headroom), None)
            or next((p for p in candidates if p.fits), None) or candidates[-1])
    plan.chosen = _why(autos, previous, plan)
    return plan


def _why(autos: list[str], previous: dict, plan: Plan) -> dict[str, str]:
    s = plan.settings
    out = {}
    for key in autos:
        value = getattr(s, key)
        shown = str(value).lower()
        if key in previous and previous[key] != "auto":
            out[key] = f"{shown} (as this run resolved it before; kept on resume)"
        elif key == "max_seq_len":
            out[key] = f"{shown} (the longest of {', '.join(map(str, AUTO_SEQ_LENS))} that fits)"
        elif key == "grad_checkpoint":
            out[key] = f"{shown} (" + ("the run does not fit without recomputing activations)" if value else
                                       "fits without recomputing activations)")
        else:
            out[key] = f"{shown} (the largest of {', '.join(map(str, AUTO_BATCH_SIZES))} that fits)"
    return out


def advice(stage: str, plan: Plan) -> list[str]:
    """What to change so that `plan` fits, each with its predicted peak: quantize the base,
    shorter sequences, fewer LoRA layers, a smaller batch, gradient checkpointing."""
    s, shape, budget = plan.settings, plan.shape, plan.budget
    options: list[tuple[str, Settings]] = []
    if s.quantize is None and shape.quant_bits is None:
        options.append(("quantize the base: quantize: q4", dataclasses.replace(s, quantize="q4")))
    shorter = [n for n in AUTO_SEQ_LENS if n < s.max_seq_len]
    for n in shorter:
        if estimate(shape, dataclasses.replace(s, max_seq_len=n), budget).fits or n == shorter[-1]:
            options.append((f"shorter sequences: {stage}.max_seq_len: {n}", dataclasses.replace(s, max_seq_len=n)))
            break
    layers = shape.layers if s.lora_layers is None else s.lora_layers
    if layers > 1:
        fewer = max(1, layers // 4)
        options.append((f"fewer LoRA layers: {stage}.lora.layers: {fewer}", dataclasses.replace(s, lora_layers=fewer)))
    smallest = smallest_batch(s.stage, s.packing)
    if s.batch_size > smallest:
        options.append((f"smaller batch: {stage}.batch_size: {smallest}", dataclasses.replace(s, batch_size=smallest)))
    if not s.grad_checkpoint:
        options.append((f"{stage}.grad_checkpoint: true", dataclasses.replace(s, grad_checkpoint=True)))
    lines = []
    for text, changed in options:
        total = estimate(shape, changed, budget).total
        lines.append(f"{text} -> {total / GB:.2f} GB" + ("" if total <= budget.bytes else " (still over)"))
    return lines


def refusal(stage: str, plan: Plan) -> str:
    """The message of a run that cannot fit: the plan, the budget, and what to change."""
    s = plan.settings
    lines = [f"{stage} needs about {plan.total / GB:.2f} GB at its peak and {plan.budget.source} offers "
             f"{plan.budget.bytes / GB:.2f} GB (batch {s.batch_size} x {s.max_seq_len} tokens"
             + (", gradient checkpointing" if s.grad_checkpoint else "") + "); refused before loading the model. "
             "Biggest parts: " + ", ".join(f"{p.name} {p.bytes / GB:.2f} GB"
                                             for p in sorted(plan.parts, key=lambda p: -p.bytes)[:3]),
             "Change one of these (each alone, predicted peak):"]
    lines += [f"  - {line}" for line in advice(stage, plan)]
    lines.append(f"See the whole plan with: edgetune plan RECIPE --stage {stage}; EDGETUNE_MEMORY_BUDGET_GB overrides "
                 "the budget")
    return "\n".join(lines)


def resolve_auto(recipe, stage: str, budget: Budget | None = None, echo: Callable[[str], None] = print,
                 previous: dict | None = None):
    """(recipe with `stage`'s auto values filled in, plan), said on `echo`, before any model loads.

    Raises UserError (with what to change) when the run cannot fit the device's budget.
    """
    cfg = getattr(recipe, stage)
    if cfg is None:
        raise UserError(f"the recipe has no `{stage}:` section; add one (every key has a default) to run "
                        f"`edgetune {stage}`")
    budget = budget or device_budget(recipe.backend)
    plan = plan_recipe(recipe, stage, budget, previous=previous)
    if not plan.fits:
        raise UserError(refusal(stage, plan))
    s = plan.settings
    resolved = dataclasses.replace(cfg, batch_size=s.batch_size, max_seq_len=s.max_seq_len,
                                   grad_checkpoint=s.grad_checkpoint)
    for key, why in plan.chosen.items():
        echo(f"plan: {stage}.{key} auto -> {why}")
    echo(f"plan: predicted peak {plan.total / GB:.2f} GB of {plan.budget.bytes / GB:.2f} GB ({plan.budget.source})"
         + ("" if plan.fits_with_headroom else f"; warning: less than {AUTO_HEADROOM:.0%} spare, the prediction's "
                                               "error margin"))
    return dataclasses.replace(recipe, **{stage: resolved}), plan


def previous_section(manifest: Path, stage: str) -> dict | None:
    """The resolved `stage` section recorded by a run being resumed (None when there is none)."""
    try:
        return json.loads(manifest.read_text()).get("recipe", {}).get(stage)
    except (OSError, json.JSONDecodeError):
        return None


def apply_memory_limits(plan: Plan, echo: Callable[[str], None] = print) -> None:
    """On macOS with Metal: wire the predicted peak (so it is not paged out), lower MLX's memory
    limit (its guideline for graph evaluation; by default 1.5x the recommended working set) to the
    budget, and cap the buffer cache, which `mx.get_peak_memory` does not count, at the plan's
    headroom. Nothing elsewhere: Linux has no wired memory, and MemAvailable already counts what
    other processes hold."""
    if sys.platform != "darwin" or not _metal_available():
        return
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    limit = int(mx.device_info()["max_recommended_working_set_size"])
    budget = min(plan.budget.bytes, limit)
    mx.set_memory_limit(budget)
    mx.set_wired_limit(min(plan.total, budget))
    mx.set_cache_limit(max(budget - plan.total, 0))
    echo(f"plan: MLX memory limit {budget / GB:.2f} GB, wired {min(plan.total, budget) / GB:.2f} GB, "
         f"cache limit {max(budget - plan.total, 0) / GB:.2f} GB")


# --- the table ----------------------------------------------------------------------------------------------

def render(plan: Plan, model: str) -> str:
    """The plan as a readable table by part."""
    s, shape = plan.settings, plan.shape
    per_item = rows_per_item(s)
    lines = [
        f"{s.stage} on {model} ({shape.model_type}, {shape.layers} layers, hidden {shape.hidden}, vocabulary "
        f"{shape.vocab:,})",
        f"batch {s.batch_size}{(' pair' + 's' * (s.batch_size > 1)) if per_item == 2 else ' rows' * s.packing} x "
        f"{s.max_seq_len} tokens, "
        f"gradient checkpointing {'on' if s.grad_checkpoint else 'off'}, "
        + ("GPU: stored dtype" if plan.budget.gpu else "CPU: float32"),
        "",
        f"  {'part':<22}{'GB':>8}  what",
    ]
    for p in plan.parts:
        lines.append(f"  {p.name:<22}{p.bytes / GB:>8.2f}  {p.note}")
    verdict = ("fits" if plan.fits_with_headroom else
               f"fits, with less than {AUTO_HEADROOM:.0%} spare" if plan.fits else "does NOT fit")
    lines += [f"  {'total (peak)':<22}{plan.total / GB:>8.2f}",
              f"  {'budget':<22}{plan.budget.bytes / GB:>8.2f}  {plan.budget.source}: {verdict}"]
    if plan.chosen:
        lines += ["", "auto:"] + [f"  {s.stage}.{k} -> {v}" for k, v in plan.chosen.items()]
    return "\n".join(lines)
