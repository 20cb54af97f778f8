"""Named defaults, in one place. Each can be overridden by the ``VRAMQ_*`` setting named."""

#: VRAMQ_DATA_DIR: where the embedded defaults keep their files (database, Redis, objects, models).
DATA_DIR = "~/.vramq"
#: VRAMQ_LINK_TTL: seconds a signed download link stays valid.
LINK_TTL_S = 3600
#: VRAMQ_RETENTION_HOURS: unsaved outputs are deleted after this many hours.
RETENTION_HOURS = 24
#: VRAMQ_MAX_BODY_KB: request bodies past this size are refused with 413.
MAX_BODY_KB = 256
#: VRAMQ_MAX_UPLOAD_MB: uploaded files past this size are refused with 413.
MAX_UPLOAD_MB = 100
#: VRAMQ_LEASE_SECONDS: a running job's lease; the worker renews it every third of it.
#: A job whose lease lapses (its worker died) is queued again.
LEASE_S = 30
#: VRAMQ_VISIBILITY_TIMEOUT: seconds before Redis redelivers an unacknowledged message.
#: It must exceed the longest job, or a long job would be delivered twice (the lease
#: still stops it running twice, but the duplicate costs a worker slot).
VISIBILITY_TIMEOUT_S = 6 * 3600
#: VRAMQ_IDEMPOTENCY_HOURS: how long an Idempotency-Key is remembered.
IDEMPOTENCY_HOURS = 24
#: VRAMQ_MAX_ATTEMPTS: a job whose worker died (its lease lapsed) this many times ends
#: ``failed`` with code ``worker_lost`` instead of being queued again: a job that crashes
#: its worker (a native fault, a CUDA error) must not kill workers forever.
MAX_ATTEMPTS = 3
#: VRAMQ_SPOOL_SECONDS: how long a worker keeps retrying outputs the store refused
#: (spooled on its disk) before the job fails ``storage_unavailable``.
SPOOL_S = 3600
#: VRAMQ_SPOOL_MAX_MB: the most a worker spools on its disk while the store is down.
SPOOL_MAX_MB = 10 * 1024
#: VRAMQ_STOP_GRACE (``--stop-grace``): seconds a stopping worker gives its running jobs
#: before it hands them back and exits.
STOP_GRACE_S = 300
#: How often a worker writes progress, renews leases and looks for cancellations.
REPORT_INTERVAL_S = 0.25
#: How long a worker waits for a job row that its message announced but that is not
#: visible yet (the API commits right after publishing).
MISSING_JOB_GRACE_S = 5.0
#: Port of ``vramq up`` and ``vramq api``.
PORT = 8000
#: VRAMQ_ANONYMOUS_DAILY_TOKENS: tokens a day for callers without a key (per client address).
ANONYMOUS_DAILY_TOKENS = 2_500
#: VRAMQ_FREE_DAILY_TOKENS: tokens a day for a free account.
FREE_DAILY_TOKENS = 5_000
#: VRAMQ_RATE_LIMIT_ANONYMOUS: requests a minute from one client address without a key.
RATE_LIMIT_ANONYMOUS = 120
#: VRAMQ_RATE_LIMIT_KEYED: requests a minute with one API key.
RATE_LIMIT_KEYED = 1_200
#: VRAMQ_SWEEP_SECONDS: how often the retention sweeper looks for expired outputs.
SWEEP_S = 60
#: VRAMQ_UPLOAD_RETENTION_HOURS: uploaded files are deleted this many hours after upload
#: (never while a queued or running job, or an unfinished batch, still refers to them).
UPLOAD_RETENTION_HOURS = 24
#: VRAMQ_MAX_BATCH_BODY_MB: the largest ``POST /v1/batches`` body (and ``purpose=batch``
#: upload) from a caller with an API key; callers without one get VRAMQ_MAX_BODY_KB.
MAX_BATCH_BODY_MB = 16
#: VRAMQ_ANONYMOUS_BATCH_JOBS: the most jobs in one batch from a caller without an API key.
ANONYMOUS_BATCH_JOBS = 100
#: VRAMQ_ACCOUNTS_PER_DAY: accounts ``POST /v1/accounts`` makes per network (an IPv4
#: address, an IPv6 /64) per day; 0 turns the limit off.
ACCOUNTS_PER_DAY = 3
#: VRAMQ_ALLOWED_HOSTS: the Host headers the API answers to (links are built from them),
#: besides the host of VRAMQ_PUBLIC_URL and the address ``vramq api --host`` binds.
ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
#: VRAMQ_MAX_STREAMS_PER_CALLER: event streams (``…/events``) one caller (an API key, an
#: anonymous network) may hold open at once, per API process; past it 429.
MAX_STREAMS_PER_CALLER = 4
#: VRAMQ_MAX_STREAMS: event streams one API process holds open at once (each holds a
#: thread); 0: half its threads. Past it 429.
MAX_STREAMS = 0
#: VRAMQ_STREAM_SECONDS: an event stream is closed after this long; clients reconnect
#: with Last-Event-ID and resume where they were.
STREAM_S = 300
#: VRAMQ_ANONYMOUS_MAX_UPLOAD_MB: the largest file a caller without an API key may upload
#: (callers with one get VRAMQ_MAX_UPLOAD_MB); past it 413, judged from Content-Length.
ANONYMOUS_MAX_UPLOAD_MB = 25
#: VRAMQ_UPLOAD_QUOTA_MB: the bytes of live uploads (not yet deleted by the retention
#: sweeper) one account may hold; past it 413 ``upload_quota_exceeded``. 0: no quota.
UPLOAD_QUOTA_MB = 2048
#: VRAMQ_ANONYMOUS_UPLOAD_QUOTA_MB: the same for one anonymous network (an IPv4 address,
#: an IPv6 /64). 0: no quota.
ANONYMOUS_UPLOAD_QUOTA_MB = 200
#: VRAMQ_MAX_AUDIO_SECONDS: the longest audio an upload (or a data URI) may hold; the
#: probe refuses a longer declared duration before decoding and stops decoding past it.
#: 0: the largest ``max_audio_seconds`` of the catalog's speech models, plus 10%.
MAX_AUDIO_SECONDS = 0
#: VRAMQ_AUDIO_PROBE_CPU_SECONDS: CPU seconds the API spends decoding one audio file to
#: check it; a file that takes longer is refused (422). An hour of 44.1 kHz mono FLAC
#: takes about 2 s, MP3 1.5 s: the default leaves room for the longest audio a model takes.
AUDIO_PROBE_CPU_S = 5.0
