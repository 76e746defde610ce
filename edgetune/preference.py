"""Preference training with LoRA: `edgetune dpo`, `edgetune kto`, `edgetune orpo` (MLX or torch).

One model in memory. DPO and KTO need the reference policy's log-prob of every
completion; the reference is the starting policy (base, or base + the SFT
adapter given as `init_from`), so those log-probs are computed once, in a pass
before training, stored in the run folder (`reference_logps.safetensors`,
fingerprinted by model, starting adapter and tokenised rows) and reused on
resume — never recomputed per step, and no second copy of the model is kept.
ORPO needs no reference at all.

Everything else — LoRA, batching, schedule, checkpoints, exact resume, guards,
progress — is SFT's (`trainer.train`, `stage`, the backend's micro-batches).
The reference pass below is MLX's; `score_on_backend` scores it through any
other backend, into the same file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgetune.errors import UserError
from edgetune.kernels import training_kernels
from edgetune.fileio import sha256_file, write_json
from edgetune import losses as mlx_losses
from edgetune.losses import token_logprobs
from edgetune.lora import LoraSpec, read_adapter_config
from edgetune.runtime import mlx_core
from edgetune.sft import hidden_states, output_logits, to_micro_batch
from edgetune.stage import prepare_run_folder, run_manifest, start_or_resume
from edgetune.trainer import LoopSettings, MicroBatch, train

mx = mlx_core()

STAGES = ("dpo", "kto", "orpo")
REFERENCE_FILE = "reference_logps.safetensors"
# The KTO paper keeps (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable) in [1, 4/3].
KTO_BALANCE = (1.0, 4.0 / 3.0)


# --- per-sequence log-probs -----------------------------------------------------------------------

def sequence_logprobs(model, tokens, select, targets, weights, segment_ids=None, members=None):
    """Summed completion log-probs per sequence [N] and completion token counts per sequence [N].

    `select`/`targets`/`weights` are `sft.to_micro_batch`'s flat supervised positions of the [R, T]
    batch. Plain rows (one sequence each): the sequence of a flat position is its row,
    `position // T` (padding entries have weight 0). Packed rows (`packing: true`): `segment_ids`
    keep attention inside each sequence and `members` [N, S] (1 where selected position s belongs
    to sequence n) sums each sequence's positions.
    """
    h = hidden_states(model, tokens, segment_ids)
    lp = head_logprobs(model, h.reshape(-1, h.shape[-1])[select], targets) * weights
    if members is not None:
        return (members * lp[None, :]).sum(axis=1), (members * weights[None, :]).sum(axis=1)
    rows = select // tokens.shape[1]
    zeros = mx.zeros((tokens.shape[0],), mx.float32)
    return zeros.at[rows].add(lp), zeros.at[rows].add(weights)


# Supervised positions whose [rows, vocabulary] logits the head's backward pass holds at a time.
HEAD_CHUNK = 32


def head_logprobs(model, h, targets):
    """log p(target) [S] from final hidden states h [S, D] at supervised positions; the values of
    `losses.token_logprobs(sft.output_logits(model, h), targets)`.

    Why: the head's backward pass runs while every layer's activations are still alive, and
    autodiff would keep the [S, V] float32 logits from the forward pass plus [S, V] temporaries
    for the softmax and its gradient (3 x 233 MB at 384 positions and a 151,936 vocabulary). Here
    the backward pass recomputes the logits HEAD_CHUNK rows at a time, each chunk waiting for the
    previous one (`mx.depends`), so only one chunk's [HEAD_CHUNK, V] arrays exist at once.
    Measured on a compiled DPO step at the qwen2.5-0.5b shape (4 rows x 240 tokens): peak 5.36 ->
    4.81 GB, for one more head matmul per step. Assumes the head is frozen (LoRA adapts only
    in-block layers, lora.py): no gradient is returned for its weights.
    """
    @mx.custom_function
    def logprobs(h):
        return token_logprobs(output_logits(model, h), targets)

    @logprobs.vjp
    def logprobs_vjp(primals, cotangent, output):
        h = primals[0] if isinstance(primals, (list, tuple)) else primals
        parts = []
        for start in range(0, h.shape[0], HEAD_CHUNK):
            chunk = h[start: start + HEAD_CHUNK]
            if parts:
                chunk = mx.depends(chunk, parts[-1])
            t = targets[start: start + HEAD_CHUNK]
            _, (d_chunk,) = mx.vjp(lambda x: token_logprobs(output_logits(model, x), t), [chunk],
                                   [cotangent[start: start + HEAD_CHUNK]])
            parts.append(d_chunk)
        return mx.concatenate(parts)

    return logprobs(h)


def make_loss_fn(stage: str, cfg, backend=None, packed: bool = False) -> Callable:
    """`loss_fn(model, tokens, select, targets, weights, *extra) -> (loss_sum, n, aux)` for `stage`.

    Sequences come in pairs [chosen, rejected, ...] for dpo/orpo; `extra` is, for packed batches
    (`packed`), the packing layout and the sequence `members` (see `sequence_logprobs`), then the
    reference log-probs per sequence (dpo, kto) and the desirable flags per sequence (kto).
    `backend` (MLX when None) supplies the forward and its own copy of the losses.
    """
    mlx = backend is None or backend.name == "mlx"
    seq_logprobs, L = (sequence_logprobs, mlx_losses) if mlx else (backend.sequence_logprobs, backend.losses)
    dpo, kto, orpo = L.dpo_loss, L.kto_loss, L.orpo_loss
    # How many leading `extra` arrays describe the layout rather than the items.
    n_layout = 2 if packed else 0
    if stage == "dpo":
        def loss_fn(model, tokens, select, targets, weights, *extra):
            logps, _ = seq_logprobs(model, tokens, select, targets, weights, *extra[:n_layout])
            ref = extra[n_layout]
            return dpo(logps[0::2], logps[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.loss, cfg.label_smoothing)
    elif stage == "kto":
        def loss_fn(model, tokens, select, targets, weights, *extra):
            logps, _ = seq_logprobs(model, tokens, select, targets, weights, *extra[:n_layout])
            ref, desirable = extra[n_layout:]
            return kto(logps, ref, desirable, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    elif stage == "orpo":
        def loss_fn(model, tokens, select, targets, weights, *extra):
            logps, ntoks = seq_logprobs(model, tokens, select, targets, weights, *extra[:n_layout])
            return orpo(logps[0::2], logps[1::2], ntoks[0::2], ntoks[1::2], cfg.beta)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return loss_fn


# --- data -----------------------------------------------------------------------------------------

@dataclass
class PreferenceData:
    """Per split: the rows in order (pairs as chosen, rejected), how many rows make one item
    (2 for a pair, 1 for a KTO completion), KTO labels, stats and input file hashes."""

    rows: dict  # split -> list[TokenizedExample]
    per_item: int
    labels: dict  # split -> np.ndarray float32 [items] (KTO), else None
    stats: dict
    files: dict


def prepare_data(recipe, stage: str, tokenizer, vocab_size: int, echo) -> PreferenceData:
    from edgetune.pref_data import load_preference_rows, preference_files, tokenize_pairs, tokenize_unpaired

    cfg, kind = getattr(recipe, stage), ("kto" if stage == "kto" else "dpo")
    rows, labels, stats, files = {}, {}, {}, {}
    for split in ("train", "eval"):
        raw = load_preference_rows(recipe.data, split, kind)
        if kind == "dpo":
            pairs, stats[split] = tokenize_pairs(raw, tokenizer, cfg.max_seq_len, cfg.truncation, vocab_size)
            rows[split] = [ex for p in pairs for ex in (p.chosen, p.rejected)]
            labels[split] = None
        else:
            rows[split], flags, stats[split] = tokenize_unpaired(raw, tokenizer, cfg.max_seq_len, cfg.truncation,
                                                                 vocab_size)
            labels[split] = np.asarray(flags, np.float32)
        for p in preference_files(recipe.data, split, kind):
            files[str(p)] = sha256_file(p)
    if not rows["train"]:
        raise UserError(f"data: no {kind} training rows left in {recipe.data} (after truncation/drops: "
                        f"{stats['train']})")
    t = stats["train"]
    what = "pairs" if kind == "dpo" else f"completions ({t['desirable']} desirable, {t['undesirable']} undesirable)"
    echo(f"data: {t['kept']} train / {stats['eval']['kept']} eval {what}, {t['tokens']:,} tokens; "
         f"truncated {t['truncated']}, dropped {t['dropped']}")
    return PreferenceData(rows, 2 if kind == "dpo" else 1, labels, stats, files)


def kto_balance_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """A warning with suggested weights when the weighted classes are outside the KTO paper's
    recommended ratio (w_d n_d) / (w_u n_u) in [1, 4/3]; None when balanced.

    Example: 10 desirable, 40 undesirable, weights 1, 1 -> ratio 0.25; suggests desirable_weight 4.0
    (ratio 1). With 40 desirable, 10 undesirable -> ratio 4; suggests undesirable_weight 4.0.
    """
    if not n_desirable or not n_undesirable:
        missing = "desirable (thumbs up)" if not n_desirable else "undesirable (thumbs down)"
        return f"kto: the training data has no {missing} completions; KTO then only pushes one way"
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if KTO_BALANCE[0] <= ratio <= KTO_BALANCE[1]:
        return None
    if ratio < KTO_BALANCE[0]:
        fix = f"kto.desirable_weight={undesirable_weight * n_undesirable / n_desirable:.3g}"
    else:
        fix = f"kto.undesirable_weight={desirable_weight * n_desirable / n_undesirable:.3g}"
    return (f"kto: {n_desirable} desirable vs {n_undesirable} undesirable completions; weighted ratio {ratio:.2f} "
            f"is outside the paper's recommended [1, 1.33]; suggest --set {fix}")


# --- the starting policy and its reference log-probs ---------------------------------------------

def resolve_init_adapter(init_from: str) -> Path | None:
    """None for `base`; else the adapter folder of an SFT run folder (`run/adapter`) or an adapter
    folder itself. Raises UserError when `init_from` is neither."""
    if init_from == "base":
        return None
    p = Path(init_from)
    for candidate in (p / "adapter", p):
        if (candidate / "adapter_config.json").is_file() and (candidate / "adapters.safetensors").is_file():
            return candidate
    raise UserError(f"init_from: {init_from} is neither an adapter folder (adapter_config.json + "
                    "adapters.safetensors) nor an SFT run folder with adapter/; run `edgetune sft` first, "
                    "or set init_from: base")


def spec_from_adapter(cfg: dict, folder: Path) -> LoraSpec:
    """The LoraSpec that rebuilds the LoRA layers an mlx-lm adapter_config describes."""
    try:
        lp = cfg["lora_parameters"]
        rank = int(lp["rank"])
        return LoraSpec(rank, float(lp["scale"]) * rank, float(lp.get("dropout", 0.0)), tuple(lp["keys"]),
                        int(cfg["num_layers"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder}/adapter_config.json: not a LoRA adapter config edgetune can continue "
                        f"({type(e).__name__}: {e})") from None


def compute_reference(model, rows, batch_size: int, echo, label: str) -> np.ndarray:
    """Summed completion log-probs of every row under the model as it is now (dropout off), [len(rows)].

    Rows that share their prompt (a DPO pair's chosen and rejected; KTO completions of one prompt)
    have that prompt run once, its keys and values feeding every completion of the group
    (`score_shared_prompts`): a pair's second prompt is not computed again (on the bench's
    multi-turn pairs, 29% fewer forward tokens). Batches hold about `batch_size` rows of similar
    length; the result is in row order. Families not known to take a per-row position offset
    (see `SHARED_PROMPT_MODEL_TYPES`) are scored as whole, padded rows (`score_rows`).
    """
    out = np.zeros(len(rows), np.float32)
    shared = getattr(getattr(model, "args", None), "model_type", None) in SHARED_PROMPT_MODEL_TYPES
    done, next_report, started = 0, 0.1, time.perf_counter()
    # The same kernels as the training loop, so the reference is what the policy computes at step 0.
    with training_kernels(model):
        for batch in reference_batches(rows, batch_size):
            index = [i for group in batch for i in group]
            if shared and all(rows[group[0]].prompt_len >= 2 for group in batch):
                logps = score_shared_prompts(model, [[rows[i] for i in group] for group in batch])
            else:
                logps = score_rows(model, [rows[i] for i in index])
            out[index] = np.array(logps)
            done += len(index)
            if done / len(rows) >= next_report or done == len(rows):
                echo(f"reference {label}: {done}/{len(rows)} completions scored "
                     f"({time.perf_counter() - started:.1f} s)")
                next_report += 0.25
    return out


# Families whose attention takes the RoPE offset and the mask from the cache object and accepts a
# per-row offset array (mx.fast.rope does): checked against a fresh forward by tests/test_pref.py.
SHARED_PROMPT_MODEL_TYPES = {"llama", "qwen2"}


def prompt_groups(rows) -> list[list[int]]:
    """Indices of rows whose inputs before the first supervised position are the same tokens, in
    first-seen order. A row with a prompt under 2 tokens has nothing to share and stays alone."""
    groups: list[list[int]] = []
    by_prefix: dict[bytes, list[int]] = {}
    for i, row in enumerate(rows):
        if row.prompt_len < 2:
            groups.append([i])
            continue
        key = np.asarray(row.tokens[: row.prompt_len - 1], np.int32).tobytes()
        if key not in by_prefix:
            by_prefix[key] = []
            groups.append(by_prefix[key])
        by_prefix[key].append(i)
    return groups


def reference_batches(rows, batch_size: int) -> list[list[list[int]]]:
    """Prompt groups, sorted by their longest row and cut into batches of up to `batch_size` rows
    (a larger group is a batch of its own); a pure function of the rows."""
    groups = sorted(prompt_groups(rows), key=lambda g: (max(rows[i].n_positions for i in g), g[0]))
    batches: list[list[list[int]]] = []
    size = 0
    for group in groups:
        if not batches or size + len(group) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group)
    return batches


def score_rows(model, rows) -> "mx.array":
    """Summed completion log-probs [R] of whole rows in one padded batch (the training loop's path)."""
    from edgetune.sft_data import collate

    mb = to_micro_batch(collate([[r] for r in rows]))
    logps, _ = sequence_logprobs(model, *mb.arrays[:4])
    return logps


class _PromptRecorder:
    """Stand-in cache for the prompt pass: plain causal attention from position 0, keeping each
    layer's (RoPE-rotated) keys and values for the completions."""

    offset = 0
    keys = values = None

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported by the shared-prompt reference pass")
        return "causal"

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _AfterPrompt:
    """Stand-in cache for the completion pass: row r continues its group's prompt, so its positions
    start at that prompt's length (`offset`, one per row) and it attends to the prompt's keys (up to
    that length; the rest is the padding of shorter prompts) and causally to its own tokens."""

    def __init__(self, keys, values, offset, mask):
        self.prompt_keys, self.prompt_values, self.offset, self.mask = keys, values, offset, mask

    def make_mask(self, N, return_array=False, window_size=None):
        return self.mask

    def update_and_fetch(self, keys, values):
        return (mx.concatenate([self.prompt_keys, keys], axis=2),
                mx.concatenate([self.prompt_values, values], axis=2))


def score_shared_prompts(model, groups) -> np.ndarray:
    """Summed completion log-probs [R] of `groups` (lists of rows with the same inputs before their
    first supervised position), rows in group order.

    Two passes: the G prompts (all but their last token, right-padded to the longest) with a
    recording cache, then the R completions (each from its prompt's last token, right-padded)
    attending to their prompt's keys/values. RoPE makes attention depend on relative positions
    only, and every position sees exactly the tokens it sees in a whole-row forward, so the
    log-probs equal whole-row scoring up to float rounding (tests/test_pref.py). The output head
    runs only at completion positions; the prompt pass never reaches it.
    """
    prefix_lens = [g[0].prompt_len - 1 for g in groups]
    rows = [r for g in groups for r in g]
    owner = np.asarray([i for i, g in enumerate(groups) for _ in g], np.int32)
    width_p = max(prefix_lens)
    prompts = np.zeros((len(groups), width_p), np.int32)
    for i, g in enumerate(groups):
        prompts[i, : prefix_lens[i]] = g[0].tokens[: prefix_lens[i]]
    # Completion inputs run from the prompt's last token to the row's second-to-last token; each
    # position predicts the next token, all of them completion tokens.
    lengths = [len(r.tokens) - r.prompt_len for r in rows]
    width_c = max(lengths)
    inputs = np.zeros((len(rows), width_c), np.int32)
    targets, positions = [], []
    for j, r in enumerate(rows):
        inputs[j, : lengths[j]] = r.tokens[r.prompt_len - 1: -1]
        targets.append(r.tokens[r.prompt_len:])
        positions.append(j * width_c + np.arange(lengths[j]))

    recorders = [_PromptRecorder() for _ in model.layers]
    model.model(mx.array(prompts), recorders)  # only the keys/values are used (lazy: the rest never runs)
    offsets = np.asarray(prefix_lens, np.int32)[owner]
    sees_prompt = np.arange(width_p)[None, :] < offsets[:, None]  # [R, width_p]
    causal = np.tril(np.ones((width_c, width_c), bool))
    mask = np.concatenate([np.broadcast_to(sees_prompt[:, None, :], (len(rows), width_c, width_p)),
                           np.broadcast_to(causal, (len(rows), width_c, width_c))], axis=2)[:, None]
    take = mx.array(owner)
    caches = [_AfterPrompt(rec.keys[take], rec.values[take], mx.array(offsets), mx.array(mask))
              for rec in recorders]
    h = model.model(mx.array(inputs), caches)
    h = h.reshape(-1, h.shape[-1])[mx.array(np.concatenate(positions).astype(np.int32))]
    lp = token_logprobs(output_logits(model, h), mx.array(np.concatenate(targets).astype(np.int32)))
    # Summed in float64: a float32 running sum of ~100 terms near -1 drifts by a few units in the
    # last place (1.5e-5 near -160), as much as everything else here together.
    row_of = np.repeat(np.arange(len(rows)), lengths)
    return np.bincount(row_of, weights=np.array(lp, np.float64), minlength=len(rows)).astype(np.float32)


def reference_fingerprint(model_path: Path, config: dict, quantize, init_adapter: Path | None, data) -> str:
    """What the reference log-probs depend on: model weights, starting adapter and tokenised rows."""
    from edgetune.pref_data import rows_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    # Weights are identified by their files' names, sizes and mtimes: hashing gigabytes would
    # cost more than the pass itself.
    for f in sorted(Path(model_path).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(quantize).encode())
    if init_adapter is not None:
        h.update(sha256_file(init_adapter / "adapters.safetensors").encode())
        h.update((init_adapter / "adapter_config.json").read_bytes())
    for split in ("train", "eval"):
        h.update(rows_fingerprint(data.rows[split]).encode())
    return h.hexdigest()


def load_or_compute_reference(path: Path, fingerprint: str, model, data, batch_size: int, echo,
                              backend=None) -> dict:
    """{split: [rows] log-probs}, read from `path` when its fingerprint matches, else computed and
    written there (atomically). A stale file is named and replaced. Scored on MLX unless another
    `backend` is given; the file is the same either way."""
    if path.is_file():
        stored, meta = mx.load(str(path), return_metadata=True)
        if meta.get("fingerprint") == fingerprint:
            echo(f"reference log-probs: reusing {path.name} (fingerprint {fingerprint[:12]})")
            return {k: np.array(v) for k, v in stored.items()}
        echo(f"reference log-probs: {path.name} was computed for another model, starting adapter or data; "
             "recomputing")
    started = time.perf_counter()
    if backend is None or backend.name == "mlx":
        model.eval()
        ref = {split: compute_reference(model, data.rows[split], batch_size, echo, split)
               for split in ("train", "eval") if data.rows[split]}
        # The pass's freed buffers have other shapes than the training batches': hand them back rather
        # than let MLX's cache hold them through training (process RSS; MLX's peak counts no cache).
        mx.clear_cache()
    else:
        backend.set_training(model, False)
        ref = {split: score_on_backend(backend, model, data.rows[split], batch_size, echo, split)
               for split in ("train", "eval") if data.rows[split]}
    tmp = path.with_name(".tmp." + path.name)
    mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in ref.items()}, metadata={"fingerprint": fingerprint})
    tmp.replace(path)
    echo(f"reference log-probs: {sum(len(v) for v in ref.values())} completions in "
         f"{time.perf_counter() - started:.1f} s, stored in {path.name}")
    return ref


# --- the stage ------------------------------------------------------------------------------------

def run_preference(recipe, stage: str, resume: bool = False, force: bool = False,
                   echo: Callable[[str], None] = print) -> dict:
    """Train `stage` ("dpo", "kto" or "orpo") per the recipe's section of that name; returns the
    summary (also written to summary.json). Raises UserError for a missing section, bad data or
    init_from, and the shared loop's errors."""
    from edgetune.backends import choose_backend, get_backend
    from edgetune.recipe import require_data, with_backend
    from edgetune.sft_data import collate, pad_rows

    require_data(recipe, stage)
    backend_name, backend_why = choose_backend(recipe.backend)
    recipe = with_backend(recipe, backend_name)
    cfg = getattr(recipe, stage)
    if cfg is None:
        raise UserError(f"the recipe has no `{stage}:` section; add one (every key has a default) to run "
                        f"`edgetune {stage}`")
    # Plan memory before the model loads; fills in `auto` values or refuses a run that cannot fit.
    from edgetune.plan import apply_memory_limits, previous_section, resolve_auto

    recipe, plan = resolve_auto(recipe, stage, echo=echo, previous=previous_section(
        Path(recipe.output) / "manifest.json", stage) if resume else None)
    apply_memory_limits(plan, echo)
    cfg = getattr(recipe, stage)
    out = Path(recipe.output)
    checkpoints = out / "checkpoints"
    prepare_run_folder(out, resume, force)

    backend = get_backend(backend_name)
    echo(f"backend: {backend_name} ({backend_why})")
    loaded = backend.load(recipe, echo)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.packing:
        from edgetune.packing import check_packing_supported

        check_packing_supported(loaded.config.get("model_type", "?"), stage)
    data = prepare_data(recipe, stage, tokenizer, loaded.config["vocab_size"], echo)
    if stage == "kto":
        labels = data.labels["train"]
        warning = kto_balance_warning(int(labels.sum()), int(len(labels) - labels.sum()), cfg.desirable_weight,
                                      cfg.undesirable_weight)
        if warning:
            echo(f"warning: {warning}")

    # The starting policy: base + fresh LoRA (exactly the base: LoRA's B starts at zero),
    # or base + the SFT adapter, whose config decides the LoRA shape.
    init_adapter = resolve_init_adapter(cfg.init_from)
    if init_adapter is None:
        spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets),
                        None if cfg.lora.layers in (None, "all") else int(cfg.lora.layers))
    else:
        spec = spec_from_adapter(read_adapter_config(init_adapter), init_adapter)
        _warn_other_base(init_adapter, loaded.path, echo)
    adapter_cfg = backend.attach_lora(model, spec, cfg.seed)
    # Recorded so `edgetune export ADAPTER` finds the base of an adapter copied out of its run.
    adapter_cfg["base_model"] = recipe.model
    if init_adapter is not None:
        backend.load_adapter(model, init_adapter)
        echo(f"init_from: {init_adapter} (rank {spec.rank}, alpha {spec.alpha:g}, {spec.layers} layers; "
             f"the {stage}.lora keys are ignored: the adapter is continued as it is)")
    if cfg.grad_checkpoint:
        backend.enable_grad_checkpoint(model)
    echo(f"LoRA: rank {spec.rank}, alpha {spec.alpha:g}, {len(adapter_cfg['lora_parameters']['keys'])} targets "
         f"x {adapter_cfg['num_layers']} layers = {backend.trainable_count(model):,} trainable parameters")

    # packing: true fills `batch_size` rows of max_seq_len with whole items (padding-free); rows
    # then span max_seq_len on a compiling backend, so a compiled step sees one shape (as SFT's).
    # Batches are planned before the reference pass, so a pair that cannot be packed is named
    # before minutes of scoring.
    pad_multiple = cfg.max_seq_len if (cfg.packing and backend.static_packed_rows) else backend.pad_multiple
    epoch_batches: dict[int, list] = {}

    def batches_of(epoch: int) -> list:
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = epoch_specs(stage, cfg, data, "train", epoch)
        return epoch_batches[epoch]

    per_epoch = len(batches_of(0))
    eval_specs = epoch_specs(stage, cfg, data, "eval", 0)[: cfg.eval_batches or None] if data.rows["eval"] else []
    if cfg.packing:
        used = sum(ex.n_positions for ex in data.rows["train"]) / (per_epoch * cfg.batch_size * cfg.max_seq_len)
        what = "pairs" if data.per_item == 2 else "completions"
        echo(f"packing: {per_epoch} micro-batches of {cfg.batch_size} x {cfg.max_seq_len} positions per epoch, "
             f"{len(data.rows['train']) // data.per_item / per_epoch:.1f} {what} each on average, "
             f"{used:.1%} of the positions filled")
    steps = cfg.steps or max(1, -(-int(cfg.epochs * per_epoch) // cfg.grad_accumulation))

    ref = None
    fingerprint = None
    reference_started = time.perf_counter()
    if stage != "orpo":
        fingerprint = reference_fingerprint(loaded.path, loaded.config, recipe.quantize, init_adapter, data)
        _check_same_reference(out / "manifest.json", fingerprint, resume)
        # Scored as plain rows, a training batch's worth at a time (`batch_size` rows when packed).
        rows_per_batch = cfg.batch_size if cfg.packing else cfg.batch_size * data.per_item
        ref = load_or_compute_reference(out / REFERENCE_FILE, fingerprint, model, data, rows_per_batch, echo,
                                        backend)
    reference_s = time.perf_counter() - reference_started

    def items_batch(split: str, spec) -> MicroBatch:
        """The micro-batch of `spec` (a `PackedBatch`): its sequences in loss order (chosen, rejected
        per pair), with their extras; packed rows also carry their layout and sequence members."""
        k, examples = data.per_item, data.rows[split]
        seqs = [i * k + j for i in spec.items for j in range(k)]
        batch = collate([[examples[i * k + j] for i, j in row] for row in spec.rows], pad_multiple,
                        cfg.max_seq_len)
        if cfg.packing and backend.static_packed_rows:
            batch = pad_rows(batch, cfg.batch_size)
        mb = backend.micro_batch(batch, cfg.packing)
        layout = ()
        if cfg.packing:  # the backend's layout where it made one (a batch of rows that share examples)
            layout = (*(mb.arrays[4:5] or (backend.packed_layout(batch.segment_ids),)),
                      backend.array(sequence_members(spec, k, batch)))
        extra = () if ref is None else (backend.array(ref[split][seqs]),)
        if stage == "kto":
            extra += (backend.array(data.labels[split][spec.items]),)
        return MicroBatch(mb.arrays[:4] + layout + extra, mb.n_tokens, [examples[r].id for r in seqs[::k]])

    def micro_batch(cursor: int) -> MicroBatch:
        return items_batch("train", batches_of(cursor // per_epoch)[cursor % per_epoch])

    optimizer = backend.make_optimizer(model, cfg, steps)

    manifest = run_manifest(stage, recipe, loaded, data, plan, steps, per_epoch, backend, model,
                            backend_why=backend_why, init_adapter=str(init_adapter) if init_adapter else None,
                            reference_fingerprint=fingerprint)
    state, metrics = start_or_resume(out, manifest, stage, resume, backend, model, optimizer, echo)

    loss_fn = make_loss_fn(stage, cfg, backend, packed=cfg.packing)
    eval_batches = [items_batch("eval", spec) for spec in eval_specs]

    def evaluate() -> dict:
        backend.set_training(model, False)  # no dropout in the measurement
        try:
            with backend.no_grad():
                return evaluate_batches(model, loss_fn, eval_batches)
        finally:
            backend.set_training(model, True)

    def save(folder: Path) -> None:
        backend.save_adapter(model, adapter_cfg, folder)

    settings = LoopSettings(steps, cfg.grad_accumulation, cfg.max_grad_norm, cfg.save_every, cfg.eval_every,
                            cfg.keep_checkpoints, cfg.max_nonfinite_steps, cfg.log_every, seed=cfg.seed)
    first_cursor = state.cursor
    t0 = time.perf_counter()
    backend.set_training(model, True)
    state = train(backend, model, optimizer, loss_fn, micro_batch, settings, checkpoints, save, state,
                  evaluate if eval_batches else None, metrics.write, echo)
    elapsed = time.perf_counter() - t0
    backend.set_training(model, False)

    items_trained = sum(len(batches_of(c // per_epoch)[c % per_epoch].items) for c in range(first_cursor, state.cursor))
    backend.save_adapter(model, adapter_cfg, out / "adapter")
    summary = metrics.summary()
    steps_done = [r for r in metrics.records if r.get("loss") is not None and "eval" not in r]
    for key in ("accuracy", "margin", "reward_chosen", "reward_rejected", "reward_desirable",
                "reward_undesirable", "kl"):
        if steps_done and key in steps_done[0]:
            summary[f"first_{key}"], summary[f"final_{key}"] = steps_done[0][key], steps_done[-1][key]
    summary.update({"stage": stage, "steps": steps, "elapsed_s": elapsed, "adapter": str(out / "adapter"),
                    "items_trained": items_trained, "reference_s": reference_s,
                    "items_per_s": items_trained / elapsed if elapsed else None,
                    "best_checkpoint": str(checkpoints / "best") if (checkpoints / "best").exists() else None,
                    "peak_memory_gb": backend.peak_memory_gb(), "backend": backend_name})
    write_json(out / "summary.json", summary)
    echo(summary_text(recipe, summary))
    return summary


def epoch_specs(stage: str, cfg, data: PreferenceData, split: str, epoch: int) -> list:
    """One epoch's micro-batches (`pref_data.PackedBatch`) of `split`: packed (`cfg.packing`), or
    `batch_size` similar-length items. Raises UserError naming a pair that cannot be packed."""
    from edgetune.pref_data import preference_batches

    rows, k = data.rows[split], data.per_item
    lengths = [[rows[i * k + j].n_positions for j in range(k)] for i in range(len(rows) // k)]
    if cfg.packing and cfg.batch_size < k:  # one row per batch: a pair's two sequences share it
        for i, item in enumerate(lengths):
            if sum(item) > cfg.max_seq_len:
                raise UserError(f"{rows[i * k].id}: {split} pair of {sum(item)} positions (chosen + rejected) does "
                                f"not fit {stage}.batch_size 1 row of {stage}.max_seq_len {cfg.max_seq_len} with "
                                f"{stage}.packing; set {stage}.batch_size to 2 or more (rows per micro-batch)")
    return preference_batches(lengths, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.seed, epoch)


def sequence_members(spec, per_item: int, batch) -> np.ndarray:
    """[N, S] float32 for a packed `batch` laid out by `spec` (a `pref_data.PackedBatch`): 1 where
    the s-th selected position (`sft.host_arrays`' `select`) belongs to sequence n, sequences in
    loss order (item by item; a pair's chosen, then rejected). Selected padding belongs to none."""
    from edgetune.sft import host_arrays

    (_, select, _, weights), _ = host_arrays(batch)
    index = {item: n for n, item in enumerate(spec.items)}
    owner = np.full(batch.segment_ids.shape, -1, np.int64)
    for r, row in enumerate(spec.rows):
        for seg, (i, j) in enumerate(row, 1):  # collate numbers a row's sequences 1, 2, ...
            owner[r][batch.segment_ids[r] == seg] = index[i] * per_item + j
    owner = owner.reshape(-1)[select]
    owner[weights == 0] = -1
    return (owner[None, :] == np.arange(len(spec.items) * per_item)[:, None]).astype(np.float32)


def evaluate_batches(model, loss_fn, batches: list[MicroBatch]) -> dict:
    """Mean loss and mean aux metrics (per pair or completion) over pre-built eval batches."""
    total, count, aux_sum = 0.0, 0.0, {}
    for b in batches:
        loss, n, aux = loss_fn(model, *b.arrays)
        total, count = total + float(loss), count + float(n)
        for k, v in aux.items():
            aux_sum[k] = aux_sum.get(k, 0.0) + float(v)
    return {"loss": total / max(count, 1.0), **{k: v / max(count, 1.0) for k, v in aux_sum.items()}}


def score_on_backend(backend, model, rows, batch_size: int, echo, label: str) -> np.ndarray:
    """`compute_reference` for a non-MLX backend: rows sorted by length, scored through `backend`
    (no gradients, dropout off) in batches of up to `batch_size` x the longest row's positions
    times the backend's `reference_batch_factor`; the result is in row order.

    Why the factor: this forward runs eager (each shape is seen once, so compiling does not pay),
    and eager PEFT + transformers costs CPU time per call rather than per token. On an H200 a
    [16, ~600] batch took ~200 ms for ~25 ms of kernels, so the torch backend on CUDA scores 4x
    the positions per call; a no-grad forward keeps one layer's activations, not every layer's as
    the training step does, so that stays far below the training peak."""
    from edgetune.sft_data import collate

    started = time.perf_counter()
    out = np.zeros(len(rows), np.float32)
    lengths = [r.n_positions for r in rows]
    budget = batch_size * max(lengths, default=1) * backend.reference_batch_factor
    for group in reference_groups(lengths, budget, backend.pad_multiple):
        mb = backend.micro_batch(collate([[rows[i]] for i in group], backend.pad_multiple))
        with backend.no_grad():
            logps, _ = backend.sequence_logprobs(model, *mb.arrays[:4])
        out[group] = backend.to_host(logps)
    echo(f"reference {label}: {len(rows)}/{len(rows)} completions scored ({time.perf_counter() - started:.1f} s)")
    return out


def reference_groups(lengths, max_positions: int, pad_multiple: int) -> list[list[int]]:
    """Row indices, shortest first, cut into groups whose padded [rows, longest] size stays within
    `max_positions` (a row longer than that is a group of its own)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        width = -(-lengths[i] // pad_multiple) * pad_multiple  # sorted: this row sets the width
        if groups and (len(groups[-1]) + 1) * width <= max_positions:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _check_same_reference(manifest: Path, fingerprint: str, resume: bool) -> None:
    """A resumed run must keep the reference its checkpoints were trained against."""
    if not (resume and manifest.is_file()):
        return
    try:
        old = json.loads(manifest.read_text()).get("reference_fingerprint")
    except json.JSONDecodeError:
        return
    if old and old != fingerprint:
        raise UserError(f"{manifest.parent}: cannot resume: the model, the init_from adapter or the tokenised data "
                        "changed since this run started, so its reference log-probs no longer apply; "
                        "start a new run (another `output:`) or --force to start over")


def _warn_other_base(adapter: Path, model_path: Path, echo) -> None:
    """An SFT run folder records its base model; continuing an adapter on another base is a mistake
    worth a warning (the shapes may still match)."""
    manifest = adapter.parent / "manifest.json"
    if manifest.is_file():
        try:
            trained_on = json.loads(manifest.read_text()).get("model_path")
        except json.JSONDecodeError:
            return
        if trained_on and Path(trained_on).resolve() != Path(model_path).resolve():
            echo(f"warning: init_from: {adapter} was trained on {trained_on}, not {model_path}")


def summary_text(recipe, s: dict) -> str:
    ev = s.get("final_eval") or {}
    stage = s["stage"]

    def change(key: str, label: str) -> str:
        if s.get(f"final_{key}") is None:
            return ""
        return f"  {label:<17}{s[f'first_{key}']:.4f} -> {s[f'final_{key}']:.4f}"

    lines = [
        "",
        f"{stage.upper()} finished",
        f"  steps            {s['steps']} in {s['elapsed_s']:.1f} s"
        + (f" ({s['items_per_s']:.2f} {'completions' if stage == 'kto' else 'pairs'}/s)" if s.get("items_per_s") else ""),
        f"  train loss       {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s.get("final_loss") is not None else "",
        change("accuracy", "accuracy"),
        change("margin", "margin"),
        change("reward_desirable", "reward desirable"),
        change("reward_undesirable", "reward undesir."),
        ("  eval             " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items())) if ev
        else "  eval             (no eval split)",
        f"  peak memory      {s['peak_memory_gb']:.2f} GB ({s.get('backend', 'mlx')}; one model, no reference copy)",
        f"  adapter          {s['adapter']}",
        f"  try it           mlx_lm.generate --model {recipe.model} --adapter-path {s['adapter']} --prompt \"...\"",
    ]
    return "\n".join(line for line in lines if line)
