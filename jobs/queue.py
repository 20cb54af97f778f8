"""The Celery app, one queue per model, and publishing.

Delivery semantics are Celery's: a message is acknowledged after its task ran
(``acks_late``), and put back if the worker process is lost
(``reject_on_worker_lost``). Job state lives in SQL (``jobs.lifecycle``), not in a
Celery result backend, so a redelivered message is harmless: the lease decides.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

RUN_JOB = "vramq.run_job"
#: Redis serves lower numbers first. Within a level messages are FIFO.
PRIORITY = {"high": 0, "normal": 3, "low": 6}


def queue_name(model_id: str) -> str:
    return f"model.{model_id}"


def make_celery(broker_url: str, visibility_timeout_s: int, model_ids: list[str] = ()) -> Celery:
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
        task_queues=[Queue(queue_name(m)) for m in model_ids],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


def publish(app: Celery, job_id: str, model_id: str, priority: str = "normal") -> None:
    """Send the message that makes a worker run the job; raises on broker failure."""
    app.send_task(
        RUN_JOB,
        args=[job_id],
        queue=queue_name(model_id),
        priority=PRIORITY[priority],
        retry=False,
    )
