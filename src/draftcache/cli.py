"""The ``draftcache`` command: look inside a cache, train a draft from it, export and evaluate.

    draftcache inspect CACHE          manifest summary, shard table, disk use
    draftcache verify CACHE           checksums, schema, shapes, NaN/Inf, coverage (exit 0 = intact)
    draftcache stats CACHE            tokens, supervised fraction, lengths, draft-vocab coverage
    draftcache show CACHE INDEX       one sample decoded, supervised spans marked
    draftcache train --cached-target-path CACHE --output-dir RUN
    draftcache export RUN --output DIR
    draftcache eval --draft DIR

Each command parses its options, calls one library function and prints its result.
"""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(add_completion=False, help="Look inside a draftcache cache, train an EAGLE-3 draft from it, export and evaluate it.", pretty_exceptions_enable=False, no_args_is_help=True)

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, OSError)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache directory written by precompute-eagle3.")) -> None:
    """Manifest summary and shard table, disk use and bytes per token."""
    from draftcache.cache_format.inspection import inspect_cache

    try:
        typer.echo(inspect_cache(cache))
    except _USER_ERRORS as e:
        _fail(str(e))


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache directory to check.")) -> None:
    """Check checksums, schema, shapes and dtypes, NaN/Inf and shard coverage; exit 0 only when intact."""
    from draftcache.cache_format.inspection import verify_cache

    try:
        report = verify_cache(cache)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def stats(cache: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Samples, tokens, supervised fraction, length histogram, draft-vocabulary coverage of target argmax."""
    from draftcache.cache_format.inspection import cache_stats

    try:
        typer.echo(cache_stats(cache))
    except _USER_ERRORS as e:
        _fail(str(e))


@app.command()
def show(
    cache: str = typer.Argument(..., help="Cache directory."),
    index: int = typer.Argument(..., help="Sample index (0-based)."),
) -> None:
    """Decode one sample with the tokenizer recorded in the manifest; supervised spans in [[...]]."""
    from draftcache.cache_format.inspection import show_sample

    try:
        typer.echo(show_sample(cache, index))
    except (_USER_ERRORS + (IndexError,)) as e:
        _fail(str(e))


def main() -> None:
    """Console entry point (Typer handles exit codes and usage errors)."""
    app(prog_name="draftcache")


if __name__ == "__main__":
    main()
