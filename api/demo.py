"""``vramq demo``: start the whole system on embedded defaults, run a bulk render through
it over HTTP with live progress, and end with a summary table and the signed links."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs.settings import Settings

from .client import Client
from .stack import Stack

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto photograph",
    "an isometric pixel-art city block at night",
    "a bowl of ramen, studio food photography",
    "a watercolor map of an imaginary archipelago",
    "a vintage robot reading a newspaper in a cafe",
    "macro shot of a dew drop on a spider web",
    "a desert canyon under the milky way, long exposure",
]


def run_demo(settings: Settings, images: int, port: int, out: Path) -> int:
    console = Console()
    console.print(f"[bold]vramq demo[/bold]: data in {settings.data_dir}, results in {out.resolve()}")
    stack = Stack(settings, port=port, log_dir=settings.data_dir / "logs" / "demo")
    t0 = time.perf_counter()
    with console.status("starting broker, API and a CPU worker (builds the tiny models on first run)…"):
        stack.start()
    console.print(f"up in {time.perf_counter() - t0:.1f}s at {stack.url}; logs in {stack.log_dir}")
    try:
        return _render(console, Client(stack.url), images, out)
    finally:
        with console.status("stopping…"):
            stack.stop()


def _render(console: Console, client: Client, images: int, out: Path) -> int:
    model = next(m for m in client.models() if m["kind"] == "image")
    side = min(256, model["limits"]["max_width"])
    jobs = [
        client.submit(model["id"], {"prompt": PROMPTS[i % len(PROMPTS)], "width": side, "height": side, "steps": 4, "seed": i},
                      metadata={"demo": "bulk-render", "index": i})
        for i in range(images)
    ]
    console.print(f"submitted {len(jobs)} image jobs to {model['id']} ({side}x{side}, 4 steps)")
    finished: dict[str, dict] = {}
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.fields[status]:<10}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {j["id"]: bar.add_task(j["id"], total=1.0, status="queued") for j in jobs}

        def follow(job_id: str) -> dict:
            return client.wait(job_id, poll_s=0.1, on_update=lambda j: bar.update(
                tasks[job_id], completed=j["progress"], status=j["status"]))

        with ThreadPoolExecutor(8) as pool:
            for job in pool.map(follow, list(tasks)):
                finished[job["id"]] = job

    out.mkdir(parents=True, exist_ok=True)
    table = Table(title="vramq demo: results")
    table.add_column("job", no_wrap=True)
    for col in ("kind", "status", "seconds", "gpu s", "batch", "tokens"):
        table.add_column(col)
    links = []
    ok = True
    for job in finished.values():
        seconds = "-"
        if job["finished_at"] and job["created_at"]:
            from datetime import datetime

            seconds = f"{(datetime.fromisoformat(job['finished_at']) - datetime.fromisoformat(job['created_at'])).total_seconds():.2f}"
        usage = job["usage"]
        table.add_row(job["id"], "image", job["status"], seconds, f"{usage['gpu_seconds']:.3f}",
                      str(usage.get("batch_size", "-")), str(usage["tokens_charged"]))
        if job["status"] != "succeeded":
            ok = False
            continue
        for k, img in enumerate(job["output"]["images"]):
            path = out / f"{job['id']}-{k}.png"
            path.write_bytes(client.download(img["url"]))
            links.append((path, img["url"]))
    console.print(table)
    for path, url in links:
        console.print(f"{path}\n  [link={url}]{url}[/link]", soft_wrap=True)
    if links:
        console.print("(signed links are served by the API and expire; the demo's API stops with the demo, "
                      "`vramq up` serves the same data dir)")
    console.print("[green]all jobs succeeded[/green]" if ok else "[red]some jobs did not succeed[/red]")
    return 0 if ok else 1
