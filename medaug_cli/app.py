"""The ``medaug`` Typer app. Each command lives in its own module and imports ``medaug`` lazily,
inside the command, so that ``medaug --help`` stays fast (no torch, no SimpleITK)."""

from __future__ import annotations

import typer

from medaug_cli import demo, evaluate, phantoms, prepare, synthesize, train

app = typer.Typer(
    name="medaug",
    help="Labelled synthetic CT/MRI slices for segmentation training (MedVAR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("phantoms")(phantoms.phantoms)
app.command("prepare")(prepare.prepare)
app.command("merge")(prepare.merge)
app.command("inspect")(prepare.inspect)
app.add_typer(train.app, name="train")
app.command("synthesize")(synthesize.synthesize)
app.add_typer(evaluate.app, name="evaluate")
app.command("demo")(demo.demo)


def _print_version(value: bool) -> None:
    if value:
        from medaug import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print medaug's version and exit.", is_eager=True, callback=_print_version),
) -> None:
    """medaug: phantoms → prepare → train → synthesize → evaluate."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
