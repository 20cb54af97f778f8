"""Webhooks per Standard Webhooks: checked at submit, written to an outbox when a job
ends, delivered by a CPU process (``vramq webhooks-and-batches``), retried with backoff.

* **Submit** (``spec``). ``webhook = {"url", "events"?}`` needs an account (the signing
  secret is per account, ``signing``). The URL is read by one strict parser
  (``urls.parse_url``) that refuses what two URL parsers could read differently
  (backslashes, ``user:pass@``, control characters, whitespace, percent-encoded or empty
  hosts, ports outside 1-65535, invalid IDNA, trailing dots, numeric shorthands such as
  ``127.1``). It must be http(s) and every address its host resolves to must be public
  (``urls.check_url``): private, loopback, link-local (incl. cloud metadata), shared,
  reserved and multicast targets are refused (422) unless ``VRAMQ_WEBHOOK_ALLOW_HOSTS``
  lists the host or a network holding the address. An IPv6 address that reaches IPv4
  space by translation (IPv4-mapped/-compatible, NAT64, 6to4, Teredo) is judged by its
  IPv4 address too.
* **Outbox** (``outbox``). When a job ends, the transaction that records its end also
  inserts a ``webhook_deliveries`` row (if its ``events`` want that event): nothing a GPU
  worker does waits on a receiver, and a crash between the two cannot lose the event.
* **Delivery** (``deliverer``, ``sender``). ``Deliverer`` claims due rows (one
  conditional UPDATE, so several deliverers share the work), POSTs each from a thread
  pool (a receiver that never answers holds one thread until the timeout, never the
  others), signs with the ``standardwebhooks`` library, does not follow redirects, and
  reads at most ``sender.MAX_RESPONSE_BYTES`` of an answer. The URL is checked again at
  send time, and the request connects to the address that check resolved and judged
  (``sender.post_pinned``), with the URL's ``Host`` and, for https, its SNI and
  certificate name: a later DNS answer (rebinding) or another parser cannot move it.
* **Retries.** A non-2xx answer, a timeout or a refused connection is retried with the
  same ``webhook-id`` after ``deliverer.RETRY_SCHEDULE_S`` (5 s, 30 s, 2 min, 10 min,
  30 min, 1 h, 2 h, 4 h, then 8 h three times: 31.7 h in all), then the delivery is
  ``failed``. Every attempt is a ``webhook_attempts`` row (``GET
  /v1/jobs/{id}/deliveries``, as JSON by ``views``).
"""
