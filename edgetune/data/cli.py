"""`edgetune data build | validate | stats`: the command line of the data stage."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edgetune.data import rules
from edgetune.errors import InputError, UserError
from edgetune.fileio import expand_inputs

_FORMAT = click.option("--format", "fmt", type=click.Choice(["v1", "langfuse", "langsmith", "openai"]),
                       default="v1", show_default=True,
                       help="Log format: edgetune's v1, or an observability export converted on read.")


@click.group()
def data() -> None:
    """Turn feedback logs into SFT / DPO / KTO datasets (format: edgetune.feedback/v1)."""


def _invalid(e: InputError, advice: str) -> UserError:
    return UserError(f"{e}\n{len(e.problems):,} invalid record(s); {advice}")


@data.command()
@click.argument("logs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to create with train/ and eval/ {sft,dpo,kto}.jsonl and report.json.")
@click.option("--eval-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of conversations (and comparisons) held out for evaluation.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split and of down-sampling.")
@click.option("--skip-invalid", is_flag=True, help="Leave invalid records out (counted in the report) "
                                                   "instead of stopping with every error.")
@click.option("--correction-prompt", type=click.Choice(rules.CORRECTION_PROMPTS), default=rules.SKIP_MISTAKE,
              show_default=True, help="For a correction chain: skip the mistake and the user's follow-ups, or "
                                      "merge the follow-ups into the original request.")
@click.option("--max-persona-share", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Down-sample train SFT rows so no persona is more than this share of them "
                   "(eval keeps the log's own mix).")
@_FORMAT
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: one per CPU for logs over 32 MiB). Does not change the outputs.")
def build(logs, out, eval_fraction, seed, skip_invalid, correction_prompt, max_persona_share, fmt, force,
          jobs) -> None:
    """Build datasets from feedback LOGS (JSONL files, .gz and globs allowed)."""
    from edgetune.data.build import BuildOptions, build as run_build
    from edgetune.data.report import render_report

    options = BuildOptions(eval_fraction=eval_fraction, seed=seed, skip_invalid=skip_invalid,
                           correction_prompt=correction_prompt, max_persona_share=max_persona_share, format=fmt)
    start = time.perf_counter()
    try:
        report = run_build(expand_inputs(logs), out, options, force=force, jobs=jobs,
                           progress=lambda message: click.echo(message, err=True))
    except InputError as e:
        raise _invalid(e, "nothing was written. Fix them, or pass --skip-invalid to build from the rest.") from None
    click.echo(render_report(report))
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s")


@data.command()
@click.argument("logs", nargs=-1, required=True)
@_FORMAT
def validate(logs, fmt) -> None:
    """Check feedback LOGS against the format without building; exit 2 on any error."""
    from edgetune.data.build import scan_logs

    scan = scan_logs(expand_inputs(logs), fmt)
    c = scan.counts
    unknown = sum(len(v) for cid, v in scan.feedback.items() if cid not in scan.conversations)
    click.echo(f"{c['records']:,} records: {c['conversation']:,} conversations "
               f"({c['superseded_conversations']:,} replaced by a later version), {c['feedback']:,} feedback "
               f"({unknown:,} for a conversation not in the log), {c['comparison']:,} comparisons, "
               f"{c['invalid']:,} invalid")
    if scan.problems:
        raise _invalid(InputError(scan.problems), "`edgetune data build` would stop on them "
                                                  "(or leave them out with --skip-invalid).")


@data.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_name", default=None,
              help="Tokenizer folder or Hugging Face id: adds token-length percentiles (chat template applied).")
def stats(folder, tokenizer_name) -> None:
    """Rows, persona shares and token lengths of a built dataset FOLDER."""
    from edgetune.data.stats import dataset_stats, load_tokenizer, render_stats

    tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name else None
    click.echo(render_stats(dataset_stats(folder, tokenizer)))
