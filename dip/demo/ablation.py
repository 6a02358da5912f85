"""The paper's head ablation (its Table 2) as a proxy a CPU can run: the demo's single-photo experiment
once per output head, on the same backbone, the same initial backbone weights, the same noise and time
draws and the same steps (``dip-demo --heads none,mlp,coord_mlp,attention,patch_detailer``).

What it measures: how well each head renders detail the model has memorised from one photo (PSNR, the
layout PSNR, the high-frequency ratio and misplaced patches of samples from several noises). What the
paper measures is FID over 50,000 samples of a model trained on ImageNet: how well a head generalises
across images. The two need not agree; the real comparison is each head's ``dip-train`` recipe
(``configs/ablation/``, the GPU-hours in docs/ablation.md)."""
import os
import time
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import write_json
from ..models import HEAD_ABLATION
from .config import DOCS, DemoConfig
from .experiment import build_demo_model, train_and_sample
from .metrics import METRICS, load_target, noise_metrics, source_name
from .runner import config_dict, cpu_model, head_implementation, in_process_settings, usable_cores, worker_setup

ABLATION_HEADS = tuple(HEAD_ABLATION)  # the paper's Table 2, in its order
HEAD_LABELS = {head: label for head, (label, _) in HEAD_ABLATION.items()}
PAPER_FID = {head: fid for head, (_, fid) in HEAD_ABLATION.items()}
# the ablation's default runs: 3 photos x 2 seeds, the final checkpoint only (no curves)
ABLATION_PHOTOS = ("astronaut", "coffee", "chelsea")
ABLATION_RESULTS = os.path.join(DOCS, "ablation", "ablation.json")


def ablation_config(cfg: DemoConfig, photos_given: bool) -> DemoConfig:
    """The demo configuration for the ablation: the bundled ABLATION_PHOTOS unless photos were given,
    sampled at the last step only."""
    photos = cfg.photos if photos_given or cfg.image is not None else ABLATION_PHOTOS
    return replace(cfg, photos=photos, checkpoints=(cfg.steps,)).validate()


def head_parameters(cfg: DemoConfig, head: str) -> int:
    return sum(p.numel() for p in build_demo_model(cfg, head).head.parameters())


def run_head(cfg: DemoConfig, source: str, seed: int, head: str) -> dict:
    """One (photo, seed, head): train, sample the final checkpoint, measure."""
    cpu0 = time.process_time()
    target = load_target(cfg.image_size, source)
    result = train_and_sample(cfg, head, target, seed)
    final = result["checkpoints"][cfg.steps]
    metrics = noise_metrics(final["samples"], target)
    metrics.pop("misplaced")  # the counts stay in per_noise["misplaced_patches"]
    return {"photo": source_name(source), "seed": seed, "head": head, "loss": final["loss"], **metrics,
            "train_cpu_seconds_per_step": result["train_cpu_seconds"] / cfg.steps,
            "cpu_seconds": time.process_time() - cpu0}


def _tasks(cfg: DemoConfig, heads: Sequence[str]) -> List[Tuple[str, int, str]]:
    return [(src, seed, head) for src in cfg.sources() for seed in cfg.seeds for head in heads]


def _run_tasks(cfg: DemoConfig, tasks, jobs: int, threads: int) -> List[dict]:
    bar = tqdm(total=len(tasks), desc="ablation runs", disable=not cfg.progress, dynamic_ncols=True)
    try:
        if jobs == 1:
            results = []
            with in_process_settings(threads, cfg.resolved_head_backend()):
                for task in tasks:
                    results.append(run_head(cfg, *task))
                    bar.update()
            return results
        ctx = torch.multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, initializer=worker_setup, initargs=(threads, cfg.resolved_head_backend(), None)) as pool:
            pending = [pool.apply_async(run_head, (replace(cfg, progress=False), *task),
                                        callback=lambda _: bar.update()) for task in tasks]
            return [p.get() for p in pending]
    finally:
        bar.close()


def run_ablation(cfg: DemoConfig, heads: Sequence[str] = ABLATION_HEADS) -> dict:
    """Every head on every (photo, seed); writes ablation.json into cfg.out and returns it."""
    cfg.validate()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    tasks = _tasks(cfg, heads)
    jobs = min(cfg.jobs or usable_cores(), len(tasks))
    threads = cfg.threads or max(1, usable_cores() // jobs)
    rows = _run_tasks(cfg, tasks, jobs, threads)
    report = {"config": config_dict(cfg), "heads": list(heads), "head_backend": head_implementation(cfg),
              "torch": torch.__version__, "rows": rows,
              "head_parameters": {h: head_parameters(cfg, h) for h in heads},
              "paper_fid": {h: PAPER_FID[h] for h in heads if h in PAPER_FID}}
    report["summary"] = summarize(report)
    report["timing"] = {"wall_seconds": time.perf_counter() - wall0,
                        "cpu_seconds": time.process_time() - cpu0 + (sum(r["cpu_seconds"] for r in rows) if jobs > 1 else 0.0), "jobs": jobs, "threads": threads,
                        "cores": usable_cores(), "cpu_model": cpu_model()}
    write_json(os.path.join(cfg.out, "ablation.json"), report)
    return report


def _per_run(rows: List[dict], metric: str) -> Dict[Tuple[str, int], Dict[str, float]]:
    runs: Dict[Tuple[str, int], Dict[str, float]] = {}
    for r in rows:
        runs.setdefault((r["photo"], r["seed"]), {})[r["head"]] = r[metric]
    return runs


def summarize(report: dict) -> dict:
    """Per head the median over runs (photo, seed) of each metric's per-run median, its range, the runs
    in which the head drew the best PSNR, and its training CPU time per step; then the paper's three
    claims, each as the numbers that decide it."""
    heads, rows = report["heads"], report["rows"]
    by_head = {h: [r for r in rows if r["head"] == h] for h in heads}
    psnr = _per_run(rows, "psnr")
    best = [max(scores, key=scores.get) for scores in psnr.values()]
    per_head = {}
    for h in heads:
        entry = {m: float(np.median([r[m] for r in by_head[h]])) for m in METRICS}
        entry["psnr_range"] = [min(r["psnr"] for r in by_head[h]), max(r["psnr"] for r in by_head[h])]
        entry["misplaced_patches_total"] = int(sum(sum(r["per_noise"]["misplaced_patches"]) for r in by_head[h]))
        entry["best_psnr_runs"] = best.count(h)
        entry["train_cpu_seconds_per_step"] = float(np.median([r["train_cpu_seconds_per_step"] for r in by_head[h]]))
        per_head[h] = entry
    summary = {"runs": len(psnr), "samples_per_run": len(rows[0]["per_noise"]["psnr"]), "per_head": per_head}
    summary["claims"] = _claims(heads, psnr, per_head)
    return summary


def _difference(psnr, a: str, b: str) -> Dict[str, float]:
    """Head a's PSNR minus head b's, run by run: the median, the range, and in how many runs a is ahead."""
    d = [scores[a] - scores[b] for scores in psnr.values()]
    return {"median": float(np.median(d)), "min": float(min(d)), "max": float(max(d)),
            "runs_ahead": int(sum(v > 0 for v in d)), "runs": len(d)}


def _claims(heads, psnr, per_head) -> List[dict]:
    """The paper's ordering (Table 2) as three checks on this proxy, each with its numbers."""
    claims = []
    if {"patch_detailer"} < set(heads):
        others = max((h for h in heads if h != "patch_detailer"), key=lambda h: per_head[h]["psnr"])
        d = _difference(psnr, "patch_detailer", others)
        claims.append({"claim": "the conv U-Net (Patch Detailer Head) is the best head",
                       "holds": per_head["patch_detailer"]["best_psnr_runs"] == len(psnr),
                       "detail": f"best PSNR in {per_head['patch_detailer']['best_psnr_runs']} of {len(psnr)} runs; "
                                 f"{d['median']:+.2f} dB (median over runs) ahead of the next head, "
                                 f"{HEAD_LABELS[others]}"})
    if {"mlp", "none"} <= set(heads):
        d = _difference(psnr, "mlp", "none")
        claims.append({"claim": "the standard MLP head is no better than none (DiT-only)",
                       "holds": d["median"] <= 0,
                       "detail": f"MLP minus DiT-only: {d['median']:+.2f} dB median ({d['min']:+.2f} to "
                                 f"{d['max']:+.2f}), ahead in {d['runs_ahead']} of {d['runs']} runs"})
    if {"coord_mlp", "patch_detailer"} <= set(heads):
        d = _difference(psnr, "coord_mlp", "patch_detailer")
        rest = [h for h in heads if h not in ("coord_mlp", "patch_detailer")]
        second = all(per_head["coord_mlp"]["psnr"] >= per_head[h]["psnr"] for h in rest)
        claims.append({"claim": "the coordinate MLP comes close to the conv U-Net, ahead of the other heads",
                       "holds": second,
                       "detail": f"coordinate MLP minus conv U-Net: {d['median']:+.2f} dB median ({d['min']:+.2f} "
                                 f"to {d['max']:+.2f}); {'ahead of' if second else 'not ahead of'} "
                                 f"{', '.join(HEAD_LABELS[h] for h in rest)} on the median"})
    return claims


def ablation_table(report: dict) -> str:
    """The Markdown table and the paper's claims checked, for docs/demo.md and the README."""
    c, s, t = report["config"], report["summary"], report["timing"]
    photos = ", ".join(c["photos"]) if c.get("image") is None else os.path.basename(c["image"])
    lines = [f"{len(s['per_head'])} heads x {s['runs']} runs ({photos}; seeds "
             f"{', '.join(str(v) for v in c['seeds'])}) at {c['image_size']}x{c['image_size']}, {c['steps']} steps at "
             f"batch {c['batch_size']}, each final checkpoint sampled from {s['samples_per_run']} noises; "
             f"{t['cpu_seconds']:.0f} CPU-s on {t['cpu_model']}. Per head: the median over runs of each run's median "
             "over its samples; PSNR's range over runs in brackets.", "",
             "| head | paper FID (Table 2) | head parameters | PSNR (dB) | layout PSNR (dB) | HF ratio | misplaced "
             "patches (all samples) | best PSNR in runs | training CPU-s per step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for h in report["heads"]:
        e = s["per_head"][h]
        fid = report["paper_fid"].get(h)
        lines.append(f"| {HEAD_LABELS.get(h, h)} | {'-' if fid is None else f'{fid:.2f}'} | "
                     f"{report['head_parameters'][h]:,} | {e['psnr']:.2f} ({e['psnr_range'][0]:.2f} to "
                     f"{e['psnr_range'][1]:.2f}) | {e['layout_psnr']:.2f} | {e['hf_ratio']:.3f} | "
                     f"{e['misplaced_patches_total']} | {e['best_psnr_runs']} of {s['runs']} | "
                     f"{e['train_cpu_seconds_per_step']:.3f} |")
    lines.append("")
    for claim in s["claims"]:
        lines.append(f"- Paper: {claim['claim']}. Here: **{'holds' if claim['holds'] else 'does not hold'}** "
                     f"({claim['detail']}).")
    return "\n".join(lines)
