"""Shards and the teacher cache on an object store: a real S3-compatible server (moto's standalone server)
on 127.0.0.1, started and stopped here, with fake credentials; no traffic beyond loopback."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cache.format import NAMES
from cache.inspect import inspect_cache, verify_cache
from cache.store import CacheStore
from cache.teacher_pass import cache_teacher
from conftest import ROOT, SMALL_STORE, cache_cfg, launch_cli, need_module, refused, run_cli
from pipeline.errors import UserError
from pipeline.location import Location
from pipeline.reader import ShardReader
from pipeline.shards import digits_source, write_split
from tests.support.faultproxy import FaultProxy
from tests.support.launch import free_port
from tests.support.s3 import (
    arrays_written,
    assert_all_retried,
    assert_same_store,
    marked,
    moto_server,
    proxy_env,
    set_read_timeout,
    storage_warnings,
    upload_small_digits,
    upload_store,
)

need_module("s3fs")
need_module("moto.server")

RECIPE = SMALL_STORE["recipe"]  # "digits-mix"
TEACHER = ["--teacher", "test_resnet", "--recipe", RECIPE, "--epochs", "2", "--topk", "4", "--batch-size", "40",
           "--workers", "0", "--quiet"]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """moto's S3 server for the session (fsspec caches its S3 clients, and this module's slow tests run last)."""
    with moto_server(tmp_path_factory.mktemp("moto")) as env:
        yield env


@pytest.fixture
def bucket(s3_env, request):
    """A fresh bucket per test: s3://<name>."""
    import hashlib

    import s3fs
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t-{stem}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"  # unique per parametrized test
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def local_ref(small_store):
    """The clean local store every remote one must equal: cache_teacher(cache_cfg(small_digits, ...)), the session's
    shared store (conftest), read-only here."""
    return small_store


@pytest.fixture
def proxy(s3_env):
    """A fault-injecting TCP proxy (tests/support/faultproxy.py) in front of the moto server. A run given
    `env=proxy_env(proxy)` talks through it: s3fs reads AWS_ENDPOINT_URL when it builds a client, and fsspec
    caches clients per process, so the cache is cleared on both sides of the test."""
    import s3fs
    port = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    s3fs.S3FileSystem.clear_instance_cache()
    with FaultProxy(("127.0.0.1", port)) as p:
        yield p
    s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------------------- shards

def test_shards_in_a_bucket_read_back_equal_to_local(small_digits, bucket):
    url = upload_small_digits(small_digits, f"{bucket}/data")
    local = Location(small_digits)
    remote = Location(url)
    assert remote.child("dataset.json").read_bytes() == local.child("dataset.json").read_bytes()
    for name in local.listdir():
        assert remote.child(name).read_bytes() == local.child(name).read_bytes(), name  # byte for byte
    r, l_ = ShardReader(url, verify=True), ShardReader(small_digits)
    r.check_files()
    for s in range(r.num_shards):
        a, b = list(r.read_shard(s)), list(l_.read_shard(s))
        assert [(x.index, x.label) for x in a] == [(x.index, x.label) for x in b]
        assert all((x.image == y.image).all() for x, y in zip(a, b, strict=True))
    # an object altered in place (a byte of a member's content: the tar still reads) fails the checksum
    shard = remote.child(r.split.shards[1].name)
    shard.write_atomic(shard.read_bytes().replace(b"digits/", b"digitz/", 1))
    with pytest.raises(UserError, match="checksum"):
        list(ShardReader(url, verify=True).read_shard(1))


def test_any_fsspec_protocol_holds_shards_and_a_store(tmp_path):
    """memory:// (no bucket, no async client: zarr wraps it) and file:// (local: fsync and rename apply)."""
    from cache.format import CacheDescription, DatasetRecord, TeacherRecord
    from cache.store import Unit
    classes, splits = digits_source()
    for root in ("memory://ofakd-test", f"file://{tmp_path}"):
        write_split(f"{root}/ds", "train", classes, splits["train"][:60], name="m", shard_size=30, progress=False)
        assert len(list(ShardReader(f"{root}/ds", verify=True).read_shard(1))) == 30
        desc = CacheDescription(
            teacher=TeacherRecord("t", None, None, {"source": "init"}, None, {}, 32, [0.5] * 3, [0.5] * 3, 8),
            dataset=DatasetRecord("m", "train", f"{root}/ds", "0" * 64, 60, 2, 30, classes),
            num_classes=10, topk=2, epochs=1, seed=0, recipe={}, recipe_name="custom", on_error="raise", versions={})
        store = CacheStore.create(f"{root}/t.zarr", desc)
        data = {n: np.full((1, 30, *store.array(n).shape[2:]), 3, dtype=store.array(n).dtype) for n in NAMES}
        store.write_unit(Unit(1, 30, 30, data, [], ["0" * 32]))
        again = CacheStore(f"{root}/t.zarr")
        assert again.done_units() == {1} and (again.read_epoch(0, 1)["lse"] == 3).all()
        with pytest.raises(UserError, match="no complete data for data shard 0"):
            again.read_epoch(0, 0)
    assert (tmp_path / "t.zarr" / "_units" / "shard-000001.json").is_file()  # file:// is the local disk


# ----------------------------------------------------------------------------------------- store

@pytest.mark.slow
def test_store_in_a_bucket_equals_the_local_one_bit_for_bit(small_digits, local_ref, bucket):
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    s = cache_teacher(cache_cfg(data, out))
    assert s["views_written"] == 2 * 270
    assert_same_store(out, local_ref)
    assert CacheStore(out).attrs["dataset"]["path"] == data  # a URL is recorded as given
    again = cache_teacher(cache_cfg(data, out))  # a rerun finds every unit done
    assert again["views_written"] == 0 and again["units_skipped_as_done"] == 6
    info = inspect_cache(out)
    assert info["complete"] and info["units_done"] == "6/6" and info["disk_bytes"] > 0
    r = verify_cache(out, samples=6)
    assert r["ok"], r["problems"]


@pytest.mark.slow
def test_killed_teacher_pass_resumes_to_the_clean_store_and_is_refused_meanwhile(small_digits, local_ref, bucket,
                                                                                s3_env, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    units = f"{out}/_units"
    # slowed zarr writes (tests/support/chaos_cli.py) so that the kill lands inside a unit's writes
    cmd = [sys.executable, str(ROOT / "tests" / "support" / "chaos_cli.py"), "cache-teacher", "--data", data,
           "--out", out, *TEACHER]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OFAKD_CHAOS_SLOW_WRITES": "0.25"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, torn = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None and torn is None:
        # a unit some of whose arrays are written, and not all: its writes are under way (one per 0.25 s)
        torn = next((u for u, n in arrays_written(fs, out).items() if 0 < n < len(NAMES) and u not in
                     marked(fs, units)), None)
        time.sleep(0.05)
    assert torn is not None and proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = CacheStore(out).done_units()
    assert torn not in done and arrays_written(fs, out)[torn] > 0  # the kill landed inside unit `torn`
    assert len(done) < 6

    p = run_cli("train-student", "--data", data, "--student", "test_resnet", "--method", "kd", "--cache", out,
                "--out", tmp_path / "run", "--epochs", "1", "--workers", "0", "--quiet")
    assert p.returncode != 0 and "incomplete" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()

    run_cli("cache-teacher", "--data", data, "--out", out, *TEACHER, check=True)
    assert_same_store(out, local_ref)


@pytest.mark.slow
def test_two_processes_write_one_store_in_the_bucket_and_lose_nothing(small_digits, local_ref, bucket, tmp_path):
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--log-dir", str(logs), "--redirects", "3", str(ROOT / "cli.py"), "cache-teacher", "--data", data,
           "--out", out, *TEACHER]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true",
                            # torchrun would set 1; the reference was computed with torch's default thread
                            # count, and CPU kernels may round differently with another one
                            "OMP_NUM_THREADS": str(torch.get_num_threads())})
    ranks = sorted(f.parent.name for f in logs.rglob("stdout.log"))
    assert p.returncode == 0, p.stderr[-3000:] + "".join(f.read_text()[-2000:] for f in logs.rglob("std*.log"))
    assert ranks == ["0", "1"]  # two ranks ran
    # one world of two: only its main process reports, the sum over both ranks (two processes each running
    # as a world of one would each write every unit and each report 540)
    reports = {f.parent.name: f.read_text() for f in logs.rglob("stdout.log") if "views written" in f.read_text()}
    assert list(reports) == ["0"] and "540 views written" in reports["0"], reports
    assert_same_store(out, local_ref)


# ----------------------------------------------------------------------------------------- read-ahead

def test_read_ahead_keeps_order_and_bounds_what_is_in_flight():
    import threading

    from pipeline.location import ReadAhead
    started, release = [], threading.Event()

    def fetch(k):
        started.append(k)
        release.wait(10)
        return k * 10
    ahead = ReadAhead(fetch, [3, 1, 2, 0], depth=2)
    time.sleep(0.2)
    assert sorted(started) == [1, 3]  # two in flight, no more
    release.set()
    assert ahead.take(3) == 30 and ahead.take(1) == 10
    assert ahead.take(0) is None  # out of sequence: the caller reads it itself; the read-ahead ends
    assert ahead.take(2) is None


def test_a_streamed_shard_survives_cut_answers_bit_for_bit(small_digits, bucket, proxy, monkeypatch):
    """Without the read-ahead a shard is streamed in blocks: a block cut mid-answer is read again from where
    the file stood, so the samples and the sha256 over the streamed bytes are those of a clean read."""
    data = upload_small_digits(small_digits, f"{bucket}/data")
    for k, v in proxy_env(proxy, OFAKD_STORE_PREFETCH="0").items():
        monkeypatch.setenv(k, v)
    remote, local = ShardReader(data, verify=True), ShardReader(small_digits)
    for s in range(remote.num_shards):
        proxy.at_request(2, lambda: proxy.drop_next(1))  # the open's HEAD passes; the first block's GET is cut
        a, b = list(remote.read_shard(s)), list(local.read_shard(s))
        assert [(x.index, x.label) for x in a] == [(x.index, x.label) for x in b]
        assert all(torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert proxy.dropped == remote.num_shards


def test_views_from_a_bucket_read_ahead_equal_the_local_ones(small_digits, local_ref, bucket):
    from cache.targets import TEACHER_KEY, CachedTeacher
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = upload_store(local_ref, f"{bucket}/teacher.zarr")
    streams = []
    for cache, d in ((local_ref, small_digits), (out, data)):
        views = CachedTeacher(cache).views(d, epoch=1)
        streams.append(list(views))
        if cache == out:  # every shard's bytes and every unit's rows came from the read-ahead, in order
            assert views.reader._ahead._next == views.reader.num_shards and not views.reader._ahead._futures
            store = views.join.store
            assert store._ahead._next == store.num_units and not store._ahead._futures
    local, remote = streams
    assert [v["index"] for v in local] == [v["index"] for v in remote]  # same order
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["view"], b["view"])
        for x, y in zip(a[TEACHER_KEY], b[TEACHER_KEY], strict=True):  # exactly (a store without a tail: NaN tail_lse)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_an_ensemble_of_caches_in_a_bucket_reads_every_member_ahead_and_equals_local(small_digits, local_ref,
                                                                                   second_store, bucket):
    from cache.targets import TeacherEnsemble
    data = upload_small_digits(small_digits, f"{bucket}/data")
    remote = [upload_store(p, f"{bucket}/{i}.zarr") for i, p in enumerate((local_ref, second_store))]
    streams = []
    for caches, d in (((local_ref, second_store), small_digits), (remote, data)):
        ens = TeacherEnsemble(list(caches), [1, 3], "prob")
        views = ens.members[0].views(d, epoch=1)
        views.join = ens.join  # as train-student joins an ensemble
        streams.append(list(views))
        if d == data:  # every member's rows came through its own read-ahead, unit by unit, in order
            for join in ens.join.joins:
                store = join.store
                assert store._ahead._next == store.num_units and not store._ahead._futures
    local, remote_views = streams
    assert [v["index"] for v in local] == [v["index"] for v in remote_views]
    for a, b in zip(local, remote_views, strict=True):
        assert torch.equal(a["view"], b["view"])
        for key in ("teacher", "teacher.1"):  # both members' targets, exactly
            for x, y in zip(a[key], b[key], strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------- training

@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_training_from_the_bucket_ends_with_the_same_weights_as_from_local_disk(small_digits, local_ref, bucket,
                                                                                tmp_path, processes):
    from safetensors.numpy import load_file
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = upload_store(local_ref, f"{bucket}/teacher.zarr")  # training must read the same cache from both places
    args = ["--student", "test_resnet", "--method", "ofa", "--epochs", "1", "--max-steps-per-epoch", "3",
            "--batch-size", "16", "--workers", "1", "--mixed-precision", "no", "--quiet"]
    weights = []
    for d, c, run in ((small_digits, local_ref, tmp_path / "local"), (data, out, tmp_path / "s3")):
        p = launch_cli(processes, "train-student", "--data", d, "--cache", c, "--out", run, *args)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads((run / "config.json").read_text())["resolved"]["processes"] == processes  # ranks that ran
        weights.append(load_file(str(run / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert np.array_equal(weights[0][k], weights[1][k]), k


# ----------------------------------------------------------------------------------------- bad inputs

@pytest.mark.slow
def test_a_protocol_without_its_client_names_the_extra(tmp_path):
    with pytest.raises(UserError, match=r"pip install ofakd-cache\[gcs\]"):
        Location("gs://some-bucket/data")  # gcsfs is not a dev dependency
    # the CLI in a process where s3fs cannot be imported, as if `.[s3]` were not installed
    code = "import sys; sys.modules['s3fs'] = None; import cli; sys.argv = ['cli.py', *sys.argv[1:]]; cli.main()"
    p = subprocess.run([sys.executable, "-c", code, "shards", "digits", "s3://any-bucket/data", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    refused(p, "s3://any-bucket/data", "pip install ofakd-cache[s3]")


@pytest.mark.slow
def test_missing_bucket_and_missing_credentials_are_one_sentence_and_write_nothing(small_digits, bucket, s3_env,
                                                                                   tmp_path):
    classes, splits = digits_source()
    with pytest.raises(UserError, match="bucket 'no-such-bucket' of s3://no-such-bucket/data does not exist"):
        write_split("s3://no-such-bucket/data", "train", classes, splits["train"][:10], name="x", progress=False)
    with pytest.raises(UserError, match="bucket 'no-such-bucket'"):
        CacheStore.create("s3://no-such-bucket/t.zarr", {})
    with pytest.raises(UserError, match="does not exist or is not a zarr store"):
        CacheStore(f"{bucket}/nothing-here.zarr")

    no_creds = {**s3_env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    env = {k: v for k, v in {**os.environ, **no_creds}.items() if v != ""}
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "cache-teacher", "--data", f"{bucket}/data", "--out",
                        f"{bucket}/teacher.zarr", *TEACHER], capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    refused(p, "no credentials", "AWS_ACCESS_KEY_ID")
    assert not Location(f"{bucket}/teacher.zarr").exists()  # nothing created, nothing marked


# ----------------------------------------------------------------------------------------- outages (proxy)

@pytest.mark.slow
def test_teacher_pass_rides_through_a_refused_window_to_the_clean_store(small_digits, local_ref, bucket, proxy):
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    # nothing listens for 1.5 s from the first unit's marker on: inside the next units' writes
    proxy.at_request(1, lambda: proxy.refuse_for(1.5), match=b"_units/shard-")
    p = run_cli("cache-teacher", "--data", data, "--out", out, *TEACHER, env=proxy_env(proxy))
    assert p.returncode == 0, p.stderr[-3000:]
    assert proxy.requests > 50
    warned = storage_warnings(p.stderr)
    assert len(warned) == 1 and f"storage {bucket} is not answering" in warned[0], p.stderr  # logged once
    assert_same_store(out, local_ref)  # bit for bit, markers included


@pytest.mark.slow
def test_an_outage_past_the_retry_bound_stops_in_one_sentence_and_the_rerun_completes(small_digits, local_ref,
                                                                                      bucket, proxy, tmp_path):
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    short = {"OFAKD_STORE_RETRIES": "2", "OFAKD_STORE_BACKOFF": "0.1"}  # gives up after 0.3 s
    proxy.at_request(2, lambda: proxy.refuse_for(4), match=b"_units/shard-")  # at the second unit's marker
    p = run_cli("cache-teacher", "--data", data, "--out", out, *TEACHER, env=proxy_env(proxy, **short))
    refused(p, f"storage {bucket} did not answer", "3 tries", "OFAKD_STORE_RETRIES")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 2, p.stderr  # the warning, the error
    time.sleep(4)
    assert 1 <= len(CacheStore(out).done_units()) < 6  # stopped mid-pass: the unmarked units are redone
    run_cli("cache-teacher", "--data", data, "--out", out, *TEACHER, env=proxy_env(proxy), check=True)
    assert_same_store(out, local_ref)

    # training past the bound: one sentence too
    proxy.at_request(1, lambda: proxy.refuse_for(4), match=b".tar ")  # the first shard read
    p = run_cli("train-student", "--data", data, "--cache", out, "--out", tmp_path / "run", "--student", "test_resnet",
                "--method", "kd", "--epochs", "1", "--workers", "1", "--quiet", env=proxy_env(proxy, **short))
    refused(p, f"storage {bucket} did not answer")
    assert p.returncode == 2 and not (tmp_path / "run" / "model.safetensors").exists()


def test_server_errors_and_throttling_are_retried_by_their_status_not_found_and_denied_are_not():
    """A HEAD's error answer has no body, so botocore names no code (it says "500"): the status decides."""
    from botocore.exceptions import ClientError

    from pipeline.retry import is_transient

    def answer(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "HeadObject")
    assert not is_transient(OSError(5, "opaque"))
    for status in (429, 500, 502, 503, 504):
        wrapped = OSError(5, "opaque")
        wrapped.__cause__ = answer(status, str(status))  # as s3fs hands it on
        assert is_transient(answer(status, str(status))) and is_transient(wrapped), status
    assert not any(is_transient(answer(status, str(status))) for status in (400, 403, 404))


FAST_RETRIES = {"OFAKD_STORE_BACKOFF": "0.05"}  # 0.05, 0.1, 0.2, ... s between tries: faults cost little time


@pytest.mark.slow
def test_teacher_pass_rides_through_http_faults_to_the_clean_store(small_digits, local_ref, bucket, proxy,
                                                                  monkeypatch):
    """The store answers some requests itself as S3 does when it throttles or fails (503 SlowDown, bursts of 500
    InternalError) and holds one write's and one read's answer past the client's read timeout (1 s): the pass
    retries them and ends with the clean store, bit for bit."""
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = f"{bucket}/teacher.zarr"
    set_read_timeout(monkeypatch, 1.0)
    proxy.trace = []
    proxy.fail_next(2, 503, "SlowDown", match=b"PUT ")  # the store's first writes: its metadata
    proxy.at_request(1, lambda: proxy.fail_next(3, 500, "InternalError", match=b"PUT "), match=b"/c/0/1")  # unit 1
    proxy.at_request(3, lambda: proxy.stall_next(1, 3.0), match=b"PUT /" + out.split("/")[2].encode())
    proxy.at_request(1, lambda: proxy.fail_next(2, 503, "SlowDown"), match=b".tar ")  # the first shard read
    proxy.at_request(3, lambda: proxy.fail_next(3, 500, "InternalError"), match=b".tar ")
    proxy.at_request(5, lambda: proxy.stall_next(1, 3.0), match=b".tar ")
    p = run_cli("cache-teacher", "--data", data, "--out", out, *TEACHER, env=proxy_env(proxy, **FAST_RETRIES))
    assert p.returncode == 0, p.stderr[-3000:]
    assert_all_retried(proxy, fails=2 + 3 + 2 + 3, stalls=2)
    assert storage_warnings(p.stderr), p.stderr
    assert_same_store(out, local_ref)


class _FailingStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise UserError("storage s3://b did not answer for 1.0 s; check the network")
        yield


def test_a_user_error_in_a_data_loader_worker_stays_one_sentence():
    """torch re-raises a worker's exception as its type built from the worker's traceback text: a store's
    outage met in a worker must still reach the CLI as the sentence alone."""
    with pytest.raises(UserError) as e:
        next(iter(torch.utils.data.DataLoader(_FailingStream(), num_workers=1)))
    assert str(e.value) == "storage s3://b did not answer for 1.0 s; check the network"


@pytest.mark.slow
def test_training_through_dropped_connections_and_http_faults_ends_with_the_clean_runs_weights(
        small_digits, local_ref, bucket, proxy, tmp_path, monkeypatch):
    """Answers cut mid-stream, reads answered 503 SlowDown and bursts of 500 InternalError by the store, and reads
    held past the client's read timeout (1 s), in the main process and in the data-loader worker: the run
    retries through them all and ends with the weights of the same run from local disk."""
    from safetensors.numpy import load_file
    data = upload_small_digits(small_digits, f"{bucket}/data")
    out = upload_store(local_ref, f"{bucket}/teacher.zarr")
    args = ["--student", "test_resnet", "--method", "ofa", "--epochs", "1", "--max-steps-per-epoch", "4",
            "--batch-size", "16", "--workers", "1", "--mixed-precision", "no", "--quiet"]
    run_cli("train-student", "--data", small_digits, "--cache", local_ref, "--out", tmp_path / "clean", *args,
            check=True)
    set_read_timeout(monkeypatch, 1.0)
    proxy.trace = []
    for n in (10, 25, 40, 60):  # answers cut mid-stream: shard reads, cache reads, metadata
        proxy.at_request(n, lambda: proxy.drop_next(2))
    proxy.at_request(1, lambda: proxy.fail_next(2, 503, "SlowDown"), match=b".tar ")  # the first shard read
    proxy.at_request(2, lambda: proxy.fail_next(3, 500, "InternalError"), match=b"/teacher.zarr/topk_values/c/")
    proxy.at_request(3, lambda: proxy.stall_next(1, 3.0), match=b"/teacher.zarr/")
    proxy.at_request(2, lambda: proxy.stall_next(1, 3.0), match=b".tar ")
    proxy.at_request(1, lambda: proxy.fail_next(1, 503, "SlowDown"), match=b"HEAD ")
    p = run_cli("train-student", "--data", data, "--cache", out, "--out", tmp_path / "s3", *args,
                env=proxy_env(proxy, **FAST_RETRIES))
    assert p.returncode == 0, p.stderr[-3000:]
    assert proxy.dropped >= 4, proxy.dropped
    assert storage_warnings(p.stderr), p.stderr  # the faults reached our retries (aiohttp retries some drops by itself)
    kinds = [k for k, _ in proxy.faulted]
    assert (kinds.count("fail"), kinds.count("stall")) == (2 + 3 + 1, 2), proxy.faulted
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("clean", "s3"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
