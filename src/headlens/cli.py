"""The ``headlens`` command line: a thin typer layer over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from headlens.errors import HeadlensError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find out what the attention heads of Qwen models do.")

MODEL = typer.Option("qwen2.5-coder-0.5b", "--model", "-m", help="model name, local HF directory, .gguf file or cached hub id")
ADAPTER = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory merged into the model")


def _load(model: str, adapter: Path | None = None):
    from headlens.models import load_model

    typer.echo(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + " ...", err=True)
    return load_model(model, adapter=adapter)


@app.command()
def info(model: str = MODEL, adapter: Path = ADAPTER, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Print layers, q/kv heads, d_head, kv groups, rope base and vocab of a model."""
    from headlens.models import model_info

    facts = model_info(_load(model, adapter))
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        typer.echo(f"{key:>18}: {value}")


@app.callback()
def _root() -> None:
    """Find out what the attention heads of Qwen models do."""


def main() -> None:
    """Entry point: run the app, turning a HeadlensError into one clear line and exit status 1."""
    try:
        app()
    except HeadlensError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
