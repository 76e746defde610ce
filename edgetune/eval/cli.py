"""`edgetune eval`: compare a base model, its adapter and exports on the same items; the release gate."""

from __future__ import annotations

from pathlib import Path

import click

from edgetune.errors import UserError


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(name="eval")
@click.option("--model", help="The base model: hub id or local folder (default: the run's or recipe's).")
@click.option("--adapter", help="An adapter folder or run folder: adds the candidate `tuned` = base + adapter.")
@click.option("--compare", "compare", multiple=True, metavar="[NAME=]PATH",
              help="Another candidate (repeatable): a model folder (e.g. an `edgetune export`, quantized or not) "
                   "or an adapter/run folder applied to the base. NAME labels its column (default: folder name).")
@click.option("--run", "run_dir", type=click.Path(file_okay=False),
              help="A run folder: its adapter is `tuned`; its manifest gives the base model, data and eval: "
                   "section; its metrics.jsonl is the loss curve.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="A recipe: its model, data, run folder (output) and eval: section.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="An `edgetune data build` folder; its eval/ split is evaluated.")
@click.option("--suite", "suites", multiple=True, metavar="FILE",
              help="A regression suite JSONL (repeatable; globs allowed).")
@click.option("--builtin-suite/--no-builtin-suite", default=None,
              help="Run the built-in general suite (default: on).")
@click.option("--gate", "gate_path", type=click.Path(dir_okay=False),
              help="A gate YAML file: exit status 1, naming the failing checks, when one fails.")
@click.option("--generations", type=click.IntRange(0), help="Eval prompts to generate greedily for reading.")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Longest saved generation, in tokens.")
@click.option("--max-seq-len", type=click.IntRange(8), help="Longest scored row in tokens.")
@click.option("--batch-size", type=click.IntRange(1), help="Rows per scoring batch (length-grouped).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default: the recipe's eval.out, else eval/ in the run folder).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-plots", is_flag=True, help="Do not draw the loss curve PNG.")
def eval_command(model, adapter, compare, run_dir, recipe_path, data_dir, suites, builtin_suite, gate_path,
                 generations, max_new_tokens, max_seq_len, batch_size, out, force, no_plots) -> None:
    """Compare candidates (base, base + adapter, exports) on the eval split and regression suites.

    Prints one table (each number's change against the base in parentheses) and writes eval.json,
    report.md, generations.jsonl and suite_items.jsonl to --out. With a gate (--gate, or the recipe's
    eval.gate), exits with status 1 and names the failing checks when one fails.
    """
    from edgetune.eval.run_eval import run_eval

    settings, target = resolve_settings(model, adapter, compare, run_dir, recipe_path, data_dir, suites,
                                        builtin_suite, gate_path, generations, max_new_tokens, max_seq_len,
                                        batch_size, out)
    settings.plots = not no_plots
    info = run_eval(settings, target, force=force, echo=_echo)
    click.echo(str(Path(target) / "eval.json") if info else "")


def resolve_settings(model, adapter, compare, run_dir, recipe_path, data_dir, suites, builtin_suite, gate_path,
                     generations, max_new_tokens, max_seq_len, batch_size, out):
    """EvalSettings and the output folder from the options; an option beats the recipe's (or run's) eval:
    section, which beats the defaults."""
    from edgetune.eval.gate import load_gate
    from edgetune.eval.run_eval import (DEFAULT_MAX_SEQ_LEN, Candidate, EvalSettings, parse_compare,
                                        run_folder_info, unique_name)
    from edgetune.recipe import DataConfig, EvalConfig, load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else None
    cfg = recipe.eval if recipe is not None and recipe.eval is not None else None
    base, data, stage_len = (recipe.model if recipe else None), (recipe.data if recipe else None), None
    run = Path(run_dir) if run_dir else None
    if run is None and recipe is not None and (Path(recipe.output) / "manifest.json").is_file():
        run = Path(recipe.output)
    if run is not None:
        manifest = run_folder_info(run)
        resolved = manifest.get("recipe") or {}
        base = base if recipe is not None else manifest.get("model_path") or resolved.get("model")
        if data is None and resolved.get("data"):
            data = DataConfig(**resolved["data"])
        stage_len = (resolved.get(manifest.get("stage")) or {}).get("max_seq_len")
        stage_len = stage_len if isinstance(stage_len, int) else None  # "auto": planned at training time
        if cfg is None and resolved.get("eval"):
            cfg = eval_config_from_dict(resolved["eval"])
    cfg = cfg or EvalConfig()
    base = model or base
    if not base:
        raise UserError("eval: no base model; give --model MODEL, --run RUN_FOLDER or --recipe RECIPE")
    if data_dir:
        data = DataConfig(dir=data_dir)

    taken = {"base"}
    candidates = [Candidate("base", "base", base)]
    tuned = adapter or (str(run / "adapter") if run is not None else None)
    if tuned is not None:
        t = parse_compare(tuned, base, set(taken))  # accepts an adapter folder or a run folder
        if t.role != "adapter":
            raise UserError(f"--adapter {tuned}: not an adapter folder (adapter_config.json) or a run folder with "
                            "adapter/; pass a model folder with --compare")
        candidates.append(Candidate(unique_name("tuned", taken), "adapter", base, t.adapter))
    candidates += [parse_compare(spec, base, taken) for spec in list(cfg.compare) + list(compare)]

    gate = load_gate(gate_path) if gate_path else cfg.gate
    target = out or cfg.out or (str(run / "eval") if run is not None else None)
    if target is None:
        raise UserError("eval: give --out DIR (where eval.json and report.md go)")
    settings = EvalSettings(
        candidates, data, list(cfg.suites) + list(suites),
        cfg.builtin_suite if builtin_suite is None else builtin_suite,
        cfg.generations if generations is None else generations,
        max_new_tokens or cfg.max_new_tokens,
        max_seq_len or cfg.max_seq_len or stage_len or DEFAULT_MAX_SEQ_LEN,
        batch_size or cfg.batch_size, gate, run)
    return settings, target


def eval_config_from_dict(d: dict):
    """A run manifest's resolved `eval:` section (plain data, paths already absolute) -> EvalConfig."""
    from edgetune.recipe import EvalConfig, GateConfig

    gate = d.get("gate")
    return EvalConfig(**{**d, "gate": GateConfig(**gate) if gate else None})
