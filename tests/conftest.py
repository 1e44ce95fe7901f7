import hashlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.launch import free_port, launch_cmd, launch_env
from tests.support.runner import ROOT, run_cli, run_cli_process

SHARED_DATA = ROOT.parent / "shared" / "data"


REQUIRE_ALL = "OFAKD_REQUIRE_ALL"  # set by .ci/run: nothing a test needs may be missing there


def need_shared(path: Path) -> Path:
    """A file of ../shared/data (the real datasets): skip when it is absent, unless OFAKD_REQUIRE_SHARED_DATA=1
    or OFAKD_REQUIRE_ALL=1 (set by .ci/run, where shared/ lies beside the clone), which turn the skip into a
    failure."""
    if not path.is_file():
        for switch in ("OFAKD_REQUIRE_SHARED_DATA", REQUIRE_ALL):
            if os.environ.get(switch) == "1":
                pytest.fail(f"{path} is absent but {switch}=1: put shared/data beside the checkout")
        pytest.skip(f"{path} is absent")
    return path


def need(what: str, why: str, fix: str) -> None:
    """Skip this test (or module) because `what` is missing here (`why`), unless OFAKD_REQUIRE_ALL=1 (.ci/run),
    where the run fails instead: a CI that lost a component cannot pass by skipping the tests that use it."""
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{what} is missing ({why}) but {REQUIRE_ALL}=1: {fix}", pytrace=False)
    pytest.skip(f"{what} is missing ({why})", allow_module_level=True)


def need_module(name: str):
    """The imported module `name` (a dev dependency: moto, s3fs, tensorboard), or `need`'s skip or failure."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(f"the module {name}", str(e), "install the dev extra (`make setup`)")

__all__ = ["ROOT", "free_port", "launch_cmd", "launch_env", "run_cli", "run_cli_process"]


# The files by the time their tests took (seconds, summed over the suite's 80 slowest in `pytest -n 2 --dist
# loadfile --durations=80`, AMD EPYC, 2 cores, idle; bench/results/test_suite.json, session_2026_12_07_c):
# distributed 314, object_store 204, bench 184, bench_accuracy 117, failures 114, train 111, epochs_per_decode 95,
# runs 68, config 45, ensemble 41, fuzz 31, teachers 31; the rest under 25. Since then failures' chaos test (87)
# is bench's chaos smoke, in place of a shorter one.
HEAVY_FIRST = ("test_distributed.py", "test_bench.py", "test_object_store.py", "test_bench_accuracy.py",
               "test_train.py", "test_epochs_per_decode.py", "test_runs.py", "test_config.py", "test_ensemble.py",
               "test_fuzz.py", "test_teachers.py", "test_failures.py", "test_cache.py")


def pytest_configure(config):
    """Under pytest-xdist (`make test`: one test process per core), each process's torch would start one OpenMP
    thread per core, and a thread waiting for a core spins: each process gets its share of the cores instead (one
    thread on 2 cores), set before any test module imports torch and inherited by the CLI processes tests start,
    as torchrun does for its ranks. Measured on 2 cores: the fast tier in 115 to 118 s with torch's default, 81 to
    85 s with this (bench/results/test_suite.json)."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        assert "torch" not in sys.modules, "torch was imported before the thread count was set"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


def pytest_collection_modifyitems(config, items):
    """In one process: slow tests (end-to-end runs) last, in their collected order, so one `pytest` run gives the
    fast tier's verdict first and builds each session fixture once for both tiers (a module's fast and slow
    tests are therefore apart, so the tests' expensive fixtures are session-scoped: a module-scoped one would be
    torn down after the module's fast tests and built again for its slow ones, and test_object_store's S3
    server restarted under the clients fsspec has cached).

    Under pytest-xdist (`make test`: `--dist loadfile`, whole files handed out in collected order), the heaviest
    files first: the processes then finish together, instead of one running a heavy file it got last while the
    other waits (measured: 15 min 03 s with the files in name order)."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    if os.environ.get("PYTEST_XDIST_WORKER"):
        def weight(item) -> int:
            name = item.path.name
            return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)
        items.sort(key=lambda item: (weight(item), slow(item)))  # stable: a file's tests stay in their order
    else:
        items.sort(key=slow)  # a stable sort


def pytest_terminal_summary(terminalreporter):
    """The property-based tests' case counts (tests/support/fuzz.py), per test: how many ran, how many were
    refused with one sentence and how many ran correctly."""
    fuzz = sys.modules.get("tests.support.fuzz")
    if fuzz is None or not fuzz.COUNTS:
        return
    total = sum(sum(c.values()) for c in fuzz.COUNTS.values())
    terminalreporter.section(f"fuzz cases: {total} (profile {fuzz.PROFILE})")
    for test, c in sorted(fuzz.COUNTS.items()):
        terminalreporter.write_line(f"{test}: {sum(c.values())} cases, {c['refused']} refused, {c['ok']} ran")


def refused(proc, *needles) -> str:
    """A refusal as the README promises it: exit status 2, one `error: <sentence>` line at the end of stderr
    naming every needle, no traceback. Returns the sentence."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, f"status {proc.returncode}:\n{text[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, text
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]}"
    return lines[-1]


def launch_cli(n: int, *args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """The real CLI on n real CPU ranks (tests/support/launch.py: torchrun with ACCELERATE_USE_CPU)."""
    return subprocess.run(launch_cmd(n, ROOT / "cli.py", *args), capture_output=True, text=True, timeout=timeout,
                          env=launch_env(env), cwd=ROOT)


PROBE = ROOT / "tests" / "support" / "probe_cli.py"


def probe_batches(probe: Path, *args, env=None, timeout=600) -> list[dict]:
    """Run the CLI as one process under tests/support/probe_cli.py (PROBE_BATCHES=1) and return every batch it
    stepped on (views, labels, indices, the first cache's joined targets), in order; the run must succeed."""
    import torch
    p = subprocess.run(launch_cmd(1, PROBE, *args), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env=launch_env({"PROBE_DIR": str(probe), "PROBE_BATCHES": "1", **(env or {})}))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return torch.load(probe / "batches-0.pt")


def stored_targets(store_path, epoch: int, index):
    """The cached teacher rows of samples `index` [B] in training epoch `epoch` (cached epoch epoch mod E), read
    straight from the store's arrays, as cache.targets.TeacherTargets of [B, ...]."""
    from cache.store import CacheStore
    from cache.targets import TeacherTargets
    store = CacheStore(store_path)
    rows = {n: store.read_all(n)[epoch % store.epochs, index] for n in store.held_names}
    return TeacherTargets.from_arrays(rows, len(store.description.tail_temperatures))


def units_written(store: Path) -> dict[int, int]:
    """unit -> how many of a local store's arrays hold a chunk for it (zarr 3 keys `<array>/c/0/<unit>...`; a
    `.partial` file, a write a kill cut short, is not a chunk)."""
    counts: dict[int, int] = {}
    for grid in (store.glob("*/c/0") if store.is_dir() else ()):
        for entry in grid.iterdir():
            if entry.name.isdigit():
                counts[int(entry.name)] = counts.get(int(entry.name), 0) + 1
    return counts


def marked_units(store: Path) -> set[int]:
    """The units a local store marks complete (`_units/shard-<unit>.json`)."""
    return {int(p.stem.split("-")[1]) for p in store.glob("_units/shard-*.json")}


def kill_inside_a_unit(args, stores, after: int = 0, slow: float = 0.1, timeout: float = 240) -> dict[Path, set[int]]:
    """Run `cli.py ARGS` as a real process (tests/support/chaos_cli.py: each zarr array write then sleeps `slow` s,
    which widens the window) and SIGKILL it, with no notice, as soon as one of `stores` has a unit with data
    written and no completion marker, once the first store marks `after` units complete. Returns each store's
    torn units (data written, no marker) after the kill."""
    import torch

    def torn() -> dict[Path, set[int]]:
        return {s: set(units_written(s)) - marked_units(s) for s in stores}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OFAKD_CHAOS_SLOW_WRITES": str(slow),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # a reference made in this process: same kernels
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "chaos_cli.py"), *map(str, args)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        while len(marked_units(stores[0])) < after or not any(torn().values()):
            assert proc.poll() is None, f"the run ended before a kill point: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() - t0 < timeout, "no unit write began in time"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    after = torn()
    assert any(after.values()), "the kill landed between units"
    return after


@contextmanager
def small_tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes (whole 4 KiB pages) mounted at `path` for the block: a disk that fills up for real
    (ENOSPC). Yields a function that resizes it (`mount -o remount`: space freed). Mounting needs root: elsewhere
    the test skips, or fails under OFAKD_REQUIRE_ALL=1 (`need`)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True) if os.geteuid() == 0 else None
    if mount is None or mount.returncode != 0:
        need("a tmpfs to fill", mount.stderr.strip() if mount else "mounting one needs root",
             "run the suite as root, as CI does")
    try:
        yield lambda n: subprocess.run(["mount", "-o", f"remount,size={n}", str(path)], check=True)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=7, size=(20, 16), seed=0) -> Path:
    """A small ImageFolder tree with real JPEG and PNG files of random content."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            Image.fromarray(arr).save(root / c / f"img{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "src")


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes under root."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def shared(root: Path):
    """Yield a session-wide artifact and check at the end that no test changed it: a test that must
    change one copies it first (shutil.copytree)."""
    digest = tree_digest(root)
    yield root
    assert tree_digest(root) == digest, f"a test changed the shared {root}; copy it before changing it"


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The embedded digits as shards (train 1437, val 360; 200 per shard). Shared: read-only."""
    from pipeline.shards import make_shards
    out = tmp_path_factory.mktemp("digits") / "data"
    make_shards("digits", out, progress=False)
    yield from shared(out)


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """A 6-shard slice of digits (48 per shard) for fast cache tests. Shared: read-only."""
    from pipeline.shards import digits_source, write_split
    classes, splits = digits_source()
    out = tmp_path_factory.mktemp("small") / "data"
    write_split(out, "train", classes, splits["train"][:270], name="digits-small", shard_size=48, progress=False)
    write_split(out, "val", classes, splits["val"][:96], name="digits-small", shard_size=48, progress=False)
    yield from shared(out)


SMALL_STORE = dict(teacher="test_resnet", recipe="digits-mix", epochs=2, topk=4, batch_size=40, workers=0)  # flag names


def cache_cfg(data, out, **kw):
    """The teacher-pass request of the shared small store (SMALL_STORE), with `kw` changed."""
    from cache.teacher_pass import CacheConfig
    from commands.options import build
    return build(CacheConfig, **{**dict(data=data, out=out, progress=False, **SMALL_STORE), **kw})


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a store, read whole: name -> array."""
    from cache.format import NAMES
    from cache.store import CacheStore
    store = CacheStore(path)
    return {name: store.read_all(name) for name in NAMES}


@pytest.fixture(scope="session")
def small_store(small_digits, tmp_path_factory) -> Path:
    """The teacher cache of small_digits (SMALL_STORE: a randomly initialised test_resnet, 2 epochs of digits-mix
    views, top-4) made by cache_teacher in this process: the reference store of test_cache, test_object_store
    and test_targets. Shared: read-only."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    out = tmp_path_factory.mktemp("small_store") / "teacher.zarr"
    cache_teacher(build(CacheConfig, data=small_digits, out=out, progress=False, **SMALL_STORE))
    yield from shared(out)


@pytest.fixture(scope="session")
def second_store(small_digits, tmp_path_factory) -> Path:
    """small_store's views (SMALL_STORE) with another teacher (a test_vit, top-3), made by its own single-teacher
    pass: the second member of the ensembles in test_ensemble and test_object_store. Shared: read-only."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    out = tmp_path_factory.mktemp("second_store") / "vit.zarr"
    kw = {**SMALL_STORE, "teacher": "test_vit", "model_kwargs": {"img_size": 32, "patch_size": 4}, "topk": 3}
    cache_teacher(build(CacheConfig, data=small_digits, out=out, progress=False, **kw))
    yield from shared(out)


def jpeg_bytes(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()
