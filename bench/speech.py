"""Speech-to-text speed: the same audio clips through vramq and through the worker's batched
faster-whisper path called directly.

Run from the repository root::

    .venv/bin/python bench/speech.py [--model tiny-whisper] [--clips 16] [--clip-seconds 10] [--max-batch 4]

What is measured, in one run, on the tiny random-weight Whisper (``make_tiny_whisper``,
CTranslate2, float32 on the CPU), or with ``--model whisper-tiny-en`` on the real Whisper
tiny.en of the embedded catalog (``gpu_workers.small``):

0. **Clips.** N clips of ``--clip-seconds`` of voiced, vowel-like audio
   (``tests.audio.vowels``, one seed per clip: Silero VAD takes it for speech, so every
   clip is transcribed, not skipped), written as 16 kHz mono 16-bit WAV files under the
   work dir. With the real model the clips are English sentences spoken by espeak-ng
   (22.05 kHz, about ``--clip-seconds`` each; a real model given vowels would only
   hallucinate). ``audio_s`` is their total length.

1. **Direct baseline.** The benchmark process loads the model through the worker's own
   backend class (``WhisperSpeechBackend(entry, "cpu").load()``: a ``WhisperModel`` with a
   ``BatchedInferencePipeline``), warms it up with one batch, then calls
   ``backend.run_batch`` on the N clips in batches of the catalog's ``max_batch``, each
   item a ``WorkItem`` with ``attachments={"audio": <WAV bytes>}`` and the validated input
   the vramq job gets (``task`` transcribe; no ``language`` unless ``--language``, so the
   language is detected per clip in both runs). That is exactly the worker's
   computation: decoding, VAD, language detection, the batched encoder/decoder passes
   and the SRT/WebVTT writing. ``direct_s`` is the wall time of those calls. The model
   is then freed so it does not compete with vramq for the (few) cores. The tiny model is
   built in a child process: building imports torch and transformers, and their objects
   would make every ``gc.collect()`` here slower (faster-whisper's ``decode_audio`` runs
   one per file), which a plain faster-whisper script does not pay.

2. **vramq.** Real processes, as in production: ``python -m api.cli api`` (gunicorn) and
   ``python -m api.cli worker --cpu --models bench-whisper`` (Celery threads pool, the
   dynamic batcher), SQLite in a temporary data dir (or ``--database-url``), a Redis
   database (``--redis``; not flushed, only the benchmark's own queue is cleared) and a
   catalog written for the benchmark: model ``bench-whisper``, the tiny-whisper weights,
   ``max_batch`` = ``--max-batch``, ``max_wait_ms`` = ``--max-wait-ms``. The clips are
   uploaded first (``POST /v1/files``, purpose ``audio``; not timed, ``upload_s``
   reports it). After a warm-up batch, the N jobs (``{"audio": "file_…"}``) are POSTed
   as fast as ``--submit-threads`` client threads can, then followed to ``succeeded``
   (only the oldest unfinished job is polled, every ``--poll-ms``; the end comes from
   the server's ``finished_at``, so polling adds load, not error). ``vramq_s`` runs from
   the client's clock just before the first POST to the latest ``finished_at`` (same
   host, same clock); it includes what a job costs around the model: the POST, the
   broker, the worker fetching the audio from the object store, the batcher's gathering
   wait, storing the transcript files and the final UPDATE.

``direct_rtf = direct_s / audio_s`` and ``vramq_rtf = vramq_s / audio_s`` (real-time
factor: below 1 is faster than real time; ``*_speed`` = ``1 / rtf``, times real time).
``ratio = direct_rtf / vramq_rtf`` = ``direct_s / vramq_s``: vramq's share of the direct
throughput (1.0: vramq costs nothing). ``mean_batch_size`` is the mean of the jobs'
``usage.batch_size``; ``model_s`` sums the batcher's ``run_batch`` wall times (from the
jobs' ``usage.gpu_seconds``), so ``pipeline_busy_frac = model_s / vramq_s`` (how much of
the time the worker had a batch running) and ``model_slowdown = model_s / direct_s``
(how much longer the same work took inside the worker); ``ratio = pipeline_busy_frac /
model_slowdown`` when the batches match. The CPU used by each part, and by other
processes on the machine (``other_busy_cores``: a shared machine disturbs the figures
when it is well above zero), is reported under ``cpu``.

Progress lines go to stderr; the last line on stdout is one JSON object with the figures.
No assertion is made on any of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests
from _common import (
    CpuMeter,
    Procs,
    build_model,
    free_port,
    parse_ts,
    tree_cpu_s,
    vramq_env,
    wait_ready,
)

MODEL_ID = "bench-whisper"
"""The catalog id the benchmark serves the model under: a queue (``model.bench-whisper``)
no test and no other benchmark consumes, since the Redis database may be shared."""

MODELS = {
    # --model: (builder module, builder, clips)
    "tiny-whisper": ("vramq.gpu_workers.tiny_speech", "make_tiny_whisper", "vowels"),
    "whisper-tiny-en": ("vramq.gpu_workers.small", "make_whisper_tiny_en", "espeak"),
}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back before noon tomorrow.",
    "The train to the city leaves from platform four at half past nine.",
    "We measured the queue on a small machine with two cores.",
    "Bring a warm coat, the weather will turn cold tonight.",
    "Every job waits its turn, and the workers take them in order.",
    "She read the letter twice and then put it back in the drawer.",
    "Our meeting moved to Thursday afternoon in the large room.",
]


def log(msg: str) -> None:
    print(f"[speech {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- CPU accounting (the machine is small and may be shared) ------------------------


# --- set-up -------------------------------------------------------------------------


def write_catalog(path: Path, weights: Path, max_batch: int, max_wait_ms: int) -> None:
    path.write_text(
        f"""[[models]]
id = "{MODEL_ID}"
kind = "speech"
backend = "faster_whisper"
weights = {json.dumps(str(weights))}
dtype = "float32"
description = "speech benchmark: {weights.name} (CTranslate2)"
max_batch = {max_batch}
max_wait_ms = {max_wait_ms}
limits = {{ max_audio_seconds = 600, max_audio_bytes = 52428800 }}
"""
    )


def make_clips(folder: Path, n: int, seconds: float, kind: str = "vowels", offset: int = 0) -> list[Path]:
    """N WAV clips, kept for reuse: vowel-like speech (``tests.audio.vowels``, seed i), or
    English sentences spoken by espeak-ng (``kind="espeak"``, about ``seconds`` each)."""
    import subprocess

    from tests.audio import vowels, wav_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"clip-{kind}-{seconds:g}s-{i:03d}.wav"
        if not path.is_file():
            part = path.with_suffix(".part")
            if kind == "espeak":
                # espeak-ng at 150 words a minute: 2.5 words a second.
                text, k = [], i + offset
                while sum(len(t.split()) for t in text) < seconds * 2.5:
                    text.append(SENTENCES[k % len(SENTENCES)])
                    k += 1
                cmd = ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(part), " ".join(text)]
                subprocess.run(cmd, check=True, timeout=120)
            else:
                part.write_bytes(wav_bytes(vowels(seconds, seed=i + offset)))
            part.replace(path)
        paths.append(path)
    return paths


def wav_seconds(data: bytes) -> float:
    import io
    import wave

    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def job_input(language: str | None) -> dict:
    """The job input, less the audio reference (added per job)."""
    return {"task": "transcribe", **({"language": language} if language else {})}


# --- direct baseline ----------------------------------------------------------------


def run_direct(catalog_path: Path, clips: list[bytes], warmup: list[bytes], language: str | None) -> dict:
    from vramq.gpu_workers.backends.base import WorkItem
    from vramq.gpu_workers.backends.whisper_speech import WhisperSpeechBackend
    from vramq.jobs.catalog import load_catalog

    entry = load_catalog(catalog_path).get(MODEL_ID)
    backend = WhisperSpeechBackend(entry, "cpu")
    t0 = time.perf_counter()
    backend.load()
    log(f"direct: model loaded in {time.perf_counter() - t0:.2f}s")
    inp = entry.validate_input({"audio": "file_direct", **job_input(language)})

    def items(datas: list[bytes], prefix: str) -> list:
        return [
            WorkItem(job_id=f"{prefix}-{i}", input=dict(inp), attachments={"audio": d}) for i, d in enumerate(datas)
        ]

    def batches(work: list) -> list[list]:
        return [work[b : b + entry.max_batch] for b in range(0, len(work), entry.max_batch)]

    for batch in batches(items(warmup, "warmup")):
        backend.run_batch(batch)
    work = items(clips, "direct")
    meter = CpuMeter({"bench": lambda: tree_cpu_s(os.getpid())})
    a = meter.sample()
    per_batch, results = [], []
    t0 = time.perf_counter()
    for batch in batches(work):
        t1 = time.perf_counter()
        results += backend.run_batch(batch)
        per_batch.append(time.perf_counter() - t1)
    direct_s = time.perf_counter() - t0
    cpu = CpuMeter.delta(a, meter.sample())
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"direct: {len(failed)} clips failed, e.g. {failed[0]!r}")
    segments = sum(len(r.output["segments"]) for r in results)
    backend.unload()
    del backend
    gc.collect()
    return {"direct_s": direct_s, "per_batch_s": per_batch, "segments": segments, "cpu": cpu}


# --- the vramq processes ------------------------------------------------------------


class Api:
    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self.ids: list[str] = []
        """Every job submitted (their event streams are deleted at the end)."""

    @property
    def http(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
        return s

    def submit(self, inp: dict) -> dict:
        r = self.http.post(self.url + "/v1/jobs", json={"model": MODEL_ID, "input": inp}, timeout=60)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def get(self, job_id: str) -> dict:
        r = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=60)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, poll_s: float, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in ("succeeded", "failed", "canceled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)

    def upload(self, data: bytes, filename: str) -> str:
        r = self.http.post(
            self.url + "/v1/files", files={"file": (filename, data, "audio/wav")}, data={"purpose": "audio"}, timeout=60
        )
        if r.status_code not in (200, 201):
            raise RuntimeError(f"upload answered {r.status_code}: {r.text[:500]}")
        return r.json()["id"]


def run_vramq(api: Api, inputs: list[dict], threads: int, poll_s: float) -> dict:
    submitted: list[tuple[float, str] | None] = [None] * len(inputs)

    def one(i: int) -> None:
        t = time.time()
        submitted[i] = (t, api.submit(inputs[i])["id"])
        api.ids.append(submitted[i][1])

    t_first = time.time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(inputs))))
    t_submitted = time.time()
    order = sorted(range(len(inputs)), key=lambda i: submitted[i][0])
    jobs = [api.wait(submitted[i][1], poll_s) for i in order]
    return {"t_first": t_first, "submit_s": t_submitted - t_first, "jobs": jobs}


def forget_events(broker, job_ids: list[str]) -> None:
    """Delete the benchmark's job event streams (they would otherwise stay a day in a
    Redis database the benchmark does not flush)."""
    from vramq.jobs.events import key

    try:
        for k in range(0, len(job_ids), 500):
            broker.delete(*(key(j) for j in job_ids[k : k + 500]))
    except Exception as exc:
        log(f"could not delete the jobs' event streams: {exc}")


# --- main ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny-whisper", help="the model served")
    ap.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="build (or find built) the model here, e.g. a VRAMQ_MODELS_DIR (default: the work dir)",
    )
    ap.add_argument("--clips", type=int, default=16, help="clips (jobs) in the measured run")
    ap.add_argument("--clip-seconds", type=float, default=10.0, help="length of each clip")
    ap.add_argument("--max-batch", type=int, default=4, help="the catalog's max_batch (jobs per run_batch call)")
    ap.add_argument("--max-wait-ms", type=int, default=50, help="the catalog's batcher max_wait_ms")
    ap.add_argument("--language", default=None, help="the jobs' language (default: none, detected per clip)")
    ap.add_argument("--submit-threads", type=int, default=8, help="client threads POSTing the jobs")
    ap.add_argument("--poll-ms", type=float, default=100, help="poll interval while waiting for the jobs")
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="broker URL (not flushed; the tests take databases 1-13, overhead.py 14, submit_rate.py 15)",
    )
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in the work dir; e.g. postgresql://postgres@127.0.0.1:5432/bench (an empty database)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the model, clips, data and logs here (default: a temp dir, removed)",
    )
    ap.add_argument("--skip-direct", action="store_true", help="vramq only (no ratio)")
    args = ap.parse_args()

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vramq-speech-bench-")) if own_tmp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    procs = api = broker = None
    try:
        t0 = time.perf_counter()
        module, builder, kind = MODELS[args.model]
        models_dir = args.models_dir.resolve() if args.models_dir else work / "models"
        weights = build_model(module, builder, models_dir / args.model)
        log(f"{args.model} ready in {time.perf_counter() - t0:.1f}s at {weights}")
        catalog = work / "bench-catalog.toml"
        write_catalog(catalog, weights, args.max_batch, args.max_wait_ms)
        t0 = time.perf_counter()
        paths = make_clips(work / "clips", args.clips, args.clip_seconds, kind)
        # The warm-up clips are other seeds, so no run sees a clip twice.
        warm_paths = make_clips(work / "clips-warmup", args.max_batch, args.clip_seconds, kind, offset=args.clips)
        clips = [p.read_bytes() for p in paths]
        warmup = [p.read_bytes() for p in warm_paths]
        audio_s = sum(wav_seconds(c) for c in clips)
        log(
            f"{len(clips)} clips ({audio_s:.1f}s of audio) ready in {time.perf_counter() - t0:.1f}s under {paths[0].parent}"
        )

        cpu: dict[str, dict] = {}
        load_before = os.getloadavg()[0]
        direct = None
        if not args.skip_direct:
            direct = run_direct(catalog, clips, warmup, args.language)
            cpu["direct"] = direct["cpu"]
            log(
                f"direct: {len(clips)} clips in {direct['direct_s']:.3f}s (RTF {direct['direct_s'] / audio_s:.4f}, "
                f"{audio_s / direct['direct_s']:.1f}x real time), {direct['segments']} segments, batches (s): "
                f"{', '.join(f'{t:.3f}' for t in direct['per_batch_s'])}"
            )

        import redis

        broker = redis.Redis.from_url(args.redis)
        # Not flushed: the database may be shared. Only our model's queues (left over
        # from an interrupted run) are cleared.
        for key in broker.scan_iter(f"model.{MODEL_ID}*"):
            broker.delete(key)
        redis_pid = broker.info("server").get("process_id")
        data = work / "data"
        if data.exists():
            shutil.rmtree(data)
        env = vramq_env(data, work / "models", catalog, args.redis, args.database_url)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        procs = Procs(env, logs, log)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        api_proc = procs.spawn("api", ["api", "--port", str(port), "--workers", str(args.api_workers)])
        wait_ready(url, procs, None)  # the API migrates the database before the worker starts
        worker = procs.spawn("worker", ["worker", "--cpu", "--models", MODEL_ID])
        wait_ready(url, procs, worker.pid)
        log(f"vramq ready in {time.perf_counter() - t0:.1f}s at {url} (logs in {logs})")
        api = Api(url)

        t0 = time.perf_counter()
        file_ids = [api.upload(c, p.name) for c, p in zip(clips, paths, strict=True)]
        warm_ids = [api.upload(c, p.name) for c, p in zip(warmup, warm_paths, strict=True)]
        upload_s = time.perf_counter() - t0
        log(f"vramq: {len(file_ids) + len(warm_ids)} clips uploaded in {upload_s:.2f}s")
        parts = {
            "bench": time.process_time,
            "api": lambda: tree_cpu_s(api_proc.pid),
            "worker": lambda: tree_cpu_s(worker.pid),
        }
        if redis_pid:
            parts["redis"] = lambda: tree_cpu_s(redis_pid)
        meter = CpuMeter(parts)

        with ThreadPoolExecutor(max(1, len(warm_ids))) as pool:
            ids = list(pool.map(lambda f: api.submit({"audio": f, **job_input(args.language)})["id"], warm_ids))
        api.ids += ids
        for jid in ids:
            api.wait(jid, 0.05)
        log("vramq: warmed up")

        inputs = [{"audio": f, **job_input(args.language)} for f in file_ids]
        a = meter.sample()
        run = run_vramq(api, inputs, args.submit_threads, args.poll_ms / 1000)
        cpu["vramq"] = CpuMeter.delta(a, meter.sample())
        jobs = run["jobs"]
        t_first = run["t_first"]
        vramq_s = max(parse_ts(j["finished_at"]) for j in jobs) - t_first
        batch_sizes = [j["usage"]["batch_size"] for j in jobs]
        model_s = sum(j["usage"]["gpu_seconds"] for j in jobs)  # each run_batch's wall time, split among its jobs
        segments = sum(len(j["output"]["segments"]) for j in jobs)
        # Each run_batch call once: its jobs share one finished batch (same gpu_seconds share).
        by_run: dict[float, float] = {}
        for j in jobs:
            wall = round(j["usage"]["gpu_seconds"] * j["usage"]["batch_size"], 4)
            by_run[wall] = min(by_run.get(wall, float("inf")), parse_ts(j["finished_at"]))
        runs = sorted(by_run.items(), key=lambda r: r[1])  # (run_batch wall time, first finish), in order
        log(
            f"vramq: {len(jobs)} jobs submitted in {run['submit_s']:.3f}s, all done in {vramq_s:.3f}s "
            f"(RTF {vramq_s / audio_s:.4f}), mean batch {statistics.fmean(batch_sizes):.2f}, "
            f"run_batch time {model_s:.3f}s, {segments} segments, batches (s): "
            f"{', '.join(f'{r[0]:.3f}' for r in runs)}"
        )

        leftover = procs.stop()
        procs = None
        log(f"vramq processes stopped; processes of their sessions left: {len(leftover)}")

        direct_rtf = direct["direct_s"] / audio_s if direct else None
        vramq_rtf = vramq_s / audio_s
        result = {
            "model": args.model,
            "vramq_rtf": round(vramq_rtf, 5),
            "direct_rtf": round(direct_rtf, 5) if direct else None,
            "ratio": round(direct_rtf / vramq_rtf, 4) if direct else None,
            "clips": len(clips),
            "clip_seconds": args.clip_seconds,
            "max_batch": args.max_batch,
            "vramq_s": round(vramq_s, 4),
            "direct_s": round(direct["direct_s"], 4) if direct else None,
            "audio_s": round(audio_s, 3),
            "vramq_speed": round(1 / vramq_rtf, 2),
            "direct_speed": round(1 / direct_rtf, 2) if direct else None,
            "max_wait_ms": args.max_wait_ms,
            "language": args.language,
            "database": "postgres" if args.database_url and args.database_url.startswith("postgres") else "sqlite",
            "mean_batch_size": round(statistics.fmean(batch_sizes), 3),
            "model_s": round(model_s, 4),
            "pipeline_busy_frac": round(model_s / vramq_s, 4),
            "model_slowdown": round(model_s / direct["direct_s"], 4) if direct else None,
            "direct_batch_s": [round(t, 4) for t in direct["per_batch_s"]] if direct else None,
            "vramq_batch_s": [r[0] for r in runs],
            "segments_vramq": segments,
            "segments_direct": direct["segments"] if direct else None,
            "submit_s": round(run["submit_s"], 4),
            "upload_s": round(upload_s, 4),
            "leftover_processes": len(leftover),
            "load_avg_1m_before": round(load_before, 2),
            "cpu": cpu,
        }
        for phase, c in cpu.items():
            if c["other_busy_cores"] > 0.25:
                log(
                    f"WARNING: other processes kept {c['other_busy_cores']} cores busy during the {phase} phase; "
                    "its figures are disturbed"
                )
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if procs is not None:
            left = procs.stop()
            log(f"vramq processes stopped (processes of their sessions left: {len(left)})")
        if broker is not None and api is not None and api.ids:
            forget_events(broker, api.ids)
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
