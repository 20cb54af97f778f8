"""Batches: many jobs submitted, followed, canceled and collected as one.

* **Accept** (``parsing``, ``creation``). ``POST /v1/batches`` takes ``{"jobs": [line,
  …]}`` or ``{"input_file": "file_…"}`` (JSONL, one line per job) of up to ``MAX_JOBS``
  lines; a line is ``{"custom_id", "model", "input", "metadata"?}``. Every line is
  checked as a single job would be; any bad line rejects the whole batch (422), listing
  each bad line's number, field and reason. A good batch is one transaction: the batch
  row, every job row, each job's token reservation (one wallet lock) and its messages,
  all or nothing.
* **Run.** Jobs run like single jobs, at the batch's priority (``low`` unless asked
  otherwise), and share the GPUs with other accounts' jobs fairly (jobs.fairness).
* **Follow** (``views``). Counts by status and usage come from the batch's jobs.
* **Finish** (``finisher``, ``manifest``). When no job of the batch is queued or running,
  ``finisher.finalize`` (run by the ``vramq webhooks-and-batches`` dispatcher) writes
  the results manifest to the object store, ``batches/<id>/results.jsonl``: one line per
  job in submission order, ``custom_id``, ``job_id``, ``status``, ``output`` (signed
  links) and ``error``. Then the batch is ``completed`` (or stays ``canceled``) and
  ``batch.completed`` is sent.
* **Cancel** (``cancellation``). Queued jobs are canceled and refunded in bulk; running
  ones are canceled (their workers stop between steps) and charged their minimum, like
  a single cancel.
"""
