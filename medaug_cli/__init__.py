"""The ``medaug`` command line: a thin Typer shell over ``medaug`` library functions."""
