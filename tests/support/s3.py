"""A real S3-compatible server (moto's standalone server) on 127.0.0.1 and what tests/test_object_store.py does
with it: upload, compare stores bit for bit, count what a writer left, and check the fault proxy's retries."""

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cache.format import NAMES
from cache.store import CacheStore
from pipeline.location import Location
from pipeline.shards import digits_source, write_split
from tests.support.launch import free_port


@contextlib.contextmanager
def moto_server(log_dir: Path):
    """moto's S3 server on a free loopback port, with fake credentials set in os.environ while it runs; yields
    the environment a client (or a subprocess) needs to reach it. Nothing of this machine's AWS set-up leaks in."""
    port = free_port()
    log = open(log_dir / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE")
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"moto server exited; see {log_dir / 'server.log'}") from None
                time.sleep(0.1)
        saved = {k: os.environ.get(k) for k in (*env, *unset)}
        os.environ.update(env)
        for k in unset:
            os.environ.pop(k, None)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def proxy_env(proxy, **kw) -> dict:
    """The environment of a run through the proxy; the clients cached so far (made for the server directly,
    e.g. by an upload) are dropped, so that the run's are made for the proxy."""
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    return {"AWS_ENDPOINT_URL": proxy.url, **kw}


def storage_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: storage ")]



def upload_small_digits(small_digits, url: str) -> str:
    """The small_digits dataset written to `url` by the shard writer itself."""
    classes, splits = digits_source()
    write_split(url, "train", classes, splits["train"][:270], name="digits-small", shard_size=48, progress=False)
    write_split(url, "val", classes, splits["val"][:96], name="digits-small", shard_size=48, progress=False)
    return url


def upload_store(local: Path, url: str) -> str:
    """A local store's files copied byte for byte to `url`."""
    for f in local.rglob("*"):
        if f.is_file():
            Location(url).child(f.relative_to(local).as_posix()).write_atomic(f.read_bytes())
    return url


def assert_same_store(a, b) -> None:
    sa, sb = CacheStore(a), CacheStore(b)
    assert sa.done_units() == sb.done_units() == set(range(sa.num_units))
    for name in NAMES:
        x, y = sa.read_all(name), sb.read_all(name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name  # bit for bit
    for u in range(sa.num_units):
        assert sa.unit_info(u) == sb.unit_info(u)


def arrays_written(fs, store: str) -> dict[int, int]:
    """unit -> how many arrays hold a zarr shard object for it (`name/c/0/<unit>[/0...]`, zarr 3 default keys)."""
    fs.invalidate_cache()
    counts: dict[int, int] = {}
    for name in NAMES:
        key = f"/{name}/c/0/"
        # `fs.find(prefix)` can answer the prefix itself: s3fs asks for its info when the listing came back empty,
        # and a write landing between the two calls makes it a directory (seen under load): only objects count
        units = {int(p.split(key, 1)[1].split("/")[0]) for p in fs.find(f"{store}{key}") if key in p}
        for u in units:
            counts[u] = counts.get(u, 0) + 1
    return counts


def marked(fs, units: str) -> set[int]:
    fs.invalidate_cache()
    return {int(p.rsplit("shard-", 1)[1][:-len(".json")]) for p in fs.find(units)}


def set_read_timeout(monkeypatch, seconds: float) -> None:
    """The S3 client's read timeout, set where a user sets it: fsspec's configuration of the s3 protocol (what
    FSSPEC_S3='{"config_kwargs": {"read_timeout": ...}}' fills), which every client made from now on reads."""
    import fsspec
    s3 = fsspec.config.conf.get("s3", {})
    monkeypatch.setitem(fsspec.config.conf, "s3", {**s3, "config_kwargs": {**s3.get("config_kwargs", {}),
                                                                         "read_timeout": seconds}})


def assert_all_retried(proxy, fails: int, stalls: int) -> None:
    """The proxy injected these HTTP faults, on reads (GET, HEAD) and writes (PUT) both, and each faulted request
    was sent again after its fault (a retry; `proxy.trace` holds every request line in order)."""
    kinds = [k for k, _ in proxy.faulted]
    assert (kinds.count("fail"), kinds.count("stall")) == (fails, stalls), proxy.faulted
    methods = {line.split(b" ")[0] for _, line in proxy.faulted}
    assert b"PUT" in methods and methods & {b"GET", b"HEAD"}, proxy.faulted
    lines = [line for _, line in proxy.trace]
    for _, line in proxy.faulted:
        at = lines.index(line)
        assert line in lines[at + 1:], f"{line} was not retried"
        lines[at] = None  # the next fault of the same request line is matched with its next occurrence
