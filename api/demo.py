"""``vramq demo``: start the whole system on embedded defaults, run a bulk render through
it over HTTP with live progress, and end with a summary table and the signed links.

The chat and the transcription run on the embedded catalog's real small models
(SmolLM2-135M-Instruct, Whisper tiny.en) when it serves them; the images and the video
come from tiny random-weight pipelines (no real image or video model small enough ships
on the package index), so they are noise, made by the production code paths."""

from __future__ import annotations

import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vramq.jobs.settings import Settings

from .client import TERMINAL, Client
from .stack import Stack

REAL_MODELS = ("smollm2-135m", "whisper-tiny-en")
"""Preferred for the demo's chat and transcription: real weights, real answers."""

QUESTION = "What is the capital of France? Answer in one sentence."

SPOKEN = "The quick brown fox jumps over the lazy dog. Every job waits its turn in the queue."
"""What the demo's speech clip says (spoken by espeak-ng where it is installed)."""

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
    with console.status(
        "starting broker, API and a CPU worker with every model of the catalog resident "
        "(builds them on first run, fetching the real small ones from the package index; "
        "each vLLM engine takes ~30-60 s)…"
    ):
        stack.start()
    console.print(f"up in {time.perf_counter() - t0:.1f}s at {stack.url}; logs in {stack.log_dir}")
    try:
        # A free account of its own: the demo's jobs are metered like anyone's. It is made
        # as the operator makes accounts (`vramq accounts create`, on the database): the
        # public POST /v1/accounts allows VRAMQ_ACCOUNTS_PER_DAY per network, and a fresh
        # account each run keeps repeated demos inside the daily allowance.
        account = _operator_account(stack.settings, "vramq demo")
        console.print(f"account {account['account_id']} (key {account['key_prefix']}…, tier {account['tier']})")
        return _show(console, Client(stack.url, api_key=account["api_key"]), images, out)
    finally:
        with console.status("stopping…"):
            stack.stop()


def _operator_account(settings: Settings, name: str) -> dict:
    """A free account made on the database, as ``POST /v1/accounts`` would answer it."""
    from vramq.jobs.accounts import create_account

    from .wiring import services as wired_services

    with wired_services(settings).sessions.begin() as session:
        account, key = create_account(session, name=name)
        return {"account_id": account.id, "api_key": key, "key_prefix": account.key_prefix, "tier": account.tier}


def _speech_clip() -> tuple[bytes, str | None]:
    """A WAV clip to transcribe (no microphone needed) and what it says: ``SPOKEN`` as
    espeak-ng speaks it where espeak-ng is installed, else three seconds of a synthetic
    voice-like chord, which says nothing (None)."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "speech.wav"
            done = subprocess.run(
                ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SPOKEN], capture_output=True, timeout=60
            )
            if done.returncode == 0 and wav.is_file():
                return wav.read_bytes(), SPOKEN
    return _chord(), None


def _chord() -> bytes:
    """Three seconds of a synthetic voice-like chord, as WAV."""
    import io
    import math
    import struct
    import wave

    rate, seconds = 16000, 3.0
    frames = bytearray()
    for n in range(int(rate * seconds)):
        t = n / rate
        envelope = abs(math.sin(math.pi * t * 3))  # syllable-like swells
        v = sum(math.sin(2 * math.pi * f * t) / (k + 1) for k, f in enumerate((140, 730, 1090, 2440)))
        frames += struct.pack("<h", int(9000 * envelope * v / 2.1))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return buf.getvalue()


def _pick(models: list[dict]) -> dict[str, dict]:
    """One model per kind: a real one (``REAL_MODELS``) where the catalog has it, else its
    first model of the kind that does work (``echo`` only answers with its input)."""
    picked: dict[str, dict] = {}
    for m in models:
        if m["id"] == "echo":
            continue
        if m["kind"] not in picked or (m["id"] in REAL_MODELS and picked[m["kind"]]["id"] not in REAL_MODELS):
            picked[m["kind"]] = m
    return picked


def _submit_all(client: Client, images: int) -> tuple[list[dict], dict | None, str | None]:
    """The demo's jobs: a bulk image render as one batch, then one video, one
    transcription, one chat. Returns the jobs, the batch and what the speech clip says."""
    models = _pick(client.models())
    spoken = None
    jobs, batch = [], None
    if "image" in models:
        m = models["image"]
        side = min(256, m["limits"]["max_width"])
        batch = client.submit_batch(
            [
                {
                    "custom_id": f"image-{i}",
                    "model": m["id"],
                    "metadata": {"index": i},
                    "input": {
                        "prompt": PROMPTS[i % len(PROMPTS)],
                        "width": side,
                        "height": side,
                        "steps": 4,
                        "seed": i,
                    },
                }
                for i in range(images)
            ],
            metadata={"demo": "bulk-render"},
        )
        jobs += list(client.batch_jobs(batch["id"]))
    if "video" in models:
        jobs.append(
            client.submit(
                models["video"]["id"],
                {
                    "prompt": "a paper boat drifting down a rainy street",
                    "width": 128,
                    "height": 128,
                    "num_frames": 17,
                    "fps": 8,
                    "steps": 8,
                },
            )
        )
    if "speech" in models:
        clip, spoken = _speech_clip()
        f = client.upload(clip, "demo-voice.wav", purpose="audio")
        jobs.append(client.submit(models["speech"]["id"], {"audio": f["id"], "task": "transcribe"}))
    if "text" in models:
        jobs.append(
            client.submit(
                models["text"]["id"],
                {
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 48,
                    "temperature": 0.0,
                },
            )
        )
    return jobs, batch, spoken


def _seconds(job: dict) -> str:
    from datetime import datetime

    if not (job["finished_at"] and job["created_at"]):
        return "-"
    return f"{(datetime.fromisoformat(job['finished_at']) - datetime.fromisoformat(job['created_at'])).total_seconds():.2f}"


def _files(job: dict) -> list[tuple[str, str]]:
    """(file name suffix, signed URL) of every downloadable output of a job."""
    out = job["output"] or {}
    if job["kind"] == "image":
        return [(f"-{k}.png", img["url"]) for k, img in enumerate(out["images"])]
    if job["kind"] == "video":
        return [(".mp4", out["video"]["url"])]
    if job["kind"] == "speech":
        return [(".srt", out["files"]["srt"]), (".vtt", out["files"]["vtt"])]
    return []


def _show(console: Console, client: Client, images: int, out: Path) -> int:
    jobs, batch, spoken = _submit_all(client, images)
    console.print(
        f"submitted {len(jobs)} jobs"
        + (f" (the images as batch {batch['id']})" if batch else "")
        + ": "
        + ", ".join(
            f"{sum(j['kind'] == k for j in jobs)} {k}"
            for k in ("image", "video", "speech", "text")
            if any(j["kind"] == k for j in jobs)
        )
    )
    finished: dict[str, dict] = {}
    with Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        TextColumn("{task.fields[status]:<10}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks = {j["id"]: bar.add_task(f"{j['kind']:<6} {j['id']}", total=1.0, status="queued") for j in jobs}

        # One history request a tick follows every job (the account is the demo's own).
        deadline = time.monotonic() + 900
        while len(finished) < len(tasks):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(tasks) - len(finished)} demo jobs still unfinished after 900 s")
            for j in client.history(limit=100)["data"]:
                if j["id"] in tasks:
                    bar.update(tasks[j["id"]], completed=j["progress"], status=j["status"])
                    if j["status"] in TERMINAL:
                        finished[j["id"]] = j
            time.sleep(0.25)
    finished = {job_id: finished[job_id] for job_id in tasks}  # in submit order

    out.mkdir(parents=True, exist_ok=True)
    table = Table(title="vramq demo: results", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("job", "kind", "status", "secs", "gpu s", "batch", "tokens"):
        table.add_column(col, no_wrap=True)
    links, ok = [], True
    for job in finished.values():
        usage = job["usage"]
        tokens = f"{usage['tokens_charged']}/{usage['tokens_reserved']}"  # charged / reserved at submit
        table.add_row(
            job["id"],
            job["kind"],
            job["status"],
            _seconds(job),
            f"{usage['gpu_seconds']:.3f}",
            str(usage.get("batch_size", "-")),
            str(tokens),
        )
        if job["status"] != "succeeded":
            ok = False
            continue
        for suffix, url in _files(job):
            path = out / f"{job['id']}{suffix}"
            path.write_bytes(client.download(url))
            links.append((path, url))
    console.print(table)
    for job in finished.values():
        real = job["model"] in REAL_MODELS
        if job["kind"] == "text" and job["output"]:
            console.print(f"chat ({job['model']}): {QUESTION!r}")
            console.print(f"chat reply ({job['id']}): {job['output']['text']!r}")
            if not real:
                console.print("  (random weights: the reply is noise)")
        if job["kind"] == "speech" and job["output"]:
            console.print(f"spoken ({job['model']}): {spoken!r}" if spoken else "spoken: a synthetic chord (no words)")
            console.print(
                f"transcript ({job['id']}, {job['output']['duration']:.1f} s, {job['output']['language']}): "
                f"{job['output']['text']!r}"
            )
            if not real:
                console.print("  (random weights: the transcript is noise)")
    if any(j["kind"] in ("image", "video") for j in finished.values()):
        console.print(
            "images and video: tiny random-weight pipelines of the real architectures (FLUX-type, Wan 2.1), "
            "so the pictures are noise; the code paths are the production ones"
        )
    for path, url in links:
        console.print(f"{path}\n  [link={url}]{url}[/link]", soft_wrap=True)
    if links:
        console.print(
            "(signed links are served by the API and expire; the demo's API stops with the demo, "
            "`vramq up` serves the same data dir)"
        )
    if batch is not None:  # the dispatcher writes the batch's manifest once its jobs ended
        batch = client.wait_batch(batch["id"], timeout=120)
        manifest = client.batch_results(batch)
        ok = ok and batch["status"] == "completed" and len(manifest) == images
        console.print(
            f"batch {batch['id']}: {batch['status']}, {batch['counts']['succeeded']}/{batch['counts']['total']} "
            f"succeeded; results manifest ({len(manifest)} lines):\n  [link={batch['results_url']}]"
            f"{batch['results_url']}[/link]",
            soft_wrap=True,
        )
    use = client.usage()
    console.print(
        f"tokens: {use['used_today']} of today's {use['daily_allowance']} used "
        f"(resets {use['resets_at']}); balance {use['balance']}"
    )
    console.print("[green]all jobs succeeded[/green]" if ok else "[red]some jobs did not succeed[/red]")
    return 0 if ok else 1
