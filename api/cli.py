"""The ``vramq`` command line. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from jobs import defaults
from jobs.errors import VramqError


def _settings():
    from jobs.settings import Settings

    return Settings.from_env()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """vramq: an asynchronous job queue for GPU generation."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--port", default=defaults.PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--card", "cards", type=int, multiple=True, help="Run a worker on this GPU (repeatable). Default: one CPU worker.")
def up(port: int, host: str, cards: tuple[int, ...]) -> None:
    """Everything on one machine: API, worker(s) and the embedded broker if none is configured."""
    from .stack import Stack

    stack = Stack(_settings(), port=port, host=host, cards=list(cards) or None)
    try:
        stack.start()
        click.echo(f"vramq is up at {stack.url}  (Ctrl-C or SIGTERM stops it)", err=True)
        code = stack.wait()
    finally:
        stack.stop()
    sys.exit(code)


@main.command()
@click.option("--port", default=defaults.PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--workers", default=2, show_default=True, help="gunicorn processes")
@click.option("--threads", default=8, show_default=True, help="threads per process")
def api(port: int, host: str, workers: int, threads: int) -> None:
    """The HTTP API alone, served by gunicorn."""
    from .server import serve

    serve(host, port, workers, threads, _settings())


@main.command()
@click.option("--card", type=int, default=None, help="GPU index to pin (CUDA_VISIBLE_DEVICES).")
@click.option("--cpu", is_flag=True, help="Run on the CPU.")
@click.option("--models", default=None, help="Comma-separated model ids (default: the whole catalog).")
def worker(card: int | None, cpu: bool, models: str | None) -> None:
    """One worker pinned to one card (or the CPU), its models resident."""
    if (card is None) == (not cpu):
        raise click.UsageError("give exactly one of --card N or --cpu")
    from gpu_workers.worker import run_worker

    run_worker(None if cpu else card, models.split(",") if models else None, _settings())


@main.group()
def models() -> None:
    """Model files."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_tiny_cmd(directory: Path) -> None:
    """Build small random-weight models of the real architectures into DIRECTORY."""
    from gpu_workers.tiny import make_tiny

    for name, path in make_tiny(directory).items():
        click.echo(f"{name}: {path}")


def _parse_value(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # a bare word is a string: prompt=hello


@main.command()
@click.argument("model")
@click.argument("params", nargs=-1)
@click.option("--wait", is_flag=True, help="Wait for the result, with a progress bar.")
@click.option("--url", default=f"http://127.0.0.1:{defaults.PORT}", envvar="VRAMQ_URL", show_default=True)
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal")
def submit(model: str, params: tuple[str, ...], wait: bool, url: str, priority: str) -> None:
    """Submit one job: vramq submit tiny-flux prompt="a red fox" width=256 --wait"""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .client import ApiError, Client

    inp = {}
    for p in params:
        if "=" not in p:
            raise click.UsageError(f"parameter {p!r} is not key=value")
        k, v = p.split("=", 1)
        inp[k] = _parse_value(v)
    client = Client(url)
    try:
        job = client.submit(model, inp, priority=priority)
        if wait:
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TimeElapsedColumn(), transient=True) as bar:
                task = bar.add_task(job["id"], total=1.0)
                job = client.wait(job["id"], on_update=lambda j: bar.update(
                    task, completed=j["progress"], description=f"{j['id']} {j['status']}"))
    except ApiError as exc:
        click.echo(json.dumps(exc.problem, indent=2), err=True)
        sys.exit(1)
    click.echo(json.dumps(job, indent=2))
    if wait and job["status"] != "succeeded":
        sys.exit(1)


@main.command()
@click.option("--images", default=8, show_default=True, help="How many image prompts in the bulk render.")
@click.option("--port", default=defaults.PORT + 17, show_default=True)
@click.option("--out", default="vramq-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the downloaded results.")
def demo(images: int, port: int, out: Path) -> None:
    """The main job end to end on embedded defaults: a bulk image render, with progress and signed links."""
    from .demo import run_demo

    sys.exit(run_demo(_settings(), images=images, port=port, out=out))


def run() -> None:
    try:
        main(standalone_mode=True)
    except VramqError as exc:
        click.echo(f"vramq: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
