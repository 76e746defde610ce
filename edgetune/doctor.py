"""`edgetune doctor`: the training backends on this machine, their devices and versions, and
which one `backend: auto` picks here, and why."""

from __future__ import annotations

import json
import platform
import sys

import click


def report() -> dict:
    from edgetune.backends import choose_backend, mlx_status, torch_status
    from edgetune.errors import UserError

    backends = {"mlx": mlx_status(), "torch": torch_status()}
    if backends["mlx"]["available"]:
        from edgetune.runtime import blas_info

        backends["mlx"]["blas"] = blas_info()["why"]
    try:
        name, why = choose_backend("auto")
    except UserError as e:
        name, why = None, str(e)
    return {"python": platform.python_version(), "platform": platform.platform(), "backends": backends,
            "auto": {"backend": name, "why": why}}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def doctor(as_json: bool) -> None:
    """Show the training backends available here and which one `backend: auto` chooses."""
    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"python {r['python']} on {r['platform']}")
    for name, b in r["backends"].items():
        if b["available"]:
            extra = f"; {b['blas']}" if b.get("blas") else ""
            click.echo(f"  {name:<6} {b['version']:<14} device {b['device']}{extra}")
        else:
            click.echo(f"  {name:<6} unavailable: {b['why']}")
    auto = r["auto"]
    click.echo(f"backend: auto -> {auto['backend'] or 'none'} ({auto['why']})")
    if auto["backend"] is None:
        sys.exit(1)
