"""Where OFA's loss terms pull the student: per block, the gradient of the final logits' terms and of the heads'.

    python bench/head_gradients.py --run RUN_DIR [--run RUN_DIR ...] [--batches 4] [--name head_gradients]

For each OFA run directory: its own options (its config.json, read as `--config` reads it), its stream and its
task (`students.stream.open_stream`, `students.run.build_task`: the code training runs), once as initialised and
once with the weights of its last saved state (state/epoch-N: after N + 1 epochs), on the first `--batches`
training batches of epoch 0 with their cached teacher targets. For each part of the bare student (embedding, each
block, the final norm and classifier) it records the norm of the gradient that the terms on the final logits send
there (the loss at --w-ofa 0: OFA, and CE in the released form), that of the heads' terms (the rest of the loss),
their ratio and their cosine. A post-hoc diagnostic of bench/plans/tiny50.yaml's ablation, not part of the
declared plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch
from common import inputs, md_table, save

from commands.options import flags_of, instantiate, resolve
from students.config import TrainConfig
from students.run import build_task
from students.stream import open_stream
from students.task import distill_losses


def part_of(name: str) -> str:
    """A bare student's parameter -> the part it belongs to: `blocks.3.attn.qkv.weight` -> `blocks.3`; an
    embedding (patch, position, class token, a CNN's stem) -> `embed`; the rest (norms, classifier) -> `final`."""
    m = re.match(r"(blocks|stages|layers|layer\d)\.(\d+)\.", name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return "embed" if re.match(r"patch_embed|pos_embed|cls_token|reg_token|stem|conv1|bn1", name) else "final"


def last_state(run: Path) -> Path | None:
    states = sorted((run / "state").glob("epoch-*"))
    return states[-1] if states else None


def gradients(task, batches: list[dict]) -> dict[str, dict]:
    """part -> {"final": |g|, "heads": |g|, "ratio": heads/final, "cosine": cos(g_final, g_heads)} over the
    batches (each batch's mean loss, summed). The loss's own code splits it: "final" is the loss with the heads'
    weight at 0 (every term on the final logits: OFA, and CE in the released form), "heads" the rest."""
    params = [(n, p) for n, p in task.student.model.named_parameters() if p.requires_grad]
    without_heads = dataclasses.replace(task.loss, w_ofa=0.0)
    g_final = [torch.zeros_like(p) for _, p in params]
    g_heads = [torch.zeros_like(p) for _, p in params]
    for batch in batches:
        out = task.student(task.student_input(batch["view"]))
        teacher = task.teacher_logits(batch)
        total = distill_losses(out, teacher, batch, task.loss, task.num_classes)["loss"]
        final = distill_losses(out, teacher, batch, without_heads, task.num_classes)["loss"]
        for acc, term in ((g_final, final), (g_heads, total - final)):
            grads = torch.autograd.grad(term, [p for _, p in params], retain_graph=True, allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a += g
    parts: dict[str, tuple[list, list]] = {}
    for (n, _), f, h in zip(params, g_final, g_heads, strict=True):
        fs, hs = parts.setdefault(part_of(n), ([], []))
        fs.append(f.flatten())
        hs.append(h.flatten())
    out = {}
    for part, (fs, hs) in parts.items():
        f, h = torch.cat(fs), torch.cat(hs)
        nf, nh = float(f.norm()), float(h.norm())
        out[part] = {"final": nf, "heads": nh, "ratio": nh / nf if nf else float("inf"),
                     "cosine": float(torch.dot(f, h) / (nf * nh)) if nf and nh else 0.0}
    return out


def measure(run: Path, batches_n: int) -> dict:
    flags = flags_of(TrainConfig)
    cfg = instantiate(TrainConfig, resolve(flags, {}, run / "config.json"), flags)
    stream_cfg, run_cfg = cfg.split()
    if run_cfg.loss.method != "ofa" or not stream_cfg.cache:
        raise SystemExit(f"{run} is not an OFA run from a cache (method {run_cfg.loss.method}); pass one")
    state = last_state(run)
    if state is None:
        raise SystemExit(f"{run} has no saved state (state/epoch-N); pass a run that finished an epoch")
    stream = open_stream(stream_cfg, 0, 1, say=lambda *a: None)
    batches = []
    for b in stream.views.loader(0, stream_cfg.batch_size, 0):
        batches.append(b)
        if len(batches) == batches_n:
            break
    task = build_task(run_cfg, stream, "cpu").train()
    at_init = gradients(task, batches)
    from safetensors.torch import load_file
    task.load_state_dict(load_file(state / "model.safetensors"))
    trained = gradients(task, batches)
    metrics = run / "metrics.json"  # a finished run's: which commit and configuration made it
    made = json.loads(metrics.read_text()).get("provenance", {}) if metrics.exists() else {}
    return {"run": str(run), "heads": task.student.names, "head_kind": task.student.kind,
            "w_ofa": run_cfg.loss.w_ofa, "state": state.name, "epochs_trained": int(state.name.split("-")[1]) + 1,
            "batches": len(batches),
            "batch_size": stream_cfg.batch_size, "run_made_by": made.get("code"),
            "config_hash": made.get("config_hash"),
            "inputs": inputs(state=state / "model.safetensors"),
            "init": at_init, "trained": trained}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, action="append", required=True, help="an OFA run directory (repeatable)")
    ap.add_argument("--batches", type=int, default=4, help="training batches of epoch 0 the gradients sum over")
    ap.add_argument("--name", default="head_gradients", help="the record's name in the results folder")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    res = {"runs": [measure(r, args.batches) for r in args.run]}
    save(args.name, res)
    return res


def table(record: dict) -> str:
    out = []
    for r in record["results"]["runs"]:
        head = (f"`{r['run']}`: {r['head_kind']} heads {', '.join(r['heads'])}, --w-ofa {r['w_ofa']}; "
                f"{r['batches']} training batches of {r['batch_size']}; trained: after {r['epochs_trained']} epochs.")
        rows = [[part, f"{r['init'][part]['ratio']:.2f}", f"{r['init'][part]['cosine']:+.2f}",
                 f"{r['trained'][part]['ratio']:.2f}", f"{r['trained'][part]['cosine']:+.2f}"]
                for part in r["init"]]
        out += [head, "", md_table(["part", "heads / final at init", "cosine at init", "heads / final trained",
                                    "cosine trained"], rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
