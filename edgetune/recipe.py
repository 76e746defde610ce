"""One typed schema for YAML recipes: defaults in one place, every error at once.

A recipe is a YAML mapping read into the dataclasses below. Each dataclass is
one section; its fields (with their defaults, checks and help text) are the
only place a recipe key is defined. Adding a stage (`dpo:`, `kto:`,
`export:`, `eval:`) is adding a dataclass and one optional field on `Recipe`.

Model options are flat top-level keys (`model`, `revision`, `quantize`,
`trust_remote_code`) because a recipe names exactly one base model.

Loading never stops at the first mistake: unknown keys (with the closest valid
key suggested), wrong types, out-of-range values and cross-key conflicts are
all collected and raised as one `RecipeError`, one `FILE:LINE: key: problem`
line each. Relative paths are resolved against the recipe file's folder (paths
given with `--set` against the current directory, where they were typed).
Whether those paths exist is checked by the stage that reads them, so a
shipped recipe can name a model folder that is built later.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import click
import yaml

from edgetune.errors import UserError

DATA_FORMATS = ("auto", "edgetune", "messages", "prompt_completion", "mlx_chat", "mlx_completions", "mlx_text")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- value checks: each returns None when fine, else what is wrong -----------------------------

def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be at least {lo}, got {v}"


def _positive(v) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _fraction(v) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be between 0 and 1, got {v}"


def _below_one(v) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be at least 0 and below 1, got {v}"


def _non_empty(v) -> str | None:
    return None if v else "must not be empty"


def _opt(default: Any = None, help: str = "", *, check: Callable | None = None, path: bool | str = False,
         required: bool = False, shorthand: str | None = None):
    """A recipe key. `check`: returns what is wrong with a well-typed value, or None.
    `path`: resolved against the recipe folder ("if_local": only when it names a local folder, see
    `_resolve_model`). `shorthand`: a plain string given for this
    section means `{shorthand: string}`. A section (dataclass) default is given as its class."""
    meta = {"help": help, "check": check, "path": path, "required": required, "shorthand": shorthand}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --- the schema ---------------------------------------------------------------------------------

@dataclass
class LoraConfig:
    rank: int = _opt(8, "LoRA rank r", check=_at_least(1))
    alpha: float = _opt(16.0, "LoRA scale numerator: the update is scaled by alpha / rank", check=_positive)
    dropout: float = _opt(0.0, "dropout on the LoRA input", check=_below_one)
    targets: list[str] = _opt(ALL_LINEAR, "linear layer names to adapt (default: every linear layer of a block)",
                              check=_non_empty)
    layers: Union[int, Literal["all"]] = _opt("all", "adapt the last N transformer blocks, or all of them",
                                              check=lambda v: None if v == "all" else _at_least(1)(v))


@dataclass
class SftConfig:
    lora: LoraConfig = _opt(LoraConfig, "LoRA adapter shape")
    steps: Optional[int] = _opt(None, "optimizer steps to run (set this or epochs)", check=_at_least(1))
    epochs: Optional[float] = _opt(None, "passes over the training set (set this or steps)", check=_positive)
    batch_size: Union[int, Literal["auto"]] = _opt(
        4, "rows per micro-batch (a packed row holds several examples); auto: the largest that fits the "
           "device's memory (`edgetune plan`)", check=lambda v: None if v == "auto" else _at_least(1)(v))
    grad_accumulation: int = _opt(1, "micro-batches per optimizer step", check=_at_least(1))
    learning_rate: float = _opt(1e-4, "peak learning rate", check=_positive)
    warmup_steps: int = _opt(0, "linear warm-up steps from 0 to learning_rate", check=_at_least(0))
    lr_schedule: Literal["constant", "cosine", "linear"] = _opt("constant", "decay after warm-up")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak (cosine, linear)",
                               check=_fraction)
    weight_decay: float = _opt(0.0, "AdamW weight decay", check=_at_least(0))
    max_grad_norm: Optional[float] = _opt(1.0, "clip the global gradient norm to this; null: no clipping",
                                          check=_positive)
    max_seq_len: Union[int, Literal["auto"]] = _opt(
        2048, "longest example in tokens; longer ones are truncated or dropped; auto: the longest of 2048, "
              "1024, 512, 256 that fits the device's memory", check=lambda v: None if v == "auto" else _at_least(8)(v))
    truncation: Literal["left", "drop"] = _opt("left", "over-long rows: cut the prompt's start, or drop the row")
    # Off by default: MLX attention costs O(row length^2) per row even with a block-diagonal
    # mask, so packing short examples into long rows was 3x slower on CPU (110 vs 320 tok/s,
    # 29M model, log-normal lengths) than length-grouped batches, which waste ~3% on padding.
    packing: bool = _opt(False, "pack several examples per row (attention stays within each example); "
                                "false: batches of similar-length examples")
    grad_checkpoint: Union[bool, Literal["auto"]] = _opt(
        False, "recompute activations in the backward pass to save memory; auto: only when the run would not "
               "fit otherwise")
    seed: int = _opt(0, "seed for LoRA init, dropout and batch order")
    eval_every: int = _opt(0, "evaluate every N steps; 0: only at the end", check=_at_least(0))
    eval_batches: Optional[int] = _opt(None, "evaluate on at most N batches; null: the whole eval split",
                                       check=_at_least(1))
    save_every: int = _opt(100, "checkpoint every N steps; 0: only at the end", check=_at_least(0))
    keep_checkpoints: int = _opt(3, "newest checkpoints kept on disk", check=_at_least(1))
    max_nonfinite_steps: int = _opt(5, "stop after this many consecutive steps with a NaN/inf loss or gradient",
                                    check=_at_least(1))
    log_every: int = _opt(10, "log training metrics every N steps", check=_at_least(1))

    section = "sft"  # the recipe key of this section, for messages (a class attribute, not a key)

    def cross_check(self) -> list[tuple[str, str]]:
        s = self.section
        if (self.steps is None) == (self.epochs is None):
            how = "both are set" if self.steps is not None else "neither is set"
            return [(f"{s}.steps", f"set exactly one of {s}.steps and {s}.epochs ({how}; "
                                   "to switch with --set, also set the other to null)")]
        return []


# Preference stages reuse every SFT training key (LoRA, batching, schedule, checkpoints, guards)
# and add their own; a batch holds `batch_size` pairs (DPO, ORPO) or completions (KTO), or with
# `packing: true` `batch_size` rows filled with as many as fit.

@dataclass
class _PreferenceConfig(SftConfig):
    beta: float = _opt(0.1, "strength of the preference term (DPO/KTO: how far from the reference the "
                            "policy may move; ORPO: the paper's lambda)", check=_positive)
    init_from: str = _opt("base", "`base`, or the SFT run folder or adapter folder to continue from (the usual "
                                  "path); its adapter_config sets the LoRA shape, and the `lora:` keys are ignored",
                          path="if_local")

    batch_size: Union[int, Literal["auto"]] = _opt(
        4, "pairs (kto: completions) per micro-batch, or with packing: true rows of max_seq_len; auto: the largest "
           "that fits the device's memory (`edgetune plan`)", check=lambda v: None if v == "auto" else _at_least(1)(v))
    packing: bool = _opt(False, "fill each micro-batch's `batch_size` rows of max_seq_len with whole pairs "
                                "(completions for KTO), padding-free: batch_size then counts rows, and the pairs "
                                "per step vary; false: batch_size similar-length pairs, one completion per row")


@dataclass
class DpoConfig(_PreferenceConfig):
    section = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge"] = _opt("sigmoid", "DPO loss: sigmoid (the paper's), ipo, hinge")
    label_smoothing: float = _opt(0.0, "share of preference votes assumed flipped (conservative DPO, sigmoid "
                                       "loss only); 0.1 suits noisy user votes",
                                  check=lambda v: None if 0.0 <= v < 0.5 else f"must be in [0, 0.5), got {v}")

    def cross_check(self) -> list[tuple[str, str]]:
        out = super().cross_check()
        if self.label_smoothing and self.loss != "sigmoid":
            out.append(("dpo.label_smoothing", f"applies to the sigmoid loss only, not {self.loss}; set it to 0"))
        return out


@dataclass
class KtoConfig(_PreferenceConfig):
    section = "kto"
    desirable_weight: float = _opt(1.0, "weight of thumbs-up completions", check=_positive)
    undesirable_weight: float = _opt(1.0, "weight of thumbs-down completions", check=_positive)


@dataclass
class OrpoConfig(_PreferenceConfig):
    section = "orpo"


@dataclass
class DataConfig:
    dir: Optional[str] = _opt(None, "an `edgetune data build` output folder (reads {dir}/{split}/sft.jsonl; "
                                    "dpo/orpo: dpo.jsonl; kto: kto.jsonl)",
                              path=True)
    train: list[str] = _opt([], "training files or globs (JSONL, .jsonl.gz)", path=True)
    eval: list[str] = _opt([], "evaluation files or globs", path=True)
    format: Literal[DATA_FORMATS] = _opt("auto", "row format; auto: detected per file from its first row")

    def cross_check(self) -> list[tuple[str, str]]:
        if self.dir is not None and (self.train or self.eval):
            return [("data", "give either data.dir (a data build folder) or data.train/data.eval files, not both")]
        if self.dir is None and not self.train:
            return [("data.train", "required: training files, or data.dir (a data build folder)")]
        if self.dir is not None and self.format not in ("auto", "edgetune"):
            return [("data.format", f"a data build folder holds edgetune rows; format {self.format} "
                                    "applies only to data.train/data.eval files")]
        return []


@dataclass
class ExportQuantizeConfig:
    mlx: Literal["4bit", "8bit", "none"] = _opt("4bit", "MLX weights: 4-bit or 8-bit affine groups, or unquantized")
    gguf: Literal["f16", "q8_0", "q4_0"] = _opt("q8_0", "GGUF tensor type (K-quants: run llama-quantize on an f16 "
                                                        "export)")


@dataclass
class ExportConfig:
    formats: list[Literal["mlx", "gguf", "peft", "adapter"]] = _opt(
        ["mlx"], "what to write, one folder each: mlx (mlx-lm, LM Studio), gguf (llama.cpp, Ollama), "
                 "peft (transformers, vLLM), adapter (mlx-lm --adapter-path)", check=_non_empty)
    quantize: ExportQuantizeConfig = _opt(ExportQuantizeConfig, "quantization per format")
    group_size: int = _opt(64, "MLX quantization group size",
                           check=lambda v: None if v in (32, 64, 128) else f"must be 32, 64 or 128, got {v}")
    out: Optional[str] = _opt(None, "folder holding one subfolder per format; null: `export/` in the run folder",
                              path=True)
    max_loss_increase: float = _opt(0.05, "warn when quantization raises the eval loss by more than this many "
                                          "nats per token (0.05: perplexity +5.1%)", check=_at_least(0))

    def cross_check(self) -> list[tuple[str, str]]:
        twice = sorted({f for f in self.formats if self.formats.count(f) > 1})
        return [("export.formats", f"{', '.join(twice)} listed twice; list each format once")] if twice else []


@dataclass
class FeedbackConfig:
    logs: list[str] = _opt([], "feedback logs to build the datasets from (JSONL, .gz, globs); `edgetune run` "
                               "builds them into {output}/data", path=True, check=_non_empty, required=True)
    format: Literal["v1", "langfuse", "langsmith", "openai"] = _opt("v1", "log format: edgetune feedback v1, "
                                                                          "or an importer")
    eval_fraction: float = _opt(0.1, "share of conversations held out for evaluation", check=_below_one)
    seed: int = _opt(0, "seed of the train/eval split and of persona down-sampling")
    skip_invalid: bool = _opt(False, "leave invalid records out (counted in the report) instead of stopping")
    correction_prompt: Literal["skip-mistake", "merge"] = _opt(
        "skip-mistake", "corrections: train on the original request (skip-mistake) or merge the user's "
                        "follow-up clarifications into it (merge)")
    max_persona_share: Optional[float] = _opt(None, "cap any persona's share of the SFT rows (down-sampling)",
                                              check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}")


def _suite_drops(v: dict) -> str | None:
    bad = [k for k, drop in v.items() if drop < 0]
    return f"drops must be at least 0 points; {', '.join(bad)} below" if bad else None


@dataclass
class GateConfig:
    """Release thresholds: `edgetune eval --gate` and `edgetune run` (before export) fail when one is missed.
    Each compares a judged candidate with the base unless it says otherwise; see edgetune/eval/gate.py."""

    path: Optional[str] = _opt(None, "a gate YAML file holding the keys below (instead of giving them inline)",
                               path=True)
    candidates: list[str] = _opt([], "names of the candidates judged (eval table columns); empty: every one "
                                     "but the base")
    eval_loss_must_drop: bool = _opt(True, "the eval split's SFT loss must be below the base's")
    min_eval_loss_drop: float = _opt(0.0, "... by at least this many nats per token", check=_at_least(0))
    max_suite_drop: Optional[float] = _opt(2.0, "no regression suite may fall more than this many points "
                                                "(0-100 scale) below the base; null: not checked",
                                           check=_at_least(0))
    suite_max_drop: dict[str, float] = _opt({}, "per-suite overrides of max_suite_drop, e.g. {general: 5}",
                                            check=_suite_drops)
    min_preference_accuracy: Optional[float] = _opt(None, "held-out DPO pairs: least share with chosen more "
                                                          "likely than rejected", check=_fraction)
    min_thumbs_down_share: Optional[float] = _opt(None, "held-out thumbs-down completions: least share made "
                                                        "less likely than under the base", check=_fraction)
    max_persona_loss_increase: Optional[float] = _opt(None, "no persona's eval loss may rise above the base's "
                                                            "by more than this many nats; null: not checked",
                                                      check=_at_least(0))
    max_quantization_loss_increase: Optional[float] = _opt(0.05, "a quantized candidate's eval loss may exceed "
                                                                 "its unquantized reference's by at most this "
                                                                 "many nats", check=_at_least(0))
    quantized_reference: dict[str, str] = _opt({}, "quantized candidate -> the candidate it is checked against; "
                                                   "unlisted: the one unquantized export, else base + adapter")

    def cross_check(self) -> list[tuple[str, str]]:
        if self.path is None:
            return []
        given = [f.name for f in dataclasses.fields(self)
                 if f.name != "path" and getattr(self, f.name) != _default_of(f)]
        if given:
            return [("eval.gate.path", f"give either a gate file or inline thresholds, not both "
                                       f"({', '.join(given)} set too)")]
        return []


def _default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class EvalConfig:
    suites: list[str] = _opt([], "regression suites: JSONL files of prompts with reference answers (globs)",
                             path=True)
    builtin_suite: bool = _opt(True, "also run edgetune's built-in general suite (arithmetic, formatting, "
                                     "instruction following, short facts)")
    compare: list[str] = _opt([], "more candidates: model folders (e.g. exports) or adapter folders",
                              path=True)
    generations: int = _opt(8, "greedy generations saved for reading, on this many eval prompts",
                            check=_at_least(0))
    max_new_tokens: int = _opt(96, "longest generation, in tokens, for saved generations", check=_at_least(1))
    max_seq_len: Optional[int] = _opt(None, "longest scored row in tokens; null: the training stage's",
                                      check=_at_least(8))
    batch_size: int = _opt(8, "rows per scoring batch (length-grouped, as in training)", check=_at_least(1))
    gate: Optional[GateConfig] = _opt(None, "release thresholds; a string is the path of a gate file",
                                      shorthand="path")
    out: Optional[str] = _opt(None, "output folder; null: `eval/` in the run folder", path=True)


@dataclass
class Recipe:
    model: str = _opt(None, "hub id (org/name) or local model folder", path="if_local", required=True)
    revision: Optional[str] = _opt(None, "hub branch, tag or commit (quote all-digit commits)")
    trust_remote_code: bool = _opt(False, "allow custom model code from the hub repository")
    quantize: Optional[Literal["q4", "q8"]] = _opt(None, "quantize the frozen base weights (QLoRA)")
    backend: Literal["mlx", "torch", "auto"] = _opt("mlx", "training backend")
    output: str = _opt(None, "run folder for checkpoints, adapter and logs", path=True, required=True)
    feedback: Optional[FeedbackConfig] = _opt(None, "feedback logs that `edgetune run` builds into the "
                                                    "datasets (then `data` is not needed)")
    data: Optional[DataConfig] = _opt(None, "a data build folder, or {train, eval, format}; not needed with "
                                            "`feedback:`", shorthand="dir")
    # Stage sections are optional: absent means the recipe does not configure that stage;
    # present but empty (`sft:`) means every default.
    sft: Optional[SftConfig] = _opt(None, "LoRA supervised fine-tuning (`edgetune sft`)")
    dpo: Optional[DpoConfig] = _opt(None, "preference pairs, reference log-probs computed once (`edgetune dpo`)")
    kto: Optional[KtoConfig] = _opt(None, "unpaired thumbs up/down (`edgetune kto`)")
    orpo: Optional[OrpoConfig] = _opt(None, "reference-free preference training, SFT + odds ratio (`edgetune orpo`)")
    export: Optional[ExportConfig] = _opt(None, "formats to export the trained model in (`edgetune export`)")
    eval: Optional[EvalConfig] = _opt(None, "evaluation and release gate (`edgetune eval`, and `edgetune run` "
                                            "before export)")

    def cross_check(self) -> list[tuple[str, str]]:
        if self.feedback is not None and self.data is not None:
            return [("data", "give either feedback: (logs that `edgetune run` builds into {output}/data) or "
                             "data: (datasets already built), not both")]
        if self.feedback is None and self.data is None:
            return [("data", "required key missing: a data build folder or {train, eval} files "
                             "(or a feedback: section with the logs, for `edgetune run`)")]
        return []


def with_backend(recipe: Recipe, backend: str) -> Recipe:
    """The recipe with `backend: auto` resolved (so manifests record what actually ran)."""
    return dataclasses.replace(recipe, backend=backend)


def require_data(recipe: Recipe, command: str) -> DataConfig:
    """The datasets a single-stage command reads; a `feedback:`-only recipe needs `edgetune run` first."""
    if recipe.data is None:
        raise UserError(f"`edgetune {command}` reads built datasets, and this recipe only names feedback logs: "
                        "run `edgetune run RECIPE` (it builds them), or set data: to an `edgetune data build` "
                        "folder")
    return recipe.data


# --- errors -------------------------------------------------------------------------------------

class RecipeError(UserError):
    """Every problem found in one recipe; `problems` holds (key, reason) pairs."""

    def __init__(self, lines: list[str], problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(lines))


@dataclass
class _Context:
    """What loading one recipe needs to place and phrase errors and resolve paths."""

    file: str
    base_dir: Path
    lines: dict[str, int]  # dotted key -> line in the file
    overridden: dict[str, str]  # dotted key -> the `--set` text that set it
    problems: list[tuple[str, str, str | None]] = field(default_factory=list)  # key, reason, --set text

    def add(self, key: str, reason: str, set_text: str | None = None) -> None:
        self.problems.append((key, reason, set_text or self.from_override(key)))

    def from_override(self, key: str) -> str | None:
        for k, text in self.overridden.items():
            if key == k or key.startswith(k + "."):
                return text
        return None

    def render(self) -> list[str]:
        """One line per problem: those in the file by line, then those from `--set` as given."""
        out = []
        ordered = sorted(self.problems, key=lambda p: (p[2] is not None, 0 if p[2] else self.lines.get(p[0], 0)))
        for key, reason, set_text in ordered:
            if set_text is not None:
                out.append(f"{self.file}: {key}: {reason} (from --set {set_text})")
            else:
                line = self.lines.get(key)
                out.append(f"{self.file}:{line}: {key}: {reason}" if line else f"{self.file}: {key}: {reason}")
        return out


# --- loading ------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    `overrides` are `dotted.key=value` strings; the value is parsed as YAML
    (`sft.steps=20`, `sft.lora.targets=[q_proj,v_proj]`, `revision=null`).
    Raises `UserError` when the file cannot be read or is not YAML, and one
    `RecipeError` listing every schema problem otherwise.
    """
    return _load_file(path, Recipe, "recipe", "model:, output:, data:, sft: ...", overrides)


def load_section_file(path: str | os.PathLike, cls: type, what: str, example_keys: str):
    """Read one schema section kept in a file of its own (e.g. a gate file: `GateConfig`), with the
    recipe's checks: unknown keys named with their line, every problem at once (`RecipeError`).
    Relative paths in it resolve against its folder."""
    return _load_file(path, cls, what, example_keys, ())


def _load_file(path, cls: type, what: str, example_keys: str, overrides):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a {what} is YAML") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a {what} is a YAML mapping of keys ({example_keys}), not a {type(raw).__name__}")

    lines: dict[str, int] = {}
    ctx = _Context(str(path), path.resolve().parent, lines, {})
    _index_lines(node, "", lines, ctx)
    for text_ in overrides:
        _apply_override(raw, text_, ctx)
    loaded = _build(cls, raw, "", ctx)
    if ctx.problems:
        raise RecipeError(ctx.render(), [(key, reason) for key, reason, _ in ctx.problems])
    return loaded


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (for run manifests); sections left out of the
    recipe are left out here too, so the dict loads back as the same recipe."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if value is None and _section_class(_hints(type(recipe))[f.name]) is not None:
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema (sections included)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        inner = _section_class(_hints(cls)[f.name])
        if inner is not None:
            keys.extend(recipe_keys(inner, key + "."))
    return keys


def _index_lines(node, prefix: str, lines: dict[str, int], ctx: _Context) -> None:
    """Record the line of every mapping key; report keys given twice (YAML keeps the last silently)."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = prefix + str(key_node.value)
        if key in seen:
            lines.setdefault(key, key_node.start_mark.line + 1)
            ctx.add(key, f"given twice (again on line {key_node.start_mark.line + 1}); keep one")
        seen.add(key)
        lines.setdefault(key, key_node.start_mark.line + 1)
        _index_lines(value_node, key + ".", lines, ctx)


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _apply_override(raw: dict, text: str, ctx: _Context) -> None:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        ctx.add(key or "--set", "expected KEY=VALUE with a dotted key, e.g. sft.steps=20", text)
        return
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        ctx.add(key, f"the value is not valid YAML ({getattr(e, 'problem', None) or e})", text)
        return
    parts = key.split(".")
    node, cls = raw, Recipe
    for i, part in enumerate(parts[:-1]):
        f = _field(cls, part)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and f is not None and f.metadata["shorthand"]:
            child = node[part] = {f.metadata["shorthand"]: child}
        if not isinstance(child, dict):
            ctx.add(".".join(parts[: i + 1]), f"holds {_describe(child)}, not a mapping; set the whole value "
                                               "instead", text)
            return
        # Below an unknown key there is no schema; validation names that key with a suggestion.
        node, cls = child, (_section_class(_hints(cls)[part]) if f is not None else None)
    node[parts[-1]] = value
    ctx.overridden[key] = text


def _build(cls: type, raw: dict, prefix: str, ctx: _Context):
    """Instantiate `cls` from `raw`, recording each problem in `ctx` instead of raising."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if str(key) not in names:
            ctx.add(prefix + str(key), _unknown_key_hint(str(key), prefix, cls))
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in raw:
            if f.metadata["required"]:
                ctx.add(key, f"required key missing ({f.metadata['help']})")
            elif dataclasses.is_dataclass(hints[f.name]):  # a mandatory section: all defaults
                values[f.name] = _build(hints[f.name], {}, key + ".", ctx)
            continue
        value = _convert(raw[f.name], hints[f.name], f, key, ctx)
        if value is not _INVALID:
            values[f.name] = value
    # Missing required keys fall back to None so later checks can still run.
    obj = cls(**values)
    if dataclasses.is_dataclass(obj) and hasattr(obj, "cross_check"):
        for key, reason in obj.cross_check():
            ctx.add(key, reason)
    return obj


_INVALID = object()


def _convert(value, tp, f: dataclasses.Field, key: str, ctx: _Context):
    """Check `value` against the annotation `tp`; return the converted value or _INVALID."""
    section = _section_class(tp)
    if section is not None:
        if value is None:
            value = {}  # `sft:` with nothing under it: every default
        if isinstance(value, str) and f.metadata["shorthand"]:
            value = {f.metadata["shorthand"]: value}
        if not isinstance(value, dict):
            ctx.add(key, f"expected a mapping of keys, got {_describe(value)}")
            return _INVALID
        return _build(section, value, key + ".", ctx)
    ok, out = _match(value, tp)
    if not ok:
        ctx.add(key, f"expected {_type_name(tp)}, got {_describe(value)}")
        return _INVALID
    check = f.metadata["check"]
    if out is not None and check is not None:
        reason = check(out)
        if reason:
            ctx.add(key, reason)
            return _INVALID
    if f.metadata["path"] and out is not None:
        base = Path.cwd() if ctx.from_override(key) is not None else ctx.base_dir
        resolve = _resolve_model if f.metadata["path"] == "if_local" else _resolve_path
        out = [resolve(p, base) for p in out] if isinstance(out, list) else resolve(out, base)
    return out


def _match(value, tp) -> tuple[bool, Any]:
    """(True, converted) when `value` fits the type annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for member in typing.get_args(tp):
            ok, out = _match(value, member)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in typing.get_args(tp) and not isinstance(value, bool)), value
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = [value] if not isinstance(value, list) else value  # `train: a.jsonl` means a list of one
        converted = [_match(v, inner) for v in items]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, None
        pairs = [(_match(k, key_tp), _match(v, value_tp)) for k, v in value.items()]
        return all(k[0] and v[0] for k, v in pairs), {k[1]: v[1] for k, v in pairs}
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string: accept what is plainly a number.
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"recipe schema uses an unsupported type {tp!r}")  # a bug in this module


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(m) for m in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ')}s"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {_type_name(key_tp).removeprefix('a ')}s to {_type_name(value_tp).removeprefix('a ')}s"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _describe(value) -> str:
    if value is None:
        return "null"
    name = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{name} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _unknown_key_hint(name: str, prefix: str, cls: type) -> str:
    here = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {prefix}{close[0]}?"
    # The right key in the wrong section (e.g. `learning_rate:` at the top level).
    elsewhere = [k for k in recipe_keys() if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f"unknown key here; did you mean {elsewhere[0]}?"
    return f"unknown key; valid keys here: {', '.join(here)}"


def _resolve_path(p: str, base: Path) -> str:
    p = os.path.expanduser(p)
    return os.path.normpath(p if os.path.isabs(p) else base / p)


def _resolve_model(name: str, base: Path) -> str:
    """A model is a local folder when it looks like a path (./x, ../x, /x, ~/x) or such a folder
    exists beside the recipe; otherwise it is a hub id and kept as written."""
    if name.startswith((".", "/", "~")) or (base / name).exists():
        return _resolve_path(name, base)
    return name


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations of `from __future__`


def _section_class(tp) -> type | None:
    """The dataclass a field holds (`X` or `Optional[X]`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _field(cls: type | None, name: str) -> dataclasses.Field | None:
    if cls is None:
        return None
    return next((f for f in dataclasses.fields(cls) if f.name == name), None)


# --- `edgetune recipe ...` --------------------------------------------------------------------

@click.group()
def recipe() -> None:
    """Check recipes before training."""


@recipe.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set sft.steps=20 (repeatable).")
def validate(files: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check each recipe FILE; print OK or every problem found."""
    failed = 0
    for file in files:
        try:
            load_recipe(file, list(overrides))
        except UserError as e:
            failed += 1
            click.echo(str(e), err=True)
        else:
            click.echo(f"{file}: OK")
    if failed:
        raise UserError(f"{failed} of {len(files)} recipe(s) have problems (listed above)")
