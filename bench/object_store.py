"""Stage two's loader reading shards and cache from an S3-compatible server vs from local disk, same data.

    python bench/object_store.py [--data DIR] [--teacher NAME] [--rounds N] [--workers 0,2] [--batch-size B]
                                 [--latency-ms 20]

The server is moto's standalone S3 server on 127.0.0.1 (`pip install .[dev]`). Five ways to the same
bytes, interleaved in each round: local disk; the bucket directly (loopback: the client path's cost,
s3fs, zarr's FsspecStore, HTTP, the checksum while streaming); the bucket through the fault proxy of the
tests (tests/support/faultproxy.py, in its own process) adding `--latency-ms` to every request, with the
read-ahead on (OFAKD_STORE_PREFETCH, default 2 units) and off (0), and through the proxy adding nothing
(what the proxy itself costs). The local shards and store are uploaded as they are. The CPU time the
S3 server and the proxies spend per epoch is recorded (on this machine they share the loader's cores),
and the loader's own (this process and its workers).
The loader is the one `cli.py train-student` builds: `CachedTeacher.views(...).loader(epoch, batch, workers)`
(views rebuilt, cache joined and checked per shard, shards assigned to the workers, full batches only); best
views/s (views the loader hands out) of `--rounds`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import s3fs
from common import ROOT, inputs, md_table, save
from stage_one import ensure_digits

from cache.targets import CachedTeacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.location import PREFETCH_ENV, Location


def start_server() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_CONFIG_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server, env
        except OSError:
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("moto server did not start")


def start_proxy(target_port: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    """tests/support/faultproxy.py in its own process, adding `latency_ms` per request; (process, endpoint)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "faultproxy.py"), target_port,
                          "--latency-ms", str(latency_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, f"http://127.0.0.1:{p.stdout.readline().strip()}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_cpu() -> float:
    """CPU time of this process and of its exited children (the data-loader workers of finished epochs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def upload(local: Path, url: str) -> None:
    dest = Location(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            dest.child(f.relative_to(local).as_posix()).write_atomic(f.read_bytes())


def loader_rate(cache: str, data: str, batch_size: int, workers: int) -> float:
    """Views/s of one epoch of train-student's loader (`TrainViews.loader`, as students/train.py asks for it),
    the cache and data already opened: with one process every batch it makes is a step."""
    views = CachedTeacher(cache).views(data, 0)
    t0, n = time.perf_counter(), 0
    for b in views.loader(0, batch_size, workers):
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


def time_modes(modes: dict, helpers: list[int], args, workers: int, lat: str) -> dict:
    """Each mode's loader rate (best of the interleaved rounds) and CPU seconds, with `workers` loader workers."""
    rates = {m: [] for m in modes}
    helper_cpu, own_cpu = {m: [] for m in modes}, {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved, best of: the machine is shared
        for m, (cache, d, endpoint, depth) in modes.items():
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, PREFETCH_ENV: depth})
            s3fs.S3FileSystem.clear_instance_cache()  # clients read the endpoint when built
            c0, l0 = sum(cpu_seconds(p) for p in helpers), loader_cpu()
            rates[m].append(loader_rate(cache, d, args.batch_size, workers))
            helper_cpu[m].append(sum(cpu_seconds(p) for p in helpers) - c0)
            own_cpu[m].append(loader_cpu() - l0)
    best = {m: max(r) for m, r in rates.items()}
    return {**{f"{m}_views_per_s": v for m, v in best.items()},
            **{f"{m}_over_local": v / best["local"] for m, v in best.items() if m != "local"},
            f"{lat}_over_proxy_0ms": best[lat] / best["s3_proxy_0ms"],
            "server_and_proxy_cpu_s_per_epoch": {m: min(c) for m, c in helper_cpu.items()},
            "loader_cpu_s_per_epoch": {m: min(c) for m, c in own_cpu.items()},
            "all": rates}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "bench" / "digits")
    ap.add_argument("--teacher", default="test_resnet", help="any teacher: only the loader is timed")
    ap.add_argument("--recipe", default="digits-mix")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,2", help="data-loader worker counts to time, comma-separated")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to each request through the proxy")
    ap.add_argument("--name", default="object_store")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    data = ensure_digits(args.data) if args.data.name == "digits" else args.data
    tmp = Path(tempfile.mkdtemp(prefix="bench-obj-"))
    server, env = start_server()
    saved = {k: os.environ.get(k) for k in (*env, PREFETCH_ENV)}
    os.environ.update(env)
    try:
        store = tmp / "t.zarr"
        cache_teacher(build(CacheConfig, data=data, teacher=args.teacher, out=store, recipe=args.recipe, epochs=1,
                            topk=args.topk, batch_size=128, workers=1, progress=False))
        Location("s3://bench").fs.mkdir("bench")
        upload(data, "s3://bench/data")
        upload(store, "s3://bench/t.zarr")
        res = {"samples": CachedTeacher(str(store)).store.description.dataset.num_samples,
               "shards": CachedTeacher(str(store)).store.num_units, "batch_size": args.batch_size,
               "rounds": args.rounds,
               "server": "moto standalone S3 server on 127.0.0.1, on the same cores as the loader (loopback: "
                         "the client path's and server's cost, no network)"}
        target = env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
        lat = f"s3_{args.latency_ms:g}ms"
        proxies = {ms: start_proxy(target, ms) for ms in (0.0, args.latency_ms)}  # own processes: own CPU
        res["latency_ms"] = args.latency_ms
        modes = {  # name -> (cache, data, endpoint, read-ahead depth)
            "local": (str(store), str(data), env["AWS_ENDPOINT_URL"], "2"),
            "s3_loopback": ("s3://bench/t.zarr", "s3://bench/data", env["AWS_ENDPOINT_URL"], "2"),
            "s3_proxy_0ms": ("s3://bench/t.zarr", "s3://bench/data", proxies[0.0][1], "2"),
            lat: ("s3://bench/t.zarr", "s3://bench/data", proxies[args.latency_ms][1], "2"),
            f"{lat}_no_prefetch": ("s3://bench/t.zarr", "s3://bench/data", proxies[args.latency_ms][1], "0")}
        helpers = [server.pid] + [p.pid for p, _ in proxies.values()]
        for w in (int(x) for x in args.workers.split(",")):
            res[f"workers_{w}"] = time_modes(modes, helpers, args, w, lat)
        for p, _ in proxies.values():
            p.stdin.close()
            p.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_average_after"] = os.getloadavg()  # the machine is shared: how loaded it was
    res["inputs"] = inputs(data=data)
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = []
    for w in sorted(k for k in r if k.startswith("workers_")):
        x = r[w]
        for mode in x["loader_cpu_s_per_epoch"]:
            rows.append([w.removeprefix("workers_"), mode, x[f"{mode}_views_per_s"], x.get(f"{mode}_over_local", 1.0),
                         x["server_and_proxy_cpu_s_per_epoch"][mode], x["loader_cpu_s_per_epoch"][mode]])
    load = r.get("load_average_after")
    ms = f"{r['latency_ms']:g}"
    return (f"{r['samples']:,} samples in {r['shards']} shards, batch {r['batch_size']}, best of {r['rounds']} "
            f"rounds; {r['server']}. `s3_{ms}ms`: through the fault proxy adding {ms} ms a request, with the "
            "read-ahead (`_no_prefetch`: without)"
            + (f"; load average after the run {load[0]:.2f}" if load else "") + ". No target: what a bucket costs "
            "against local disk, and whether the read-ahead hides the latency.\n\n"
            + md_table(["loader workers", "source", "views/s", "/ local", "server + proxy CPU s/epoch",
                        "loader CPU s/epoch"], rows))


if __name__ == "__main__":
    main()
