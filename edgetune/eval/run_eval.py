"""`edgetune eval`: candidates side by side on the same items, and the release gate.

One visible flow in `run_eval`:

1. Candidates (`Candidate`): the base, base + adapter, and any more model
   folders (exports, quantized or not) or adapters. `load_candidate` is the one
   place a backend is chosen; every candidate answers the small `Scorer`
   protocol (summed completion log-probs, greedy generations), so a torch
   candidate is one more loader, not a new evaluation.
2. Items, read once (`read_eval_data`, `suites.load_suites`): the eval split's
   SFT rows, DPO pairs and thumbs-down KTO rows (with their personas), and the
   regression suites.
3. Per candidate, one at a time (one model in memory): the items are tokenised
   with its tokenizer exactly as training does (`sft_data.tokenize_example`)
   and must give the base's token ids; every completion is scored in one
   length-grouped, batched pass (the same grouping as training); the generated
   suite items and the sample prompts are decoded greedily in length-grouped
   batches.
4. Metrics (metrics.py), per-persona slices, changes against the base, the gate
   (gate.py) and the outputs (report.py), written atomically into one folder.

Every candidate runs in float32 on the CPU (as training does; quantized layers
stay quantized), so a difference between two candidates comes from their
weights, not from their arithmetic.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgetune.errors import UserError
from edgetune.eval import metrics as M
from edgetune.eval.gate import GateFailed, check_gate, check_names, failed

DEFAULT_MAX_SEQ_LEN = 2048
UNTAGGED = "(none)"  # persona of rows without one, as `edgetune data build` reports it


# --- 1. candidates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    name: str  # column in the table
    role: str  # "base", "adapter" (applied to the base) or "model" (a whole model folder)
    model: str  # hub id or folder of the weights
    adapter: str | None = None
    backend: str = "mlx"

    def record(self) -> dict:
        return {"name": self.name, "role": self.role, "model": self.model, "adapter": self.adapter,
                "backend": self.backend, "quantization": quantization_of(self.model)}


def quantization_of(model: str) -> str | None:
    """'4-bit, group 64' for a model folder whose config.json says it is quantized, else None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    q = json.loads(config.read_text()).get("quantization")
    return f"{q.get('bits')}-bit, group {q.get('group_size')}" if q else None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_compare(spec: str, base_model: str, taken: set[str]) -> Candidate:
    """`[NAME=]PATH` -> a Candidate: a model folder (config.json), an mlx-lm adapter folder, or a run folder
    (its adapter/). Without NAME, the folder's name. Raises UserError for anything else, naming what was found."""
    name, sep, path = spec.partition("=")
    if not sep or not _NAME.match(name) or Path(spec).exists():
        name, path = "", spec
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"--compare {spec}: no such folder")
    if (p / "adapter" / "adapter_config.json").is_file():
        role, model, adapter = "adapter", base_model, str(p / "adapter")
    elif (p / "adapter_config.json").is_file():
        if not (p / "adapters.safetensors").is_file():
            raise UserError(f"--compare {spec}: an adapter folder without adapters.safetensors (a PEFT adapter? "
                            f"convert it with `edgetune export {p} --format adapter --base MODEL --out DIR`)")
        role, model, adapter = "adapter", base_model, str(p)
    elif (p / "config.json").is_file():
        role, model, adapter = "model", str(p), None
    else:
        raise UserError(f"--compare {spec}: neither a model folder (config.json), an adapter folder "
                        "(adapter_config.json) nor a run folder (adapter/)")
    name = unique_name(name or (p.parent.name if p.name == "adapter" else p.name), taken)
    return Candidate(name, role, model, adapter)


def unique_name(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


class Scorer(Protocol):
    """What evaluation needs from a loaded candidate, whatever runs it."""

    tokenizer: object  # apply_chat_template / encode / decode, as Hugging Face tokenizers
    vocab_size: int

    def logprobs(self, rows: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs and completion token counts of `rows` (TokenizedExample), in order."""

    def generate(self, prompts: list[list[int]], max_tokens: list[int], batch_size: int) -> list[str]:
        """Greedy continuations of token-id prompts (stopping at end of turn), in order."""


def load_candidate(c: Candidate) -> Scorer:
    """The one place a backend is chosen. A torch candidate adds a loader here returning a `Scorer`."""
    if c.backend == "mlx":
        return MlxScorer.load(c)
    raise UserError(f"candidate {c.name}: backend {c.backend!r} is not available; edgetune evaluates on mlx")


class MlxScorer:
    """A candidate on MLX, loaded as training loads models (`models.load_for_training`: float32 on the CPU)
    with the adapter applied as training attaches it, and checked key by key.

    On the CPU a quantized model is dequantized to float32 first: the weights keep exactly their quantized
    values, and MLX's CPU quantized matmul was 4.6x slower than float32 here (q4 tiny model: 14.8 s vs
    3.2 s to score the same rows). On a GPU the quantized kernels run as deployed.
    """

    def __init__(self, model, tokenizer, config: dict):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.vocab_size = int(config["vocab_size"])

    @classmethod
    def load(cls, c: Candidate) -> MlxScorer:
        from edgetune.lora import attach_lora, load_adapter_weights, read_adapter_config
        from edgetune.models import load_for_training
        from edgetune.preference import spec_from_adapter

        loaded = load_for_training(c.model)
        if "quantization" in loaded.config and loaded.dtype != "stored":  # "stored": a GPU, see training_dtype
            from mlx_lm.utils import dequantize_model

            dequantize_model(loaded.model)
        if c.adapter is not None:
            cfg = read_adapter_config(c.adapter)
            if cfg.get("fine_tune_type", "lora") != "lora":
                raise UserError(f"{c.adapter}: a {cfg['fine_tune_type']} adapter; edgetune evaluates LoRA adapters")
            attach_lora(loaded.model, spec_from_adapter(cfg, Path(c.adapter)), seed=0)
            load_adapter_weights(loaded.model, c.adapter)
        loaded.model.eval()  # no LoRA dropout
        return cls(loaded.model, loaded.tokenizer, loaded.config)

    def logprobs(self, rows: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        from edgetune.kernels import training_kernels
        from edgetune.pref_data import group_batches
        from edgetune.preference import sequence_logprobs
        from edgetune.runtime import mlx_core
        from edgetune.sft import to_micro_batch
        from edgetune.sft_data import collate

        mx = mlx_core()
        sums, counts = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
        # Length-grouped as training batches are: similar lengths together, little padding. The training
        # loop's kernels (a fast exp on Linux CPUs, ~2x here) give the eval loss `edgetune sft` reports.
        with training_kernels(self.model):
            for group in group_batches([r.n_positions for r in rows], batch_size, 0, 0):
                mb = to_micro_batch(collate([[rows[i]] for i in group]))
                lp, n = sequence_logprobs(self.model, *mb.arrays[:4])
                mx.eval(lp, n)
                sums[group], counts[group] = np.array(lp), np.array(n).astype(np.int64)
        return sums, counts

    def generate(self, prompts: list[list[int]], max_tokens: list[int], batch_size: int) -> list[str]:
        from mlx_lm.generate import batch_generate

        from edgetune.pref_data import group_batches

        out = [""] * len(prompts)
        # batch_generate decodes greedily by default (no sampler) and stops at the tokenizer's end-of-turn
        # ids; its left-padded batches give the same text as one-by-one mlx_lm.generate (tested).
        for group in group_batches([len(p) for p in prompts], batch_size, 0, 0):
            res = batch_generate(self.model, self.tokenizer, [prompts[i] for i in group],
                                 max_tokens=[max_tokens[i] for i in group])
            for i, text in zip(group, res.texts):
                out[i] = text
        return out


# --- 2. items -------------------------------------------------------------------------------------

@dataclass
class EvalData:
    """The eval split, before tokenisation. `personas`: row id (FILE:LINE) -> persona, for rows that have one."""

    sft: list = field(default_factory=list)  # sft_data.Example
    pairs: list = field(default_factory=list)  # pref_data.PreferenceRow (chosen/rejected)
    thumbs_down: list = field(default_factory=list)  # pref_data.PreferenceRow with label False
    personas: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # path -> sha256

    @property
    def has_personas(self) -> bool:
        return bool(self.personas)


def read_eval_data(data) -> EvalData:
    """The eval rows of a recipe DataConfig (None: no data). DPO pairs and thumbs-down rows are read only
    from a data build folder (`{dir}/eval/dpo.jsonl`, `kto.jsonl`); explicit files are SFT rows."""
    from edgetune.fileio import sha256_file
    from edgetune.pref_data import load_preference_rows, preference_files
    from edgetune.sft_data import data_files, load_sft_rows

    out = EvalData()
    if data is None:
        return out
    out.sft = load_sft_rows(data, "eval")
    files = data_files(data, "eval")
    if data.dir is not None:
        out.pairs = load_preference_rows(data, "eval", "dpo")
        out.thumbs_down = [r for r in load_preference_rows(data, "eval", "kto") if r.label is False]
        files += preference_files(data, "eval", "dpo") + preference_files(data, "eval", "kto")
    for path in files:
        out.files[str(path)] = sha256_file(path)
        out.personas.update(personas_in(path))
    return out


def personas_in(path: Path) -> dict[str, str]:
    """{FILE:LINE: persona} for rows of `path` whose `source.persona` is set (what `edgetune data build`
    writes); the ids match the ones the row loaders give."""
    from edgetune.data.source import Invalid, iter_jsonl

    out = {}
    for lineno, row in iter_jsonl(path):
        if isinstance(row, Invalid):
            continue
        source = row.get("source")
        if isinstance(source, dict) and isinstance(source.get("persona"), str):
            out[f"{path}:{lineno}"] = source["persona"]
    return out


@dataclass
class Plan:
    """Every item of one evaluation as token ids: `rows` are scored by log-likelihood in one pass, the
    index lists say which rows are what; `prompts` are generated."""

    rows: list = field(default_factory=list)  # TokenizedExample
    sft: list[int] = field(default_factory=list)
    sft_ids: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    pair_ids: list[str] = field(default_factory=list)
    down: list[int] = field(default_factory=list)
    down_ids: list[str] = field(default_factory=list)
    suite_rows: dict = field(default_factory=dict)  # (suite, item id) -> [row per choice / the answer]
    prompts: list[list[int]] = field(default_factory=list)
    max_tokens: list[int] = field(default_factory=list)
    prompt_keys: list[tuple] = field(default_factory=list)  # ("suite", suite, id) or ("sample", row id)
    stats: dict = field(default_factory=dict)

    def add(self, examples) -> list[int]:
        start = len(self.rows)
        self.rows.extend(examples)
        return list(range(start, len(self.rows)))

    def fingerprint(self) -> str:
        from edgetune.pref_data import rows_fingerprint

        h = hashlib.sha256(rows_fingerprint(self.rows).encode())
        for p in self.prompts:
            h.update(np.asarray(p, np.int64).tobytes() + b"|")
        return h.hexdigest()

    @property
    def n_items(self) -> int:
        generated_suite = sum(1 for k in self.prompt_keys if k[0] == "suite")
        return len(self.sft) + len(self.pairs) + len(self.down) + len(self.suite_rows) + generated_suite \
            + sum(1 for k in self.prompt_keys if k[0] == "sample")


def build_plan(data: EvalData, suites: list, tokenizer, vocab_size: int, max_seq_len: int,
               n_samples: int, sample_tokens: int) -> Plan:
    """Tokenise every item as training does. Over-long eval rows are cut from the prompt's start (as
    training's default); an over-long suite item is an error naming its line."""
    from edgetune.pref_data import tokenize_pairs, tokenize_unpaired
    from edgetune.sft_data import Example, TokenizationError, TokenizedExample, TokenizerFacts, tokenize_dataset
    from edgetune.sft_data import tokenize_example

    plan = Plan()
    sft, plan.stats["sft"] = tokenize_dataset(data.sft, tokenizer, max_seq_len, "left", vocab_size)
    plan.sft, plan.sft_ids = plan.add(sft), [ex.id for ex in sft]
    pairs, plan.stats["dpo"] = tokenize_pairs(data.pairs, tokenizer, max_seq_len, "left", vocab_size)
    chosen, rejected = plan.add([p.chosen for p in pairs]), plan.add([p.rejected for p in pairs])
    plan.pairs, plan.pair_ids = list(zip(chosen, rejected)), [p.id for p in pairs]
    down, _, plan.stats["thumbs_down"] = tokenize_unpaired(data.thumbs_down, tokenizer, max_seq_len, "left",
                                                           vocab_size)
    plan.down, plan.down_ids = plan.add(down), [ex.id for ex in down]

    facts = TokenizerFacts.of(tokenizer)
    for suite in suites:
        for item in suite.items:
            encoded = []
            for answer in item.answers[: 1 if item.type in ("exact", "contains") else None]:
                ex = Example(item.where, item.prompt, [{"role": "assistant", "content": answer}])
                tokens, prompt_len = tokenize_example(ex, tokenizer, vocab_size, facts)
                if len(tokens) > max_seq_len:
                    raise TokenizationError(f"{item.where}: {len(tokens)} tokens, longer than max_seq_len "
                                            f"{max_seq_len}; shorten the item or raise eval.max_seq_len")
                encoded.append(TokenizedExample(item.where, np.asarray(tokens, np.int32), prompt_len))
            if item.type in ("exact", "contains"):
                ex = encoded[0]
                plan.prompts.append(ex.tokens[: ex.prompt_len].tolist())
                plan.max_tokens.append(item.max_tokens)
                plan.prompt_keys.append(("suite", suite.name, item.id))
            else:
                plan.suite_rows[suite.name, item.id] = plan.add(encoded)

    for i in sample_positions(len(sft), n_samples):
        ex = sft[i]
        plan.prompts.append(ex.tokens[: ex.prompt_len].tolist())
        plan.max_tokens.append(sample_tokens)
        plan.prompt_keys.append(("sample", ex.id))
    return plan


def sample_positions(n: int, k: int) -> list[int]:
    """k positions spread evenly over n rows (all of them when k >= n): a sample across the whole split."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)}) if k > 0 else []


# --- 3. one candidate -----------------------------------------------------------------------------

@dataclass
class Raw:
    """What one candidate produced: per-row log-probs, generations by prompt key, and timings."""

    logps: np.ndarray
    counts: np.ndarray
    texts: dict
    load_s: float
    score_s: float
    generate_s: float


def evaluate_candidate(scorer: Scorer, plan: Plan, batch_size: int) -> Raw:
    t0 = time.perf_counter()
    logps, counts = scorer.logprobs(plan.rows, batch_size) if plan.rows else (np.zeros(0), np.zeros(0, np.int64))
    t1 = time.perf_counter()
    texts = scorer.generate(plan.prompts, plan.max_tokens, batch_size) if plan.prompts else []
    t2 = time.perf_counter()
    return Raw(logps, counts, dict(zip(plan.prompt_keys, texts)), 0.0, t1 - t0, t2 - t1)


# --- 4. metrics -----------------------------------------------------------------------------------

def task_metrics(plan: Plan, raw: Raw, base: Raw | None, sft: list[int], pairs: list[int],
                 down: list[int]) -> dict:
    """Eval loss/perplexity, preference accuracy/margin and the thumbs-down share over the given positions
    of `plan.sft`, `plan.pairs`, `plan.down` (all of them, or one persona's). `base` None: this is the base."""
    rows = [plan.sft[i] for i in sft]
    loss = M.mean_token_loss(raw.logps[rows], raw.counts[rows]) if rows else None
    chosen, rejected = [plan.pairs[i][0] for i in pairs], [plan.pairs[i][1] for i in pairs]
    pref = M.preference_stats(raw.logps[chosen], raw.logps[rejected], raw.counts[chosen], raw.counts[rejected])
    reward = (M.reward_stats(raw.logps[chosen], raw.logps[rejected], base.logps[chosen], base.logps[rejected])
              if base is not None else {"accuracy": None, "margin": None})
    down_rows = [plan.down[i] for i in down]
    share = M.less_likely_share(raw.logps[down_rows], base.logps[down_rows]) if base is not None else None
    return {"eval_loss": loss, "perplexity": M.perplexity(loss) if loss is not None else None,
            "eval_rows": len(rows), "eval_tokens": int(raw.counts[rows].sum()) if rows else 0,
            "preference_accuracy": pref["accuracy"], "preference_margin": pref["margin"], "pairs": pref["pairs"],
            "reward_accuracy": reward["accuracy"], "reward_margin": reward["margin"],
            "thumbs_down_less_likely": share, "thumbs_down": len(down_rows)}


def persona_metrics(plan: Plan, raw: Raw, base: Raw | None, personas: dict) -> dict:
    """task_metrics per persona (rows without one under "(none)"); {} when no row has a persona."""
    if not personas:
        return {}
    groups = [M.group_indices([personas.get(i, UNTAGGED) for i in ids])
              for ids in (plan.sft_ids, plan.pair_ids, plan.down_ids)]
    names = sorted(set().union(*groups), key=lambda p: (p == UNTAGGED, p))
    return {p: task_metrics(plan, raw, base, *(g.get(p, []) for g in groups)) for p in names}


def suite_metrics(plan: Plan, raw: Raw, suites: list) -> tuple[dict, list[dict]]:
    """Per suite: score (0-100), items, per-category scores; and one record per item (for reading failures)."""
    results, records = {}, []
    for suite in suites:
        scores, cats = [], []
        for item in suite.items:
            rec = {"suite": suite.name, "id": item.id, "type": item.type, "category": item.category}
            if item.type in ("exact", "contains"):
                text = raw.texts[("suite", suite.name, item.id)]
                match = M.exact_match if item.type == "exact" else M.contains_match
                score = float(match(text, item.answers, item.case_sensitive))
                rec["prediction"] = text
            elif item.type == "choice":
                lp = raw.logps[plan.suite_rows[suite.name, item.id]]
                score = float(M.choice_correct(lp, item.answer_index))
                rec["picked"] = item.answers[int(np.argmax(lp))]
            else:
                (row,) = plan.suite_rows[suite.name, item.id]
                score = M.answer_probability(raw.logps[row], int(raw.counts[row]))
            rec["score"] = score
            records.append(rec)
            scores.append(score)
            cats.append(item.category)
        by_cat = {c: M.suite_score([scores[i] for i in idx]) for c, idx in M.group_indices(cats).items()
                  if c is not None}
        results[suite.name] = {"score": M.suite_score(scores), "items": len(scores), "categories": by_cat}
    return results, records


def deltas(results: dict, base: str) -> dict:
    """Candidate -> {metric: change against the base}, for the metrics both have."""
    b = results[base]
    out = {}
    for name, r in results.items():
        if name == base:
            continue
        d = {}
        for key in ("eval_loss", "perplexity", "preference_accuracy", "preference_margin"):
            x, y = r["task"].get(key), b["task"].get(key)
            if x is not None and y is not None:
                d[key] = x - y
        for suite, s in r["suites"].items():
            d[f"suite:{suite}"] = s["score"] - b["suites"][suite]["score"]
        out[name] = d
    return out


# --- the flow -------------------------------------------------------------------------------------

def clear_cache() -> None:
    from edgetune.runtime import mlx_core

    mlx_core().clear_cache()

@dataclass
class EvalSettings:
    candidates: list[Candidate]  # the first is the base
    data: object = None  # recipe DataConfig, or None (suites only)
    suites: list[str] = field(default_factory=list)
    builtin_suite: bool = True
    generations: int = 8
    max_new_tokens: int = 96
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    batch_size: int = 8
    gate: object = None  # recipe GateConfig, or None
    run: Path | None = None  # a run folder: its metrics.jsonl is the loss curve
    plots: bool = True  # draw the loss curve as PNG when matplotlib is importable


def run_eval(settings: EvalSettings, out: str | Path, force: bool = False,
             echo: Callable[[str], None] = print) -> dict:
    """Evaluate every candidate, write `out` (eval.json, report.md, generations.jsonl, suite_items.jsonl,
    loss_curve.png), print the table, and return eval.json's content.

    Raises GateFailed (after writing `out`) when a gate is set and a check fails; UserError for bad
    candidates, data, suites, gate names, or an existing `out` without `force`.
    """
    from edgetune import __version__
    from edgetune.eval import report
    from edgetune.eval.gate import resolve_gate
    from edgetune.eval.suites import load_suites
    from edgetune.fileio import atomic_dir
    from edgetune.runtime import blas_info, restore_openblas_threads

    restore_openblas_threads()  # evaluation runs on MLX, also after a torch stage in this process

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force")
    gate = resolve_gate(settings.gate)
    candidates = settings.candidates
    base = candidates[0].name
    data = read_eval_data(settings.data)
    suites = load_suites(settings.suites, settings.builtin_suite)
    if gate is not None:
        check_names(gate, [c.name for c in candidates], [s.name for s in suites])
    echo(f"eval: {len(candidates)} candidates ({', '.join(c.name for c in candidates)}); "
         f"{len(data.sft)} SFT eval rows, {len(data.pairs)} DPO pairs, {len(data.thumbs_down)} thumbs-down rows, "
         f"{len(suites)} suites ({', '.join(f'{s.name}: {len(s.items)}' for s in suites) or 'none'})")

    raws: dict[str, Raw] = {}
    plan = None
    fingerprint = None
    for c in candidates:
        t0 = time.perf_counter()
        scorer = load_candidate(c)
        load_s = time.perf_counter() - t0
        p = build_plan(data, suites, scorer.tokenizer, scorer.vocab_size, settings.max_seq_len,
                       settings.generations, settings.max_new_tokens)
        if fingerprint is None:
            plan, fingerprint = p, p.fingerprint()
            echo(f"items: {len(p.rows)} completions to score, {len(p.prompts)} prompts to generate "
                 f"(batches of {settings.batch_size}, length-grouped)")
        elif p.fingerprint() != fingerprint:
            raise UserError(f"candidate {c.name}: its tokenizer or chat template gives other token ids than "
                            f"{base}'s on the same items; candidates must share the base's tokenizer to be compared")
        raw = evaluate_candidate(scorer, plan, settings.batch_size)
        raw.load_s = load_s
        raws[c.name] = raw
        del scorer
        gc.collect()
        clear_cache()  # one model in memory at a time: hand its buffers back before loading the next
        echo(f"  {c.name}: loaded in {load_s:.1f} s, scored in {raw.score_s:.1f} s, generated in "
             f"{raw.generate_s:.1f} s ({plan.n_items / max(raw.score_s + raw.generate_s, 1e-9):.1f} items/s)")

    results, item_records = {}, {}
    positions = sum(r.n_positions for r in plan.rows)
    for c in candidates:
        raw, b = raws[c.name], (raws[base] if c.name != base else None)
        all_sft, all_pairs, all_down = range(len(plan.sft)), range(len(plan.pairs)), range(len(plan.down))
        suite_res, records = suite_metrics(plan, raw, suites)
        item_records[c.name] = records
        busy = raw.score_s + raw.generate_s
        results[c.name] = {
            "task": task_metrics(plan, raw, b, list(all_sft), list(all_pairs), list(all_down)),
            "personas": persona_metrics(plan, raw, b, data.personas),
            "suites": suite_res,
            "timing": {"load_s": round(raw.load_s, 3), "score_s": round(raw.score_s, 3),
                       "generate_s": round(raw.generate_s, 3), "items": plan.n_items,
                       "items_per_s": plan.n_items / busy if busy else None,
                       # every position a forward pass computes, and the completion tokens among them
                       "scored_positions_per_s": positions / raw.score_s if raw.score_s else None,
                       "completion_tokens_per_s": float(raw.counts.sum()) / raw.score_s if raw.score_s else None},
        }

    records = [c.record() for c in candidates]
    lines = check_gate(gate, results, records, base) if gate is not None else []
    info = {
        "edgetune": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": base,
        "candidates": records,
        "data": {"files": data.files, "tokenized": plan.stats, "personas": sorted(set(data.personas.values()))},
        "suites": [{"name": s.name, "file": s.file, "items": len(s.items), "types": s.counts()} for s in suites],
        "settings": {"max_seq_len": settings.max_seq_len, "batch_size": settings.batch_size,
                     "generations": settings.generations, "max_new_tokens": settings.max_new_tokens,
                     "batching": "length-grouped, as training", "blas": blas_info()["why"],
                     "quantized_models": "dequantized to float32 on the CPU (same weight values)",
                     "cpu_count": os.cpu_count()},
        "results": results,
        "deltas": deltas(results, base),
        "gate": None if gate is None else {"ok": not failed(lines), "lines": [line.render() for line in lines]},
        "run": str(settings.run) if settings.run else None,
    }
    with atomic_dir(out, replace=force) as tmp:
        report.write_outputs(tmp, info, plan, raws, data, item_records, settings.run, settings.plots)
    table = report.terminal_table(info)
    echo(table)
    echo(f"wrote {out} (eval.json, report.md, generations.jsonl, suite_items.jsonl)")
    if gate is not None:
        bad = failed(lines)
        if bad:
            raise GateFailed([line.render() for line in bad], str(out / "report.md"))
        echo(f"gate: passed ({len(lines)} checks)")
    return info


# --- what `edgetune eval` and `edgetune run` build settings from ----------------------------------

def run_folder_info(run: str | Path) -> dict:
    """A training run folder's manifest.json (resolved recipe, model_path); raises UserError if absent."""
    run = Path(run)
    path = run / "manifest.json"
    if not path.is_file():
        raise UserError(f"--run {run}: not a run folder (no manifest.json); give the folder `edgetune sft` wrote")
    manifest = json.loads(path.read_text())
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"--run {run}: has no adapter/ yet (the stage did not finish); finish it with --resume")
    return manifest


def settings_for_recipe(recipe, adapter: str | Path | None, base_model: str | None = None, data=None,
                        run: Path | None = None, stage_max_seq_len: int | None = None) -> EvalSettings:
    """EvalSettings from a recipe's `eval:` section (all defaults when it has none): `base` = `base_model`
    (default recipe.model), `tuned` = base + `adapter`, then the section's `compare` entries. `data`
    overrides recipe.data."""
    from edgetune.recipe import EvalConfig

    cfg = recipe.eval or EvalConfig()
    model = base_model or recipe.model
    taken = {"base"}
    candidates = [Candidate("base", "base", model)]
    if adapter is not None:
        candidates.append(Candidate(unique_name("tuned", taken), "adapter", model, str(adapter)))
    candidates += [parse_compare(spec, model, taken) for spec in cfg.compare]
    return EvalSettings(candidates, data if data is not None else recipe.data, list(cfg.suites), cfg.builtin_suite,
                        cfg.generations, cfg.max_new_tokens,
                        cfg.max_seq_len or stage_max_seq_len or DEFAULT_MAX_SEQ_LEN, cfg.batch_size, cfg.gate, run)


def evaluate_run(recipe, stage: str, out: str | Path | None = None, force: bool = True,
                 echo: Callable[[str], None] = print) -> dict:
    """What `edgetune run` calls after training and before export: base vs base + the run's adapter
    (`{recipe.output}/adapter`), as the recipe's `eval:` section says, written to `out` (default: the
    section's `out`, else `{recipe.output}/eval`). Raises GateFailed when the section's gate fails: the
    caller stops before exporting."""
    run = Path(recipe.output)
    manifest = run_folder_info(run)
    stage_len = getattr(getattr(recipe, stage, None), "max_seq_len", None)
    settings = settings_for_recipe(recipe, run / "adapter", base_model=manifest.get("model_path"), run=run,
                                   stage_max_seq_len=stage_len if isinstance(stage_len, int) else None)
    target = out or (recipe.eval.out if recipe.eval is not None and recipe.eval.out else run / "eval")
    return run_eval(settings, target, force=force, echo=echo)
