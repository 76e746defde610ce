"""The `edgetune` command line.

Each stage keeps its commands beside its code (`edgetune/<stage>/cli.py` or
`edgetune/<stage>_cli.py`); this module only assembles them and turns
`UserError` into a clean message and exit status 2. Heavy imports (MLX,
transformers) happen inside commands, so `edgetune --help` stays fast.
"""

from __future__ import annotations

import sys

import click

from edgetune import __version__
from edgetune.errors import UserError
from edgetune.eval.gate import GateFailed


class _Group(click.Group):
    """A click group that prints user mistakes without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except GateFailed as e:  # a verdict, not a mistake: the failing checks, and status 1 for CI
            click.echo(str(e), err=True)
            if e.report:
                click.echo(f"report: {e.report}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetune")
def main() -> None:
    """Feedback logs in, an on-device fine-tuned model out."""


def _register() -> None:
    from edgetune.data.cli import data

    main.add_command(data)

    from edgetune.model.cli import model

    main.add_command(model)

    from edgetune.train_cli import demo, dpo, kto, orpo, run, sft

    main.add_command(sft)
    main.add_command(run)
    main.add_command(demo)
    for command in (dpo, kto, orpo):
        main.add_command(command)

    from edgetune.recipe import recipe

    main.add_command(recipe)

    from edgetune.plan_cli import plan

    main.add_command(plan)

    from edgetune.eval.cli import eval_command

    main.add_command(eval_command)

    from edgetune.export.cli import export

    main.add_command(export)

    from edgetune.doctor import doctor

    main.add_command(doctor)


_register()


if __name__ == "__main__":
    main()
