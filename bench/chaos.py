"""Kill-and-resume chaos: SIGKILL `cache-teacher` and `train-student` at random moments, resume, and
check the result is bit-identical to an uninterrupted run.

    python bench/chaos.py [--kills 5] [--stage-two-kills N] [--rounds 3] [--processes 1 2] [--stages one two]
                          [--seed 0] [--samples 600] [--save]

Stage one: each round starts the teacher pass, kills it `--kills` times at random moments (with
writes slowed by OFAKD_CHAOS_SLOW_WRITES so that kills land inside unit writes), then lets it finish
and compares every array and every completion marker with an uninterrupted reference. With
`--processes 2` the pass runs on two real CPU ranks (torchrun, tests/support/launch.py), one rank is killed
(torchrun stops the other), and the number of rank processes running at each kill is recorded and checked.
Stage two: kills `train-student` mid-epoch (`--stage-two-kills` times, default `--kills`), reruns with
`--resume`, compares the exported weights and metrics with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.format import NAMES  # noqa: E402
from cache.store import CacheStore  # noqa: E402
from tests.support.launch import launch_cmd, launch_env  # noqa: E402


def make_data(root: Path, samples: int) -> Path:
    """The first `samples` training digits (and a fifth as many for validation), 30 a shard."""
    from pipeline.shards import digits_source, write_split
    classes, splits = digits_source()
    out = root / "data"
    write_split(out, "train", classes, splits["train"][:samples], name="chaos", shard_size=30, progress=False)
    write_split(out, "val", classes, splits["val"][:max(samples // 5, 30)], name="chaos", shard_size=30,
                progress=False)
    return out


def cli_cmd(processes: int, *args) -> list[str]:
    """The CLI (with fault injection: tests/support/chaos_cli.py) on `processes` real CPU ranks
    (tests/support/launch.py; `accelerate launch --cpu` would start one)."""
    return launch_cmd(processes, ROOT / "tests" / "support" / "chaos_cli.py", *args)


def env(slow: float = 0.0) -> dict:
    e = launch_env()
    if slow:
        e["OFAKD_CHAOS_SLOW_WRITES"] = str(slow)
    return e


def cache_args(data: Path, out: Path) -> list:
    return ["cache-teacher", "--data", data, "--teacher", "test_resnet", "--recipe", "digits-mix", "--epochs", 3,
            "--topk", 5, "--batch-size", 50, "--workers", 0, "--out", out, "--quiet"]


def store_state(path: Path, since: float = 0.0) -> dict:
    """Completion, and whether a unit without its marker got data written after `since` (a kill that
    landed inside a unit write)."""
    if not (path / "zarr.json").exists():
        return {"done": 0, "mid_write": False, "partial_files": 0}
    store = CacheStore(path)
    done = store.done_units()
    mid = False
    group = store._open()
    for name in NAMES:
        arr = group[name]
        for u in set(range(store.num_units)) - done:
            f = path / name / arr.metadata.encode_chunk_key((0, u) + (0,) * (arr.ndim - 2))
            if f.exists() and f.stat().st_mtime > since:
                mid = True
    partial = len(list(path.rglob("*.partial")))
    return {"done": len(done), "mid_write": mid, "partial_files": partial}


def newest_data_write(path: Path) -> float:
    times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file() and "_units" not in p.parts
             and p.name != "zarr.json"] if path.exists() else []
    return max(times, default=0.0)


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's rank processes (from each child's RANK variable)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        try:
            env = dict(v.split(b"=", 1) for v in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


def kill_tree(proc: subprocess.Popen, victim: str) -> int:
    """SIGKILL the job ("all") or one random rank of it ("one-worker"; torchrun then stops the others).
    Returns how many rank processes were running at the kill (the evidence that N ranks ran)."""
    ranks = rank_pids(proc) if victim == "one-worker" else {}
    if ranks:
        os.kill(ranks[random.choice(sorted(ranks))], signal.SIGKILL)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job
    except ProcessLookupError:
        pass
    proc.wait()
    return len(ranks)


def compare_stores(a: Path, b: Path) -> list[str]:
    sa, sb = CacheStore(a), CacheStore(b)
    problems = [f"array {n} differs" for n in NAMES if not np.array_equal(sa.read_all(n), sb.read_all(n))]
    if sa.done_units() != sb.done_units():
        problems.append("completion markers differ")
    for u in sa.done_units() & sb.done_units():
        if sa.unit_info(u) != sb.unit_info(u):
            problems.append(f"marker of unit {u} differs")
    return problems


def chaos_stage_one(data: Path, work: Path, kills: int, processes: int, ref: Path) -> dict:
    out = work / f"chaos-{processes}p.zarr"
    shutil.rmtree(out, ignore_errors=True)
    points = []
    while len(points) < kills:
        proc = subprocess.Popen(cli_cmd(processes, *cache_args(data, out)), env=env(slow=0.04),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # wait until this run writes unit data, then kill at a random moment (mostly inside a unit write)
        t0 = time.time()
        while newest_data_write(out) <= t0 and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.6))
        finished = proc.poll() is not None
        ranks = 0
        if not finished:
            ranks = kill_tree(proc, "one-worker" if processes > 1 else "all")
            if processes > 1 and ranks != processes:
                return {"ok": False, "error": f"{ranks} rank processes were running, expected {processes}",
                        "kill_points": points}
        state = store_state(out, since=t0)
        points.append({"after_s": round(time.time() - t0, 2), "killed": not finished, "ranks_running": ranks,
                       **state})
        if finished or state["done"] == CacheStore(out).num_units:
            break
    done = subprocess.run(cli_cmd(processes, *cache_args(data, out)), env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-2000:], "kill_points": points}
    problems = compare_stores(ref, out)
    return {"ok": not problems, "problems": problems, "kill_points": points,
            "kills_mid_write": sum(p["mid_write"] for p in points)}


def chaos_stage_two(data: Path, work: Path, store: Path, kills: int) -> dict:
    def args(out):
        return ["train-student", "--data", data, "--student", "test_convnext", "--method", "ofa", "--cache", store,
                "--epochs", 4, "--batch-size", 40, "--workers", 0, "--out", out, "--quiet"]
    ref = work / "train-ref"
    shutil.rmtree(ref, ignore_errors=True)
    r = subprocess.run(cli_cmd(1, *args(ref)), env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        return {"ok": False, "error": r.stderr[-2000:]}
    epoch_s = max(0.5, np.mean([h["train_seconds"] for h in json.loads((ref / "metrics.json").read_text())["history"]]))
    out = work / "train-chaos"
    shutil.rmtree(out, ignore_errors=True)
    points, startup = [], 5.0
    for _ in range(kills):
        resume = ["--resume"] if (out / "progress.json").exists() else []
        proc = subprocess.Popen(cli_cmd(1, *args(out), *resume), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()  # a fresh run trains once it has written config.json; a resumed one rewrites nothing, so
        if resume:  # it is given the start-up a fresh run took; then kill within ~2 epochs
            while proc.poll() is None and time.time() - t0 < startup:
                time.sleep(0.05)
        else:
            while not ((out / "config.json").exists() and (out / "config.json").stat().st_mtime > t0) \
                    and proc.poll() is None and time.time() - t0 < 120:
                time.sleep(0.05)
            startup = time.time() - t0
        if random.random() < 0.5:  # kill inside this run's first epoch ...
            time.sleep(random.uniform(0.2, epoch_s))
        else:  # ... or inside the epoch after this run has saved one (so resume starts mid-run)
            prog = out / "progress.json"
            while not (prog.exists() and prog.stat().st_mtime > t0) and proc.poll() is None \
                    and time.time() - t0 < 300:
                time.sleep(0.05)
            time.sleep(random.uniform(0.1, epoch_s))
        finished = proc.poll() is not None
        if not finished:
            kill_tree(proc, "all")
        prog = json.loads((out / "progress.json").read_text())["epoch"] + 1 if (out / "progress.json").exists() else 0
        points.append({"killed": not finished, "after_s": round(time.time() - t0, 2), "epochs_saved": prog})
        if finished:
            break
    if not (out / "metrics.json").exists():
        r = subprocess.run(cli_cmd(1, *args(out), "--resume"), env=env(), capture_output=True, text=True)
        if r.returncode != 0:
            return {"ok": False, "error": r.stderr[-2000:], "kill_points": points}
    from safetensors.numpy import load_file
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    same_w = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    same_m = [h["top1"] for h in ma["history"]] == [h["top1"] for h in mb["history"]] and \
        [h["train/loss"] for h in ma["history"]] == [h["train/loss"] for h in mb["history"]]
    return {"ok": same_w and same_m, "weights_identical": same_w, "metrics_identical": same_m, "kill_points": points}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs of the teacher pass per round and process count")
    ap.add_argument("--stage-two-kills", type=int, default=None,
                    help="SIGKILLs of train-student per round (default: --kills)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", nargs="+", default=["one", "two"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=600, help="training images (digits, 30 a shard)")
    ap.add_argument("--save", action="store_true", help="write chaos.json to bench/results (or $OFAKD_BENCH_RESULTS)")
    args = ap.parse_args(argv)
    two_kills = args.kills if args.stage_two_kills is None else args.stage_two_kills
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    report = {"rounds": []}
    try:
        data = make_data(work, args.samples)
        ref = work / "ref.zarr"
        subprocess.run(cli_cmd(1, *cache_args(data, ref)), env=env(), check=True, capture_output=True)
        for r in range(args.rounds):
            rnd = {}
            if "one" in args.stages:
                for p in args.processes:
                    rnd[f"stage_one_{p}p"] = chaos_stage_one(data, work, args.kills, p, ref)
                    print(f"round {r + 1} stage one, {p} process(es): {json.dumps(rnd[f'stage_one_{p}p'])}")
            if "two" in args.stages:
                rnd["stage_two"] = chaos_stage_two(data, work, ref, two_kills)
                print(f"round {r + 1} stage two: {json.dumps(rnd['stage_two'])}")
            report["rounds"].append(rnd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["ok"] = all(v["ok"] for rnd in report["rounds"] for v in rnd.values())
    print("CHAOS", "PASSED" if report["ok"] else "FAILED")
    if args.save:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import save
        save("chaos", report)
    return report


def table(record: dict) -> str:
    from common import fmt, md_table
    rows = []
    for i, rnd in enumerate(record["results"]["rounds"], 1):
        for stage, v in rnd.items():
            points = v.get("kill_points", [])
            identical = v["ok"] if stage.startswith("stage_one") else \
                f"weights {fmt(v.get('weights_identical'))}, metrics {fmt(v.get('metrics_identical'))}"
            rows.append([i, stage, sum(p["killed"] for p in points), v.get("kills_mid_write"),
                         max((p.get("ranks_running", 0) for p in points), default=0) or None, identical,
                         "; ".join(v.get("problems", [])) or " ".join(v.get("error", "").split()[-30:])])
    verdict = "PASSED" if record["results"]["ok"] else "FAILED"
    return (f"Every resumed result against an uninterrupted run: {verdict} (target: bit-identical in every round)."
            "\n\n" + md_table(["round", "stage", "kills", "kills inside a unit write", "ranks running at a kill",
                               "identical", "problems"], rows))


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
