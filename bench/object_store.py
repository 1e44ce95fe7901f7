"""Stage two's loader reading shards and cache from an S3-compatible server vs from local disk, same data.

    python bench/object_store.py [--data DIR] [--teacher NAME] [--rounds N] [--workers 0,2] [--batch-size B]

The server is moto's standalone S3 server on 127.0.0.1 (`pip install .[dev]`), so this measures the
client path's overhead (s3fs, zarr's FsspecStore, HTTP on loopback, the checksum while streaming),
not a network. Both sides read the same bytes: the local shards and store are uploaded as they are.
The loader is the one `cli.py train-student` builds: `CachedTeacher.views` (views rebuilt, cache joined
and checked per shard) in a torch DataLoader; best views/s of `--rounds`, local and remote alternating.
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

from common import ROOT, save
from stage_one import ensure_digits
from torch.utils.data import DataLoader

from cache.targets import CachedTeacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.location import Location


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


def upload(local: Path, url: str) -> None:
    dest = Location(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            dest.child(f.relative_to(local).as_posix()).write_atomic(f.read_bytes())


def loader_rate(cache: str, data: str, batch_size: int, workers: int) -> float:
    cached = CachedTeacher(cache)
    views = cached.views(data, 0)
    t0, n = time.perf_counter(), 0
    for b in DataLoader(views, batch_size=batch_size, num_workers=workers):
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "bench" / "digits")
    ap.add_argument("--teacher", default="test_resnet", help="any teacher: only the loader is timed")
    ap.add_argument("--recipe", default="digits-mix")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,2", help="data-loader worker counts to time, comma-separated")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--name", default="object_store")
    args = ap.parse_args(argv)
    data = ensure_digits(args.data) if args.data.name == "digits" else args.data
    tmp = Path(tempfile.mkdtemp(prefix="bench-obj-"))
    server, env = start_server()
    saved = {k: os.environ.get(k) for k in env}
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
        for w in (int(x) for x in args.workers.split(",")):
            local, remote = [], []
            for _ in range(args.rounds):  # alternating, best of: the machine is shared
                local.append(loader_rate(str(store), str(data), args.batch_size, w))
                remote.append(loader_rate("s3://bench/t.zarr", "s3://bench/data", args.batch_size, w))
            res[f"workers_{w}"] = {"local_views_per_s": max(local), "s3_loopback_views_per_s": max(remote),
                                   "s3_over_local": max(remote) / max(local), "all_local": local, "all_s3": remote}
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    save(args.name, res)
    return res


if __name__ == "__main__":
    main()
