"""The torch backend: transformers + PEFT, for NVIDIA boxes (and CPUs without MLX).

Chosen with `backend: torch` (or `auto` on a CUDA machine); installed with
`pip install "edgetune[torch]"`. Same recipe, same data pipeline, same loop
(`trainer.train`), same checkpoints' layout and the same adapter format as MLX:

- Device: CUDA when present (bf16 weights, SDPA or FlashAttention-2 when installed,
  the decoder compiled with `torch.compile`), else CPU in float32.
- The output head is computed only at supervised positions, chunked, by
  `target_logprobs_head`, which also forms d log p / d h in the same pass: full
  [tokens, vocab] logits never exist and need no backward of their own.
- Packed rows are padding-free: positions restart per example and transformers
  turns them into a block-diagonal causal mask (FlashAttention varlen when
  installed), so one row holds several examples without cross-attention.
- The optimizer is mlx's AdamW, re-implemented (decoupled weight decay, no bias
  correction) so both backends follow the same trajectory for the same recipe.
- Adapters are read and written in mlx-lm's format (lora_a = A^T, lora_b = B^T),
  so `edgetune export`, `mlx_lm.generate` and the MLX backend use them unchanged,
  and an MLX adapter can be continued here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from edgetune.backends import torch_losses
from edgetune.errors import UserError
from edgetune.fileio import write_json

OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapters.safetensors"
HEAD_CHUNK = 1024  # positions per head chunk: [chunk, vocab] float32 logits live at a time
PEFT_PREFIX = "base_model.model."
PLAIN_BUCKET = 256  # EDGETUNE_TORCH_PLAIN_BUCKETS: plain rows' lengths round up to a multiple of this
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _env_choice(name: str, default: str, choices: tuple) -> str:
    """The environment variable `name` (`default` when unset); UserError naming it when not one of `choices`."""
    value = os.environ.get(name) or default
    if value not in choices:
        raise UserError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


# --- the output head at selected positions ---------------------------------------------------------

class _TargetLogprobs(torch.autograd.Function):
    """log p(target) for rows of `h` under head `weight`, chunked over rows.

    The forward also computes J = d logp / d h = (onehot(target) - softmax) @ W per row, so the
    backward is `grad[:, None] * J` — exact, because each output depends on its own row of h only.
    Stores [S, D] instead of [S, V] logits; the frozen head gets no gradient (LoRA never trains it).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_grad=None):
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        jac = torch.empty_like(h) if need_grad else None
        for s in range(0, n, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, n)
            t = targets[s:e].long()
            probs = None  # softmax - onehot(target), in the head's dtype, when gradients are needed
            if need_grad and chunk_grad is not None:  # the same math, as one compiled expression
                out[s:e], probs = chunk_grad(h[s:e] @ weight.t(), t)
            else:
                logits = (h[s:e] @ weight.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                out[s:e] = logits.gather(1, t[:, None])[:, 0] - lse
                if need_grad:  # the softmax in place of the logits, then - 1 at the target
                    probs = logits.sub_(lse[:, None]).exp_().scatter_add_(
                        1, t[:, None], torch.full_like(lse[:, None], -1.0)).to(weight.dtype)
                del logits
            if need_grad:
                jac[s:e] = -(probs @ weight)
            del probs
        if need_grad:
            ctx.save_for_backward(jac)
        return out

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad[:, None].to(jac.dtype) * jac, None, None, None


def target_logprobs_head(h, weight, targets, chunk_grad=None):
    """log p(targets) [S] for hidden states h [S, D] under the (frozen) output head `weight` [V, D].

    `chunk_grad`: `softmax_minus_onehot`, compiled, to use in place of the eager passes when
    gradients are needed (EDGETUNE_TORCH_FUSED_HEAD); None: the eager passes."""
    if weight.requires_grad:
        raise ValueError("target_logprobs_head: the output head must be frozen")
    return _TargetLogprobs.apply(h, weight, targets, chunk_grad)


def softmax_minus_onehot(logits, targets):
    """`(log p(target) [C] float32, softmax - onehot(target) [C, V] in the logits' dtype)` for one
    chunk of head logits [C, V]: what `_TargetLogprobs` computes in place, in the same float32
    math, written as one expression for torch.compile.

    Eager, a chunk's float32 logits make about ten passes over [C, V] (the cast, logsumexp's
    max, subtract, exp and sum, the in-place softmax, the cast back): ~50 bytes moved per logit.
    Compiled, they become reductions and one pointwise kernel over the bf16 logits (~8 bytes),
    where the head was ~13 ms of a ~73 ms step on an H200 (qwen2.5-0.5b's 151,936-token vocab).
    scripts/bench_gpu.py's `_eagerhead` parts measure it against the eager passes.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    logp = x.gather(1, targets[:, None]) - lse
    columns = torch.arange(x.shape[-1], device=x.device)
    probs = torch.exp(x - lse) - (columns == targets[:, None]).to(x.dtype)
    return logp[:, 0], probs.to(logits.dtype)


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 for each packed example (and for the padding after them)."""
    seg = np.asarray(segment_ids)
    t = np.arange(seg.shape[1])[None, :].repeat(seg.shape[0], 0)
    starts = np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return (t - first).astype(np.int64)


def packed_attention_mask(position_ids):
    """[B, 1, T, T] bool: query i attends key j iff j <= i and both are in the same example
    (an example starts where its position is 0)."""
    segment = torch.cumsum((position_ids == 0).int(), dim=1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def compile_mode(static: bool, cuda: bool, attn: str, checkpointing: bool, dropout: float,
                 override: str | None) -> str:
    """torch.compile's mode for the decoder blocks: CUDA graphs (reduce-overhead) for one static
    shape on CUDA, in the setting measured, else the default; `override` (EDGETUNE_TORCH_COMPILE_MODE)
    wins. Outside the measured setting graphs are known to break or not pay:
    - FlashAttention-2's varlen path finds example starts with nonzero(): a graph break, and
      cu_seqlens change length with every batch (graphs recorded again and again);
    - grad checkpointing and LoRA dropout were not measured with graphs.
    Several micro-batches a step keep graphs: `accumulate` sums each backward's gradients outside
    the graphs' memory pool (pytorch#169545; tests/test_backends.py's CUDA accumulation test passed
    on an H200), and 2 micro-batches of 4 x 1024 ran at 83-91k tokens/s with graphs, 33k without."""
    if override:
        return override
    measured = attn == "sdpa" and not checkpointing and not dropout
    return "reduce-overhead" if (static and cuda and measured) else "default"


def _global_norm(tensors: list):
    """L2 norm of all `tensors` together (float32), on their device, in one multi-tensor kernel."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.float() for t in tensors])))


def _causal_lm(model):
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


# --- schedule and optimizer (mlx semantics) --------------------------------------------------------

def lr_at(step: int, kind: str, lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer update number `step` (0-based), as `mlx_backend.make_schedule`."""
    if warmup > 0 and step < warmup:
        return step * (lr / warmup)
    step -= max(warmup, 0)
    decay_steps = max(steps - warmup, 1)
    end = lr * min_lr_ratio
    if kind == "constant":
        return lr
    s = min(step, decay_steps)
    if kind == "cosine":
        return end + 0.5 * (1.0 + math.cos(math.pi / decay_steps * s)) * (lr - end)
    if kind == "linear":
        return lr + s * ((end - lr) / decay_steps)
    raise UserError(f"lr_schedule: {kind!r} is not one of constant, cosine, linear")


class AdamW:
    """mlx.optimizers.AdamW on torch tensors: p *= 1 - lr*wd; m, v moving averages; no bias correction.

    Kept identical to MLX's so a recipe trains the same way on both backends (torch.optim.AdamW
    corrects the bias, which makes early steps ~3x smaller than MLX's).
    """

    def __init__(self, named_params: list, schedule, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.schedule, self.weight_decay, self.betas, self.eps = schedule, weight_decay, betas, eps
        self.step_count = 0
        self.last_lr = schedule(0)
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        # Multi-tensor (_foreach_) kernels throughout: a 0.5B model has 336 LoRA tensors, and one
        # launch per tensor per operation made the optimizer a visible share of a GPU step's CPU time.
        lr = self.schedule(self.step_count)
        b1, b2 = self.betas
        # The gradient itself where it is float32 (LoRA's): a no-op .float() still costs ~2 us of
        # host time per tensor, 336 of them a step.
        grads = [g if g.dtype == torch.float32 else g.float() for g in (p.grad for p in self.params)]
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, grads, alpha=1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denom, self.eps)
        if all(p.dtype == torch.float32 for p in self.params):  # LoRA weights: float32 on every device
            if self.weight_decay:
                torch._foreach_mul_(self.params, 1 - lr * self.weight_decay)
            torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr)
        else:
            for p, m, d in zip(self.params, self.m, denom):
                p.copy_((p.float() * (1 - lr * self.weight_decay) - lr * m / d).to(p.dtype))
        self.step_count += 1
        self.last_lr = lr

    def state_tensors(self) -> dict:
        out = {}
        for name, m, v in zip(self.names, self.m, self.v):
            out[f"m.{name}"], out[f"v.{name}"] = m.detach().cpu().contiguous(), v.detach().cpu().contiguous()
        return out


# --- the backend ---------------------------------------------------------------------------------

class TorchBackend:
    name = "torch"
    losses = torch_losses

    def __init__(self):
        want = os.environ.get("EDGETUNE_TORCH_DEVICE")
        try:
            self.device = torch.device(want or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise UserError(f"EDGETUNE_TORCH_DEVICE={want!r}: expected a torch device such as cpu, cuda or cuda:1") from None
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.dtype_name = str(self.dtype).replace("torch.", "")
        # Compiling the decoder pays back on a GPU (~2x on a 0.5B model); on a CPU it only costs time.
        # EDGETUNE_TORCH_COMPILE: auto (on CUDA), 1 (always, e.g. to test it on a CPU), 0 (never).
        want_compile = _env_choice("EDGETUNE_TORCH_COMPILE", "auto", ("auto", "1", "0"))
        self.compile = want_compile == "1" or (want_compile == "auto" and self.cuda)
        self.compile_mode = _env_choice("EDGETUNE_TORCH_COMPILE_MODE", "", ("",) + COMPILE_MODES) or None
        # Few distinct [B, T] shapes keep torch.compile from re-tracing (padding is never supervised);
        # packed rows then always span max_seq_len, so SFT compiles exactly one shape.
        self.pad_multiple = 64 if self.compile else 8
        self.static_packed_rows = self.compile
        # The reference pass (eager, no gradients) scores this many times a training batch's
        # positions per call on CUDA, where eager calls cost CPU time, not GPU time (see
        # `preference.score_on_backend`).
        self.reference_batch_factor = 4 if self.cuda else 1
        # An experiment, off by default (EDGETUNE_TORCH_PLAIN_BUCKETS=1; scripts/bench_gpu.py's
        # `_buckets` parts): plain rows (preference pairs, SFT without packing) padded to a multiple
        # of PLAIN_BUCKET positions, so a run sees a few static shapes, each compiled once and, on
        # CUDA, given CUDA graphs as packed rows are. It trades padding for launch overhead.
        buckets = _env_choice("EDGETUNE_TORCH_PLAIN_BUCKETS", "0", ("0", "1")) == "1"
        self.plain_buckets = self.compile and buckets
        # The head's softmax as one compiled expression (`softmax_minus_onehot`) where the blocks
        # compile on CUDA (EDGETUNE_TORCH_FUSED_HEAD: auto; 1 also uncompiled, e.g. on a CPU; 0 the
        # eager passes; scripts/bench_gpu.py's `_eagerhead` parts measure the difference). Its first
        # compile is a few seconds, and one more when the chunk's length first changes.
        want_fused = _env_choice("EDGETUNE_TORCH_FUSED_HEAD", "auto", ("auto", "0", "1"))
        fused = want_fused == "1" or (want_fused == "auto" and self.compile and self.cuda)
        self.head_chunk_grad = (torch.compile(softmax_minus_onehot) if self.compile else softmax_minus_onehot
                                ) if fused else None
        if self.plain_buckets:
            self.pad_multiple = PLAIN_BUCKET
        # Compiled blocks of packed rows keep at most this share of the activations a plain
        # backward keeps; the compiler's partitioner recomputes the cheapest of the rest (pointwise
        # ops first). At the qwen2.5-0.5b shape, 0.5 stored 60% less per token for a 7.5% slower
        # step on a CPU; on an H200 peak memory fell from 10.7 to 6.5-6.7 GiB.
        # EDGETUNE_TORCH_ACTIVATION_BUDGET: 1 keeps everything.
        budget = os.environ.get("EDGETUNE_TORCH_ACTIVATION_BUDGET") or "0.5"
        try:
            self.activation_budget = float(budget)
        except ValueError:
            self.activation_budget = float("nan")
        if not 0 < self.activation_budget <= 1:
            raise UserError(f"EDGETUNE_TORCH_ACTIVATION_BUDGET={budget!r}: expected a number in (0, 1]")
        if self.cuda and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            # Preference batches come in many shapes; expandable segments let the caching allocator
            # grow one mapping instead of keeping blocks of every size (less reserved, unused memory).
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated in favour of a private torch._C name
                try:
                    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
                except (AttributeError, RuntimeError):
                    pass
        if not self.cuda:
            from edgetune.runtime import limit_openblas_threads

            limit_openblas_threads(1)
        # Packed rows: FlashAttention-2 (the flash_attn package) reads example starts from the
        # positions; SDPA needs a [B, 1, T, T] block-diagonal mask, which it runs on cuDNN's fused
        # kernel on Hopper. (torch's own varlen flash kernel, fed cu_seqlens, was slower on an H200
        # at the 0.5B shape: 53k vs 68k tokens/s.)
        self.attn = "flash_attention_2" if (self.cuda and importlib.util.find_spec("flash_attn")) else "sdpa"

    # --- model -----------------------------------------------------------------------------------
    def load(self, recipe, echo):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgetune.models import LoadedModel, resolve_model_path

        path = resolve_model_path(recipe.model, recipe.revision, recipe.trust_remote_code)
        config = json.loads((path / "config.json").read_text())
        if "quantization" in config:
            raise UserError(f"model {recipe.model}: an MLX-quantized model cannot be loaded by the torch backend; "
                            "use the unquantized model, or backend: mlx")
        if recipe.quantize:
            raise UserError("quantize: QLoRA is available on the MLX backend only; remove `quantize` or set "
                            "backend: mlx")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation=self.attn,
                                                     trust_remote_code=recipe.trust_remote_code)
        model.config.use_cache = False
        model.to(self.device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.trust_remote_code)
        why = (f"{self.device} device: {self.dtype_name}, attention {self.attn}"
               + (", decoder compiled" if self.compile else ""))
        echo(f"model: {recipe.model} ({config.get('model_type')}); {why}; torch {torch.__version__}")
        return LoadedModel(model, tokenizer, path, config, self.dtype_name, why)

    def attach_lora(self, model, spec, seed: int) -> dict:
        from peft import LoraConfig, get_peft_model

        from edgetune.lora import lora_a_init, lora_layer_count, match_targets

        layers = model.model.layers
        keys = match_targets([n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)], spec)
        n_layers = lora_layer_count(len(layers), spec)
        first = len(layers) - n_layers
        # One exact pattern: the chosen blocks' chosen linears, nothing else (PEFT matches it in full).
        pattern = (r"model\.layers\.(" + "|".join(str(i) for i in range(first, len(layers))) + r")\.("
                   + "|".join(re.escape(k) for k in keys) + ")")
        torch.manual_seed(seed)
        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern,
                         bias="none", task_type="CAUSAL_LM")
        # PEFT injects the LoRA layers into `model` in place, so callers keep training `model`
        # itself (as on MLX); the wrapper is kept for merging (`fuse_and_save`).
        peft_model = get_peft_model(model, cfg)
        object.__setattr__(model, "_edgetune_peft", peft_model)  # not a submodule: no cycle
        model._edgetune_dropout = spec.dropout
        if self.cuda:
            # Mixed precision: LoRA weights stay float32 (for the optimizer) and run in bf16 under
            # autocast. PEFT would otherwise cast every LoRA input to float32 and keep that copy
            # for the backward — ~40% more activation memory and slower matmuls.
            for module in peft_model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        # The same starting adapter as the MLX backend for the same seed (lora.lora_a_init).
        with torch.no_grad():
            for i in range(first, len(layers)):
                for key in keys:
                    module = layers[i].get_submodule(key)
                    a = module.lora_A["default"].weight  # [rank, in]
                    init = lora_a_init(seed, i, key, a.shape[1], a.shape[0])
                    a.copy_(torch.from_numpy(init.T.copy()).to(a.dtype))
        return {"fine_tune_type": "lora", "num_layers": n_layers,
                "lora_parameters": {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": keys},
                "lora_alpha": spec.alpha}

    def _lora_params(self, model) -> dict:
        """{mlx-lm adapter key: parameter} for every LoRA tensor of the PEFT model (PEFT stores
        each transposed relative to mlx-lm: lora_a = A^T, lora_b = B^T)."""
        out = {}
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
                module, kind = re.match(r"(.*)\.lora_([AB])\.", path).groups()
                out[f"{module}.lora_{kind.lower()}"] = p
        return out

    def save_adapter(self, model, adapter_cfg: dict, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: p.detach().float().cpu().numpy().T.copy() for k, p in self._lora_params(model).items()}
        tmp = folder / ".adapters.tmp.safetensors"
        save_file(weights, str(tmp), metadata={"format": "mlx"})
        tmp.replace(folder / ADAPTER_FILE)
        write_json(folder / "adapter_config.json", adapter_cfg)

    def load_adapter(self, model, folder: Path) -> None:
        from safetensors.numpy import load_file

        folder = Path(folder)
        weights = load_file(str(folder / ADAPTER_FILE))
        params = self._lora_params(model)
        bad = [k for k, v in weights.items() if k not in params or tuple(params[k].shape) != v.T.shape]
        missing = [k for k in params if k not in weights]
        if bad or missing:
            raise UserError(f"{folder}: adapter does not match the model (unexpected or mis-shaped: "
                            f"{', '.join(bad[:5]) or 'none'}; missing: {', '.join(missing[:5]) or 'none'})")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(torch.from_numpy(v.T.copy()).to(params[k].dtype))

    def trainable_count(self, model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def _compile_blocks(self, model, static: bool) -> None:
        """Compile every decoder block, once, on the first training forward. Regional compilation: the blocks
        share one code object, so one graph serves all of them (warm-up in seconds, not minutes),
        while the head stays in its own chunked function.

        A run whose rows have one static shape (packed rows spanning max_seq_len) also gets CUDA
        graphs (mode reduce-overhead): a 0.5B model's step launches ~1,300 small matmuls (LoRA's
        among them), and launching them, not running them, bounded the step. On an H200 (batch 8 x
        1024, LoRA r16 on all linears) this took SFT from 56k to 98k tokens/s with the same losses.
        Rows of changing lengths (unpacked preference pairs) keep the default mode: CUDA graphs
        would be recorded again for every shape; packed pairs (`packing: true`) have the one static
        shape and get graphs too. EDGETUNE_TORCH_COMPILE_MODE overrides the choice."""
        mode = compile_mode(static, self.cuda, self.attn, getattr(model, "_edgetune_checkpointing", False),
                            getattr(model, "_edgetune_dropout", 0.0), self.compile_mode)
        # Bucketed plain rows: one graph per bucket, never one dynamic graph (which graphs re-record
        # for every size anyway); otherwise torch's automatic choice.
        dynamic = False if (static and self.plain_buckets) else None
        if dynamic is False:
            from torch._dynamo import config as dynamo_config

            # A graph per (bucket, first block or not): more than dynamo's default of 8 per function.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        for layer in _causal_lm(model).model.layers:
            layer.compile(mode=None if mode == "default" else mode, dynamic=dynamic)
        model._edgetune_compiled = mode

    def enable_grad_checkpoint(self, model) -> None:
        model._edgetune_checkpointing = True
        lm = _causal_lm(model)
        # transformers 5.2x renamed it (the old name warns); earlier 5.x has only the old one.
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def set_training(self, model, training: bool) -> None:
        model.train(training)

    def fuse_and_save(self, model, tokenizer, folder: Path) -> None:
        """Merge the LoRA weights into the base and save a transformers model folder (atomically)."""
        from edgetune.fileio import atomic_dir

        merged = getattr(model, "_edgetune_peft", model).merge_and_unload()
        with atomic_dir(Path(folder), replace=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    # --- batches and forward -----------------------------------------------------------------------
    def array(self, value):
        t = torch.from_numpy(np.ascontiguousarray(value))
        if t.dtype in (torch.int32, torch.int16, torch.uint8):
            t = t.long()
        return t.to(self.device, non_blocking=True)

    def to_host(self, value):
        return value.detach().float().cpu().numpy()

    def micro_batch(self, batch, packing: bool = False):
        """`packing` (the recipe's): lay every batch out as packed, even one whose rows happen to
        hold one example each, so a compiled step sees one attention-mask layout."""
        from edgetune.sft import host_arrays
        from edgetune.trainer import MicroBatch

        host, packed = host_arrays(batch)
        packed = packed or (packing and self.static_packed_rows)
        arrays = tuple(self.array(a) for a in host)
        if packed:
            arrays += (self.packed_layout(batch.segment_ids),)
        return MicroBatch(arrays, int((batch.segment_ids > 0).sum()), list(batch.example_ids),
                          "packed" if packed else "plain")

    def packed_layout(self, segment_ids):
        """Packed rows' layout as this backend's forward takes it: positions restarting per example."""
        return self.array(positions_from_segments(segment_ids))

    def target_logprobs(self, model, tokens, select, targets, position_ids=None):
        """log p(target) at the flat positions `select`; `position_ids` (restarting at 0 for each
        packed example) give RoPE positions and a block-diagonal causal mask (passed as a 4D mask,
        so every packed batch takes the same attention path)."""
        base = _causal_lm(model)
        # FlashAttention-2 reads packing from the restarting positions alone (varlen kernels); SDPA
        # needs the mask spelled out.
        mask = None if (position_ids is None or self.attn == "flash_attention_2") else packed_attention_mask(position_ids)
        packed_static = position_ids is not None and self.static_packed_rows
        static = packed_static or (position_ids is None and self.plain_buckets)
        # Compiled on the first training forward: a no-grad forward (the DPO/KTO reference pass,
        # evaluation) runs eager and must not fix the compile mode for the training rows' layout.
        if self.compile and torch.is_grad_enabled() and not hasattr(model, "_edgetune_compiled"):
            self._compile_blocks(model, static)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda), self._attention_kernels(mask), \
                self._activation_budget(packed_static):
            h = base.model(input_ids=tokens, position_ids=position_ids, attention_mask=mask,
                           use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).index_select(0, select)
        return target_logprobs_head(h, base.get_output_embeddings().weight, targets, self.head_chunk_grad)

    def _activation_budget(self, static: bool):
        """The partitioner's activation budget while a forward compiles (it is read then): the
        recipe-wide budget for packed rows; 1 (keep all) for plain rows, whose SDPA call takes
        grouped-query K/V (enable_gqa) that the budget solver's FLOP counter rejects (torch 2.11:
        "sdpa_flop_count: query/key/value shapes are incompatible", a failed compile)."""
        if not self.compile:
            return nullcontext()
        from torch._functorch import config as functorch_config

        return functorch_config.patch(activation_memory_budget=self.activation_budget if static else 1.0)

    def _attention_kernels(self, mask):
        """Plain causal rows (preference pairs, evaluation) come in many lengths. On an H200 SDPA ran
        them on cuDNN, and DPO steps ran at two speeds (~0.15 and ~0.3 s for similar token counts)
        while the eager reference pass took ~140 ms per batch for ~12 ms of kernels, as if cuDNN
        built an execution plan per new shape. They run on the flash / memory-efficient kernels
        instead: unpacked DPO's training loop went from 31 to 62-66 pairs/s on the H200. Packed rows
        (one static shape, a block mask) keep SDPA's own choice, cuDNN."""
        if not (self.cuda and self.compile) or mask is not None or self.attn != "sdpa":
            # Eager CUDA (EDGETUNE_TORCH_COMPILE=0) keeps SDPA's choice: a checkpointed block's
            # recompute runs in backward(), outside this context, and must pick the same kernel.
            # A compiled block has the kernel fixed in its graph when traced.
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def sequence_logprobs(self, model, tokens, select, targets, weights, position_ids=None, members=None):
        lp = self.target_logprobs(model, tokens, select, targets, position_ids) * weights
        if members is not None:  # packed rows: members [N, S] marks each sequence's positions
            return (members * lp[None, :]).sum(1), (members * weights[None, :]).sum(1)
        rows = select // tokens.shape[1]
        zeros = torch.zeros(tokens.shape[0], dtype=torch.float32, device=lp.device)
        return zeros.index_add(0, rows, lp), zeros.index_add(0, rows, weights.float())

    @contextmanager
    def no_grad(self):
        """No gradients, and eager: a forward-only pass (the DPO/KTO reference pass, evaluation) sees
        many [B, T] shapes once each, where compiling each would cost more than it saves (measured
        on an H200: 16 s of compiles for a 160-pair reference pass that runs in ~2 s eager)."""
        stance = getattr(torch.compiler, "set_stance", None)
        with torch.no_grad(), (stance("force_eager") if (stance and self.compile) else nullcontext()):
            yield

    # --- optimisation ------------------------------------------------------------------------------
    def make_optimizer(self, model, cfg, steps: int):
        def schedule(step: int) -> float:
            return lr_at(step, cfg.lr_schedule, cfg.learning_rate, steps, cfg.warmup_steps, cfg.min_lr_ratio)

        lr_at(0, cfg.lr_schedule, cfg.learning_rate, steps, cfg.warmup_steps, cfg.min_lr_ratio)  # checks the kind
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return AdamW(named, schedule, cfg.weight_decay)

    def make_grad_step(self, model, loss_fn, compile: bool):
        def grad_step(*arrays):
            if getattr(model, "_edgetune_compiled", None) in ("reduce-overhead", "max-autotune"):
                torch.compiler.cudagraph_mark_step_begin()  # a new forward: earlier outputs are consumed
            loss, ntoks, *rest = loss_fn(model, *arrays)
            loss.backward()
            aux = rest[0] if rest else {}
            return loss.detach(), ntoks.detach(), {k: v.detach() for k, v in aux.items()}, None

        grad_step.params = [p for p in model.parameters() if p.requires_grad]  # where the gradients land
        grad_step.model = model
        return grad_step

    def accumulate(self, grad_step, batches, seeds, aux_sum):
        """Gradients end in `.grad` (zeroed first); the step's scalars (loss, count, aux sums and the
        gradients' global norm) stay on the device until the end and come back in one transfer.

        One transfer, because each read of a device scalar waits for the GPU and then leaves it idle
        while the host launches what follows: with a read each for the loss, the count and the norm
        (then computed again to clip), an H200 SFT step idled ~15 ms of ~88. `update` is given the
        norm back, so clipping reads and launches nothing for it.

        With several micro-batches, each one's gradients are added into buffers of their own and
        `.grad` is cleared before the next forward: under CUDA graphs a backward's gradients live
        in the graphs' memory pool, which the next replay reuses (pytorch#169545), so adding the
        next backward into them in place would read overwritten memory. Elsewhere it is the same
        sum, in the same order."""
        params = grad_step.params
        for p in params:
            p.grad = None
        loss_sum, ntoks_sum, sums, grads = 0.0, 0.0, {}, None
        for i, batch in enumerate(batches):
            if seeds is not None:
                torch.manual_seed(seeds[i])  # dropout draws are a function of (seed, cursor)
            loss, ntoks, aux, _ = grad_step(*batch.arrays)
            loss_sum, ntoks_sum = loss_sum + loss, ntoks_sum + ntoks
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + v
            if len(batches) > 1:
                these = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if grads is None:
                    grads = [g.clone() for g in these]
                else:
                    torch._foreach_add_(grads, these)
                for p in params:
                    p.grad = None
        if grads is not None:
            for p, g in zip(params, grads):
                p.grad = g
        gs = [p.grad for p in params if p.grad is not None]
        norm = _global_norm(gs) if gs else 0.0
        keys = list(sums)
        scalars = [loss_sum, ntoks_sum, norm] + [sums[k] for k in keys]
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([torch.as_tensor(v, dtype=wide, device=self.device).reshape(())
                              for v in scalars]).tolist()  # the step's one device sync
        (loss_value, ntoks_value, norm_value), aux_values = values[:3], values[3:]
        if aux_sum is not None:
            aux_sum.update({k: aux_sum.get(k, 0.0) + v for k, v in zip(keys, aux_values)})
        return loss_value, ntoks_value, params, norm_value

    def make_update(self, model, optimizer, max_grad_norm, compile: bool):
        @torch.no_grad()
        def update(grads, ntoks: float, norm: float) -> None:
            gs = [p.grad for p in grads if p.grad is not None]
            # Normalise and clip in one multiply, by a factor the host knows: mlx's clip_grad_norm
            # scales the normalised gradients by min(max / (norm + 1e-6), 1).
            scale = 1.0 / ntoks
            if max_grad_norm:
                scale *= min(max_grad_norm / (norm / ntoks + 1e-6), 1.0)
            torch._foreach_mul_(gs, scale)
            optimizer.step()

        return update

    def learning_rate(self, optimizer) -> float:
        return float(optimizer.last_lr)

    def save_optimizer(self, optimizer, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(optimizer.state_tensors(), str(Path(folder) / OPTIMIZER_FILE),
                  metadata={"backend": "torch", "step": str(optimizer.step_count)})

    def load_optimizer(self, model, optimizer, folder: Path) -> None:
        from safetensors import safe_open

        path = Path(folder) / OPTIMIZER_FILE
        if not path.exists():
            return
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("backend") != "torch":
                raise UserError(f"{path}: written by the mlx backend; resume this run with backend: mlx, "
                                "or start over with --force")
            for i, name in enumerate(optimizer.names):
                optimizer.m[i].copy_(f.get_tensor(f"m.{name}"))
                optimizer.v[i].copy_(f.get_tensor(f"v.{name}"))
        optimizer.step_count = int(meta["step"])
        optimizer.last_lr = optimizer.schedule(max(optimizer.step_count - 1, 0))

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # process peak RSS

    @contextmanager
    def training_context(self, model):
        yield None

    def describe(self) -> dict:
        import peft
        import transformers

        return {"backend": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
                "dtype": self.dtype_name, "attention": self.attn, "compiled": self.compile,
                "activation_budget": self.activation_budget if self.compile else None}
