"""`edgetune plan RECIPE`: the memory each training stage of a recipe will need, by part."""

from __future__ import annotations

import json

import click

STAGES = ("sft", "dpo", "kto", "orpo")


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set sft.batch_size=auto (repeatable).")
@click.option("--stage", type=click.Choice(STAGES), default=None,
              help="Plan this stage only (default: every stage the recipe configures).")
@click.option("--mac", "mac_gb", type=click.IntRange(min=1), default=None, metavar="GB",
              help="Plan for a Mac with this much RAM (Metal working set, stored dtype) instead of this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (exit status 0 whether it fits or not).")
def plan(recipe_path: str, overrides: tuple[str, ...], stage: str | None, mac_gb: int | None, as_json: bool) -> None:
    """Predict the peak memory of each training stage (weights, LoRA and optimizer state,
    activations, logits, ...) against what the device offers, and resolve `auto` values.
    Nothing is loaded but the model's config.json. Exit status 2 when a stage does not fit."""
    from edgetune.errors import UserError
    from edgetune.plan import GB, device_budget, mac_tier_budget, model_config, plan_recipe, refusal, render
    from edgetune.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    stages = [stage] if stage else [s for s in STAGES if getattr(recipe, s) is not None]
    if not stages:
        raise UserError(f"{recipe_path}: configures no training stage (sft:, dpo:, kto:, orpo:); nothing to plan")
    if stage and getattr(recipe, stage) is None:
        raise UserError(f"{recipe_path}: has no `{stage}:` section to plan")
    budget = mac_tier_budget(mac_gb) if mac_gb else device_budget(recipe.backend)
    config, where = model_config(recipe)
    plans = {s: plan_recipe(recipe, s, budget, config, where) for s in stages}
    if as_json:
        click.echo(json.dumps({"model": recipe.model, "config": where,
                               "stages": {s: p.to_json() for s, p in plans.items()}}, indent=2))
        return
    click.echo("\n\n".join(render(p, recipe.model) for p in plans.values()))
    too_big = [s for s, p in plans.items() if not p.fits]
    if too_big:
        raise UserError("\n".join(refusal(s, plans[s]) for s in too_big))
    click.echo(f"\nEvery planned stage fits in {budget.bytes / GB:.2f} GB ({budget.source}).")
