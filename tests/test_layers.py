"""The package layers and what each module may load when imported.

``lint-imports`` checks the contracts in pyproject.toml (``[tool.importlinter]``) on the
source: api > gpu_workers > storage > jobs, storage importing only ``jobs.errors`` of
vramq, the Python client standing alone, no model library in the domain or storage. It
counts imports inside functions too, so the model libraries that gpu_workers imports
lazily are checked here instead: a fresh interpreter imports the module and none of the
heavy libraries may be loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(capsys):
    lint_imports = pytest.importorskip("importlinter.cli", reason="the test extra: import-linter").lint_imports
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, f"lint-imports found broken contracts:\n{capsys.readouterr().out}"


def test_the_stores_implement_the_domains_port(tmp_path):
    from vramq.jobs.ports import ObjectStore
    from vramq.storage import LocalStore, S3Store

    assert isinstance(LocalStore(tmp_path, b"k" * 32), ObjectStore)
    for cls in (LocalStore, S3Store):
        methods = [name for name in vars(ObjectStore) if not name.startswith("_")]
        assert {"put", "get", "delete", "delete_prefix", "signed_url"} <= set(methods)
        missing = [name for name in methods if not callable(getattr(cls, name, None))]
        assert not missing, (cls, missing)


def test_services_without_a_store_factory_say_so(tmp_path):
    from vramq.jobs.errors import ConfigError
    from vramq.jobs.services import Services

    services = Services(settings=None, broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="store_factory"):
        _ = services.store


IMAGE_LIBS = ("torch", "diffusers", "transformers", "PIL")
VIDEO_LIBS = ("torch", "diffusers", "transformers", "av", "numpy")
SPEECH_LIBS = ("faster_whisper", "ctranslate2", "av", "torch", "transformers")
API_LIBS = ("torch", "diffusers", "transformers", "boto3")

#: module -> libraries importing it must not load. Each module's libraries are the union
#: of the sets the older per-file checks asserted for it, named on the right.
IMPORTS_NO = {
    "vramq.gpu_workers.vram": ("torch",),  # test_vram
    "vramq.gpu_workers.backends": tuple(dict.fromkeys(IMAGE_LIBS + VIDEO_LIBS + API_LIBS)),  # image, video, failures
    "vramq.gpu_workers.backends.diffusers_image": IMAGE_LIBS,  # test_backend_image
    "vramq.gpu_workers.tiny": IMAGE_LIBS,  # test_backend_image
    "vramq.gpu_workers.backends.diffusers_video": VIDEO_LIBS,  # test_backend_video
    "vramq.gpu_workers.tiny_video": VIDEO_LIBS,  # test_backend_video
    "vramq.gpu_workers.backends.whisper_speech": SPEECH_LIBS,  # test_backend_speech
    "vramq.gpu_workers.tiny_speech": SPEECH_LIBS,  # test_backend_speech
    "vramq.jobs.audio": SPEECH_LIBS,  # test_backend_speech
    "vramq.jobs.files": SPEECH_LIBS,  # test_backend_speech
    "vramq.storage": ("boto3", "botocore") + API_LIBS,  # test_storage, test_failures
    # vLLM's engine processes re-import the main module (``vramq`` -> ``api.cli``) and
    # trip over Flask's context-bound globals: the command stays free of Flask.
    "vramq.api": API_LIBS + ("flask",),  # test_failures
    "vramq.api.cli": API_LIBS + ("flask",),  # test_failures
    "vramq.api.jobs_api": API_LIBS,  # test_failures
    "vramq.jobs.services": API_LIBS,  # test_failures
    "vramq.gpu_workers.cards": ("torch",),  # test_placement
    "vramq.gpu_workers.placement": ("torch",),  # test_placement
    # Added with the layers: the pure estimator and the API's wiring.
    "vramq.jobs.vram": ("torch", "transformers", "diffusers"),
    "vramq.api.wiring": API_LIBS + ("flask",),
}


@pytest.mark.parametrize("module", IMPORTS_NO)
@pytest.mark.e2e
def test_importing_loads_no_heavy_library(module):
    forbidden = IMPORTS_NO[module]
    code = (
        f"import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"loaded = [m for m in {forbidden!r} if m in sys.modules]\n"
        f"assert not loaded, f'importing {module} loaded {{loaded}}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
