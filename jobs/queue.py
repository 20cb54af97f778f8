"""The Celery app, one queue per model, and publishing.

Delivery semantics are Celery's: a message is acknowledged after its task ran
(``acks_late``), and put back if the worker process is lost
(``reject_on_worker_lost``). Job state lives in SQL (``jobs.lifecycle``), not in a
Celery result backend, so a redelivered message is harmless: the lease decides.

**A message is a turn, not a job.** Every job that becomes ``queued`` publishes one
message on its model's queue at its priority; the worker that receives it takes the
*fairest* queued job of that model and priority in SQL (``jobs.fairness``), which may be
another account's job than the one whose arrival sent the message. So there are always
at least as many messages as queued jobs, Redis orders the priorities, and SQL orders
the accounts within one. The message names the job (or batch) that sent it, ``hint``:
the worker waits for that row to be committed before it looks, since the API publishes
just before its commit.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu import Producer, Queue

from .priorities import PRIORITIES, Priority

RUN_JOB = "vramq.run_job"
#: Each priority's step in Redis: high 0, normal 3, low 6. Redis serves lower numbers
#: first; within a step messages are FIFO.
PRIORITY: dict[Priority, int] = {p: 3 * rank for rank, p in enumerate(PRIORITIES)}


def queue_name(model_id: str) -> str:
    return f"model.{model_id}"


def make_celery(broker_url: str, visibility_timeout_s: int, model_ids: Iterable[str] = ()) -> Celery:
    """A Celery app for publishing (API) or consuming (worker) vramq jobs."""
    app = Celery("vramq", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": sorted(set(PRIORITY.values())),
            # Publishing must fail fast when Redis is down (the API answers 503);
            # it must not hang a request thread for minutes.
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
            "max_retries": 1,
        },
        broker_pool_limit=32,
        # kombu ships py.typed, but Queue.__init__ has no annotations.
        task_queues=[Queue(queue_name(m)) for m in model_ids],  # type: ignore[no-untyped-call]
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


def publish(app: Celery, hint: str, model_id: str, priority: Priority = "normal", count: int = 1) -> None:
    """Send ``count`` turns for ``model_id`` at ``priority``; raises on broker failure.

    ``hint`` is the job or batch whose arrival they announce. Each message is what
    ``send_task`` would send, built from a template made once per model and priority
    (``send_task`` builds it afresh, about half the cost of a submit's publish). A batch
    sends thousands at once: they share one body and go out through one Redis pipeline
    (kombu's ``Producer.batch``), about ten times faster than one ``send_task`` each.
    """
    headers, properties, rest = _template(app, model_id, priority)
    args = [hint, model_id, priority]
    body = json.dumps([args, *rest])
    options = {
        "routing_key": queue_name(model_id),
        "exchange": "",
        "priority": PRIORITY[priority],
        "retry": False,
        "content_type": "application/json",
        "content_encoding": "utf-8",
    }
    argsrepr = repr(args)

    def send(producer: Producer) -> None:
        task_id = str(uuid.uuid4())
        producer.publish(  # type: ignore[no-untyped-call]  # kombu's Producer.publish has no annotations
            body,
            headers={**headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr},
            **options,
            **{**properties, "correlation_id": task_id},
        )

    with app.producer_or_acquire() as producer:
        if count == 1:
            send(producer)
            return
        with producer.batch(max_size=2000):
            for _ in range(count):
                send(producer)


@functools.lru_cache(maxsize=4096)
def _template(app: Celery, model_id: str, priority: Priority) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """The headers, properties and body (less its args) of a turn's message, as Celery's
    task protocol 2 makes them."""
    template = app.amqp.as_task_v2("template", RUN_JOB, args=["", model_id, priority])
    return dict(template.headers), dict(template.properties), list(template.body[1:])
