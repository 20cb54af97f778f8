"""The echo model, in process: a text model that does no work (it measures the queue).

It needs no weights folder and no memory, counts tokens with a cheap rule (words) at
admission and in its output, and answers with the prompt or the last user message in the
shape of any text job's output. Its run through the real worker runtime is here too; the
same through a real API and worker is in test_e2e_kinds.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import settings_env
from tests.fixtures.services import services_for
from vramq.gpu_workers.backends import WorkItem, backend_class
from vramq.gpu_workers.backends.echo import EchoBackend, cut
from vramq.gpu_workers.cards import Card
from vramq.gpu_workers.runtime import WorkerRuntime
from vramq.gpu_workers.supervisor import plan_catalog
from vramq.jobs import pricing
from vramq.jobs.accounts import Caller
from vramq.jobs.catalog import TINY_CATALOG, Catalog, load_catalog
from vramq.jobs.errors import ConfigError, InputError, JobCanceled
from vramq.jobs.prompts import check_context, echo_prompt_tokens, echo_tokens
from vramq.jobs.schema import Job
from vramq.jobs.settings import Settings
from vramq.jobs.submit import submit_job
from vramq.jobs.vram import estimate_entry


@pytest.fixture(scope="module")
def entry():
    # No models were built under this folder: the echo model needs none.
    return load_catalog(TINY_CATALOG, models_dir=Path("/nonexistent-models")).get("echo")


def run(entry, inp: dict, **kw):
    deltas: list[str] = []
    item = WorkItem(job_id="job_x", input=entry.validate_input(inp), on_delta=deltas.append, **kw)
    return backend_class(entry)(entry, "cpu").run_one(item), deltas


# --- the catalog entry: no weights, no memory ------------------------------------------------


def test_the_tiny_catalog_has_echo_without_weights(entry):
    assert entry.kind == "text" and entry.backend == "echo" and entry.weights is None
    assert "no work" in entry.description and "queue" in entry.description
    assert backend_class(entry) is EchoBackend and EchoBackend.batching == "engine"


def test_echo_needs_zero_bytes_and_is_placed_anywhere(entry):
    from vramq.gpu_workers import vram

    assert estimate_entry(entry).total_bytes == 0 and vram.estimate_entry(entry).total_bytes == 0
    assert pricing.vram_need_bytes(entry) == 0
    assert pricing.rate_for(entry) == entry.price.tokens_per_gpu_second
    plan = plan_catalog(Catalog([entry]), [Card(0, "card0", 10**9, model="declared")])
    assert [(m.id, m.vram_bytes, m.resident) for m in plan.cards[0].models] == [("echo", 0, True)]
    assert not plan.unplaced


@pytest.mark.parametrize(
    "text, needle",
    [
        ('backend = "echo"\nweights = "w"', "loads no weights"),
        ('backend = "vllm"', "needs weights"),
    ],
)
def test_weights_are_left_out_for_echo_and_only_for_echo(tmp_path, text, needle):
    path = tmp_path / "catalog.toml"
    path.write_text(f'[[models]]\nid = "m"\nkind = "text"\n{text}\n')
    with pytest.raises(ConfigError, match=needle):
        load_catalog(path)


# --- tokens: words, at admission and in the output ---------------------------------------------


def test_tokens_are_words():
    assert echo_tokens("") == 0 and echo_tokens("  one\ttwo\n three  ") == 3
    assert echo_prompt_tokens({"prompt": "a b c"}) == 3
    assert (
        echo_prompt_tokens(
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there you"}]}
        )
        == 5
    )


def test_admission_counts_words_against_max_context(entry):
    limit = entry.limit.max_context
    fits = entry.validate_input({"prompt": " ".join(["w"] * (limit - 64)), "max_tokens": 64})
    assert check_context(entry, fits) == limit - 64
    over = entry.validate_input({"prompt": " ".join(["w"] * (limit - 63)), "max_tokens": 64})
    with pytest.raises(InputError) as err:
        check_context(entry, over)
    assert err.value.code == "context_length_exceeded" and "echo" in str(err.value)


# --- the backend -------------------------------------------------------------------------------


def test_a_prompt_comes_back_with_its_usage(entry):
    result, deltas = run(entry, {"prompt": "Once upon  a time"})
    assert result.output == {
        "text": "Once upon  a time",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 4},
    }
    assert deltas == ["Once upon  a time"] and result.artifacts == [] and result.gpu_seconds is None


def test_messages_echo_the_last_user_message(entry):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second  one"},
    ]
    result, _ = run(entry, {"messages": messages})
    assert result.output["text"] == "second  one"
    assert result.output["usage"] == {"prompt_tokens": 8, "completion_tokens": 2}
    result, _ = run(entry, {"messages": [{"role": "system", "content": "only a system turn"}]})
    assert result.output["text"] == "only a system turn"


def test_max_tokens_cuts_the_text_after_that_many_words(entry):
    result, deltas = run(entry, {"prompt": "one two\tthree four five", "max_tokens": 3})
    assert result.output["text"] == "one two\tthree" and deltas == ["one two\tthree"]
    assert result.output["finish_reason"] == "length" and result.output["usage"]["completion_tokens"] == 3
    assert cut("a b", 2) == ("a b", 2, "stop") and cut(" a b c ", 1) == (" a", 1, "length")


def test_a_canceled_job_is_not_run(entry):
    backend = EchoBackend(entry, "cpu")
    item = WorkItem(job_id="j", input=entry.validate_input({"prompt": "x"}), is_canceled=lambda: True)
    with pytest.raises(JobCanceled):
        backend.run_one(item)
    [result] = backend.run_batch([item])
    assert isinstance(result, JobCanceled)


# --- through the real worker runtime ----------------------------------------------------------


class _Served:
    def get(self) -> set[str]:
        return {"echo"}


def test_an_echo_job_runs_through_the_runtime_to_succeeded(tmp_path, redis_url):
    env = settings_env(tmp_path, redis_url=redis_url, models_dir=tmp_path / "no-models")
    services = services_for(Settings.from_env(env))
    services.served = _Served()  # admitted whatever heartbeats Redis holds
    caller = Caller.anonymous("198.51.100.9")
    job, created = submit_job(
        services, {"model": "echo", "input": {"prompt": "hello queue", "max_tokens": 8}}, caller=caller
    )
    assert created and job.work_units == 2 + 8  # prompt words + max_tokens
    rt = WorkerRuntime(
        services, name=f"test-echo-{uuid.uuid4().hex[:8]}", device="cpu", model_ids=["echo"], need_bytes={"echo": 0}
    )
    try:
        rt.load()
        assert rt.concurrency == services.catalog.get("echo").max_batch
        rt.execute(job.id, "echo", "normal")
    finally:
        rt.stop()
    with services.sessions() as s:
        done = s.get(Job, job.id)
    assert done.status == "succeeded", (done.error_code, done.error_message)
    assert done.output == {
        "text": "hello queue",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2},
    }
    assert done.gpu_seconds < 0.05 and done.tokens_charged == 1  # the model's min_tokens
    assert services.store.list(f"jobs/{job.id}/") == []
