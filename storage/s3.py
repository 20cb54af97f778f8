"""S3Store: objects in an S3-compatible bucket (AWS, MinIO, Ceph, moto) under a key prefix.

Downloads are presigned GET URLs, so object bytes never pass through the API. boto3 is
imported when a store is built, not when this module is, so ``import storage`` works
without the ``s3`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vramq.jobs.errors import ConfigError, MissingExtra, NotFound, ServiceUnavailable, VramqError

from .base import ObjectStore, validate_key

#: Seconds to open a connection; an unreachable endpoint fails in a few seconds, not minutes.
CONNECT_TIMEOUT_S = 3
#: Seconds to wait for each read from an open connection.
READ_TIMEOUT_S = 10
#: Attempts per call, the first included (botocore's default of 3-5 with backoff
#: would stretch an outage into a long hang for every request).
MAX_ATTEMPTS = 2


def _client_config(botocore_config: Any, endpoint_url: str | None) -> Any:
    options: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "retries": {"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        # SigV4 always, so presigned links carry X-Amz-Expires on every provider.
        "signature_version": "s3v4",
    }
    if endpoint_url:
        # Self-hosted endpoints (MinIO, moto, an IP address) rarely resolve
        # bucket.host names, and many reject the checksums boto3 adds by default.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return botocore_config.Config(**options)


class S3Store(ObjectStore):
    """Objects in ``bucket`` under ``prefix/``; links are presigned GET URLs.

    Args:
        bucket: the bucket name; ``ensure_bucket`` creates it.
        prefix: a folder inside the bucket for every key ("" for the bucket root).
        endpoint_url: an S3-compatible endpoint (MinIO, moto); None for AWS.
        region: the bucket's region; None uses boto3's configuration.
        client: a ready boto3 S3 client, to share one or configure it differently.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ):
        try:
            import boto3.session
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise MissingExtra("boto3", "s3") from None
        if not bucket:
            raise ConfigError("S3Store needs a bucket name")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = validate_key(prefix) + "/" if prefix else ""
        self._errors = botocore.exceptions
        # ConnectionError covers refused/unresolvable/connect timeouts; HTTPClientError
        # covers read timeouts and connections dropped mid-response.
        self.connection_errors = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
        if client is None:
            # A Session per store: boto3's default session is not safe to share across threads.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=_client_config(botocore.config, endpoint_url),
            )
        self.client = client
        self.location = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (``vramq up`` and the tests call this)."""
        with self._reaching("create the bucket", self.bucket), self._translated(self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except self._errors.ClientError as exc:
                if _status(exc) != 404:
                    raise
            options = {}
            region = self.client.meta.region_name
            if region and region != "us-east-1":  # us-east-1 rejects an explicit constraint
                options["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **options)
            except self._errors.ClientError as exc:
                if _code(exc) != "BucketAlreadyOwnedByYou":  # lost a harmless race
                    raise

    def ping(self) -> None:
        with self._reaching("reach the bucket", self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except self._errors.ClientError as exc:
                raise ServiceUnavailable(
                    f"object store {self.location} is not usable: HEAD bucket answered {_status(exc)} {_code(exc)}"
                ) from exc
            except self._errors.NoCredentialsError as exc:
                raise ConfigError(f"no credentials for object store {self.location}: {exc}") from exc

    # -- primitives -----------------------------------------------------------------

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        with self._translated(key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def _get(self, key: str) -> bytes:
        with self._translated(key):
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
            return body

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._translated(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", ()))
        return keys

    def _delete_many(self, keys: list[str]) -> None:
        with self._translated(keys[0] if keys else ""):
            answer = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.prefix + key} for key in keys], "Quiet": True},
            )
        if failed := answer.get("Errors"):
            first = failed[0]
            raise ServiceUnavailable(
                f"object store {self.location} refused to delete {len(failed)} of {len(keys)} objects, "
                f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )

    def _signed_url(self, key: str, expires_in: int) -> str:
        with self._translated(key):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key}, ExpiresIn=expires_in
            )
            return url

    # -- helpers --------------------------------------------------------------------

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn S3's answers into vramq errors; unknown answers pass through unchanged."""
        try:
            yield
        except self._errors.NoCredentialsError as exc:
            raise ConfigError(f"no credentials for object store {self.location}: {exc}") from exc
        except self._errors.ClientError as exc:
            error = self._error_for(exc, key)
            if error is None:
                raise
            raise error from exc

    def _error_for(self, exc: Exception, key: str) -> VramqError | None:
        code, status = _code(exc), _status(exc)
        if code == "NoSuchBucket":
            return ConfigError(f"bucket {self.bucket!r} does not exist ({self.location}); `vramq up` creates it")
        if code == "BucketAlreadyExists":
            return ConfigError(f"bucket name {self.bucket!r} is taken by another account")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFound(f"no object {key!r}")
        if status in (401, 403):
            return ConfigError(f"object store {self.location} refused access ({code}): check the credentials")
        if status >= 500:
            return ServiceUnavailable(f"object store {self.location} failed ({status} {code})")
        return None


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
