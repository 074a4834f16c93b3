"""Rich rendering shared by the commands: one console, error lines, summary tables, JSON output."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
error_console = Console(stderr=True)


def print_error(message: str) -> None:
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    result = Table(title=title)
    for column in columns:
        result.add_column(column)
    for row in rows:
        result.add_row(*[str(value) for value in row])
    return result
