"""`edgetune sft`, `dpo`, `kto`, `orpo` (one training stage from a recipe), `run` (all of them) and `demo`."""

from __future__ import annotations

import click


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set sft.steps=20 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in the run folder.")
@click.option("--force", is_flag=True, help="Delete an existing run folder and start over.")
def sft(recipe_path: str, overrides: tuple[str, ...], resume: bool, force: bool) -> None:
    """LoRA supervised fine-tuning on MLX, as the recipe's `sft:` section says."""
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft

    recipe = load_recipe(recipe_path, list(overrides))
    run_sft(recipe, resume=resume, force=force, echo=_echo)


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="edgetune-demo", show_default=True,
              help="Folder for the demo's data, model and runs.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def demo(out: str, force: bool) -> None:
    """Run the pipeline offline on a tiny model and the sample feedback log shipped with edgetune."""
    from pathlib import Path

    from edgetune.demo import run_demo

    run_demo(Path(out), force=force, echo=_echo)


def _preference_command(stage: str, doc: str):
    """`edgetune dpo|kto|orpo RECIPE`: the same options as `sft`, one stage each."""

    @click.command(name=stage, help=doc)
    @click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help=f"Override a recipe value, e.g. --set {stage}.beta=0.2 (repeatable).")
    @click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in the run folder.")
    @click.option("--force", is_flag=True, help="Delete an existing run folder and start over.")
    def command(recipe_path: str, overrides: tuple[str, ...], resume: bool, force: bool) -> None:
        from edgetune.preference import run_preference
        from edgetune.recipe import load_recipe

        recipe = load_recipe(recipe_path, list(overrides))
        run_preference(recipe, stage, resume=resume, force=force, echo=_echo)

    return command


dpo = _preference_command("dpo", "DPO on preference pairs with LoRA on MLX, as the recipe's `dpo:` section says. "
                                 "Reference log-probs are computed once before training, not by a second model.")
kto = _preference_command("kto", "KTO on unpaired thumbs up/down with LoRA on MLX, as the recipe's `kto:` "
                                 "section says.")
orpo = _preference_command("orpo", "ORPO (SFT + odds-ratio preference term, no reference) with LoRA on MLX, "
                                   "as the recipe's `orpo:` section says.")


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set sft.steps=20 (repeatable).")
def run(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Every stage the recipe configures (data build, SFT, DPO/KTO/ORPO, eval gate, export), in one run
    folder. Re-running skips finished stages whose inputs did not change and resumes an interrupted one."""
    from edgetune.pipeline import run_pipeline
    from edgetune.recipe import load_recipe

    run_pipeline(load_recipe(recipe_path, list(overrides)), echo=_echo)
