"""Storage failures: their causes in one sentence (`describe_error`, `storage_errors`), and one retry policy for
stores that are briefly slow or unreachable (`retrying`).

Every request this project makes to a URL (through `pipeline.location.Location` and through the zarr store
`cache.store` opens) goes through `retrying`, which retries connection failures, timeouts, cut answers and
throttling (never "not found" or "access denied") with exponential backoff:
OFAKD_STORE_RETRIES retries (default 6) after the first try, waiting OFAKD_STORE_BACKOFF seconds
(default 0.5) before the first retry and twice as long before each next one, each wait capped at 8 s
(defaults: 0.5 + 1 + 2 + 4 + 8 + 8 = 23.5 s of outage ridden through). The first failure of an outage
prints one warning line per process; after the last retry the command stops with a UserError naming
the store. The S3 client's own retries are switched off (s3fs's loop and botocore's), so the count
above is the count of requests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.errors import UserError


def describe_error(url: str, e: BaseException) -> str | None:
    """A one-sentence cause for the storage failures a user fixes outside this tool, else None."""
    name, text = type(e).__name__, str(e)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                f"or another source the client reads) in the environment")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return (f"bucket '{bucket}' of {url} does not exist (or is not visible with these credentials); "
                f"create it or fix the URL")
    first = text.splitlines()[0][:120] if text else name
    if any(c in name or c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
        return f"access to {url} was denied ({first}); check the credentials and their permissions"
    if "Could not connect to the endpoint" in text or "Cannot connect to host" in text:
        return f"cannot reach the storage service for {url} ({first}); check AWS_ENDPOINT_URL or the network"
    return None


@contextlib.contextmanager
def storage_errors(url: str, translate_transient: bool = True) -> Iterator[None]:
    """Turn credential, bucket and connection failures inside the block into one-sentence UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # botocore/aiohttp/gcsfs raise many types; only known causes are translated
        if not translate_transient and is_transient(e):
            raise  # `retrying` decides
        why = describe_error(url, e)
        if why is None:
            raise
        raise UserError(why) from e


RETRIES_ENV, BACKOFF_ENV, MAX_WAIT = "OFAKD_STORE_RETRIES", "OFAKD_STORE_BACKOFF", 8.0

# failures a store recovers from by itself: refused, reset or cut connections, timeouts, throttling.
# Matched by name along the exception's chain: s3fs, botocore, aiohttp and gcsfs each raise their own types.
TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                   "SocketTimeoutError", "ServerTimeoutError", "IncompleteRead", "ResponseStreamingError",
                   "HTTPClientError", "FSTimeoutError", "ProtocolError", "ChunkedEncodingError"}
TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "Service Unavailable", "ServiceUnavailable",
                  "InternalError", "RequestTimeout", "Throttl")


TRANSIENT_STATUS = {429, 500, 502, 503, 504}  # too many requests, and the server errors a store recovers from


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a failed request's answer, where the client's exception carries it (botocore)."""
    response = getattr(e, "response", None)
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    return meta.get("HTTPStatusCode") if isinstance(meta, dict) else None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # after the first try
    backoff: float = 0.5  # seconds before the first retry; doubled before each next one, at most MAX_WAIT

    @staticmethod
    def from_env() -> RetryPolicy:
        try:
            retries = int(os.environ.get(RETRIES_ENV, RetryPolicy.retries))
            backoff = float(os.environ.get(BACKOFF_ENV, RetryPolicy.backoff))
        except ValueError:
            retries = backoff = -1
        if retries < 0 or not backoff >= 0:
            raise UserError(f"{RETRIES_ENV}={os.environ.get(RETRIES_ENV)!r} / {BACKOFF_ENV}="
                            f"{os.environ.get(BACKOFF_ENV)!r} are not a count >= 0 and seconds >= 0; fix or unset them")
        return RetryPolicy(retries, backoff)

    def wait(self, retry: int) -> float:
        return min(self.backoff * 2 ** retry, MAX_WAIT)

    @property
    def total(self) -> float:
        return sum(self.wait(i) for i in range(self.retries))


def is_transient(e: BaseException) -> bool:
    """A failure that waiting may cure (see TRANSIENT_TYPES); "not found", "denied" and bad input are not."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in TRANSIENT_TYPES:
            return True
        if _http_status(e) in TRANSIENT_STATUS:  # an answer without a body names no code (HEAD): its status does
            return True
        if any(t in str(e) for t in TRANSIENT_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _store_root(url: str) -> str:
    """What an outage is an outage of: protocol://bucket (a local path: itself)."""
    if "://" not in url:
        return url
    proto, rest = url.split("://", 1)
    return f"{proto}://{rest.split('/', 1)[0]}"


_outages: dict[str, float] = {}  # store root -> when this process saw it fail first (until it answers again)
_outages_lock = threading.Lock()


def retrying(url: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), retried on transient failures under the policy of the module docstring; other
    failures become one-sentence UserErrors where their cause is known (`storage_errors`)."""
    policy, root, first = None, _store_root(url), None
    for attempt in range(1 << 30):
        started = time.monotonic()
        try:
            with storage_errors(url, translate_transient=False):
                out = fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, UserError) or not is_transient(e):
                raise
            policy = policy or RetryPolicy.from_env()
            first = first or started
            _warn_once(root, e, policy)
            if attempt >= policy.retries:
                raise UserError(f"storage {root} did not answer for {time.monotonic() - first:.1f} s "
                                f"({attempt + 1} tries of {url}; last: {_short(e)}); check the network and the "
                                f"endpoint (AWS_ENDPOINT_URL), or allow a longer outage with {RETRIES_ENV} / "
                                f"{BACKOFF_ENV}") from e
            time.sleep(policy.wait(attempt))
            continue
        if _outages:
            with _outages_lock:  # the store answers again: a request sent after the outage began came back
                if _outages.get(root, started) < started:
                    del _outages[root]
        return out


def _warn_once(root: str, e: BaseException, policy: RetryPolicy) -> None:
    """The first failure of an outage (since the store last answered) prints the one warning line."""
    with _outages_lock:
        if root in _outages:
            return
        _outages[root] = time.monotonic()
    if policy.retries:
        print(f"warning: storage {root} is not answering ({_short(e)}); retrying up to {policy.retries} times over "
              f"{policy.total:.1f} s ({RETRIES_ENV}, {BACKOFF_ENV})", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
