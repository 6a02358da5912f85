"""The demo under other numerics: what differs between two machines (the thread count, the head's
backend, the last bit of a weight) must not change the verdict, and the margins must stay within the
spread the demo reports over its samples."""
import os
import time
from dataclasses import replace
from typing import Dict, List, Optional

from ..checkpoint import write_json
from .config import REFERENCE, DemoConfig
from .report import final_metrics, largest_move, load_report
from .runner import config_dict, cpu_model, run_demo

# name: (what it changes, DemoConfig overrides). "reference" is the configuration as given.
PERTURBATIONS = {
    "reference": ("the configuration as given (oneDNN head, one thread per worker process)", {}),
    "2 threads": ("one process with 2 threads: other reduction orders in the matrix products", dict(jobs=1, threads=2)),
    "reference head": ("the head's reference implementation in place of the oneDNN one", dict(head_backend=REFERENCE)),
    "1-ulp weights": ("every initial weight moved 1 float32 ulp away from zero", dict(init_ulps=1)),
}
MARGIN_NAMES = ("psnr_margin", "hf_margin")


def _rows(name: str, report: dict) -> List[dict]:
    rows = []
    for run in report["runs"]:
        v = run["verdict"]
        row = {"perturbation": name, "photo": run["photo"], "seed": run["seed"], "shows_effect": v["shows_effect"],
               "dit_psnr": final_metrics(run, "dit")["psnr"], "dip_psnr": final_metrics(run, "dip")["psnr"],
               "misplaced_patches": v["misplaced_patches"]}
        for margin in MARGIN_NAMES:
            row[margin] = v[margin]
            row[f"{margin}_spread"] = v[f"{margin}_spread"]
        rows.append(row)
    return rows


def check(rows: List[dict]) -> List[dict]:
    """Each perturbed row against the reference row of its (photo, seed): the same verdict, and each
    median margin inside the reference's spread over its samples (lowest to highest; also noted:
    inside the quartiles). Adds "same_verdict", "in_spread", "in_quartiles" to every row."""
    reference = {(r["photo"], r["seed"]): r for r in rows if r["perturbation"] == "reference"}
    for row in rows:
        ref = reference[(row["photo"], row["seed"])]
        row["same_verdict"] = row["shows_effect"] == ref["shows_effect"]
        row["in_spread"] = all(ref[f"{m}_spread"]["min"] <= row[m] <= ref[f"{m}_spread"]["max"] for m in MARGIN_NAMES)
        row["in_quartiles"] = all(ref[f"{m}_spread"]["q25"] <= row[m] <= ref[f"{m}_spread"]["q75"]
                                  for m in MARGIN_NAMES)
    return rows


def _finished(cfg: DemoConfig, folder: str) -> Optional[dict]:
    """The demo.json already in folder when it is this configuration's run (the perturbations can run
    side by side as separate dip-demo commands; --robustness then only collects them)."""
    path = os.path.join(folder, "demo.json")
    if not os.path.exists(path):
        return None
    report = load_report(path)
    timing = report["timing"]
    same_processes = all(getattr(cfg, k) in (0, timing[k]) for k in ("jobs", "threads"))
    return report if report["config"] == config_dict(cfg) and same_processes else None


def run_robustness(cfg: DemoConfig, perturbations: Dict[str, tuple] = PERTURBATIONS) -> dict:
    """The demo of ``cfg`` once per perturbation (each in cfg.out/<name>/, reused when it is there),
    and robustness.json in cfg.out."""
    wall0, rows, cpu, demos = time.perf_counter(), [], {}, {}
    for name, (_, overrides) in perturbations.items():
        folder = os.path.join(cfg.out, name.replace(" ", "-"))
        perturbed = replace(cfg, **overrides, out=folder).validate()
        report = _finished(perturbed, folder) or run_demo(perturbed)
        rows += _rows(name, report)
        cpu[name] = report["timing"]["cpu_seconds"]
        demos[name] = os.path.join(os.path.basename(folder), "demo.json")
    rows = check(rows)
    perturbed = [r for r in rows if r["perturbation"] != "reference"]
    result = {"config": config_dict(cfg), "perturbations": {k: v[0] for k, v in perturbations.items()},
              "rows": rows, "demos": demos,
              "holds": all(r["same_verdict"] and r["in_spread"] for r in perturbed),
              "timing": {"wall_seconds": time.perf_counter() - wall0, "cpu_seconds": cpu, "cpu_model": cpu_model()}}
    write_json(os.path.join(cfg.out, "robustness.json"), result)
    return result


def _margin(row: dict, name: str, digits: int) -> str:
    s = row[f"{name}_spread"]
    return f"{row[name]:+.{digits}f} ({s['min']:+.{digits}f} to {s['max']:+.{digits}f})"


def _configuration(config: dict) -> str:
    default = config == config_dict(DemoConfig().validate())
    seeds = sorted({s for s in config["seeds"]})
    return (f"{'The default configuration' if default else 'A reduced configuration, not the default'}: "
            f"{', '.join(config['photos'])} at {config['image_size']}x{config['image_size']}, a "
            f"{config['hidden_size']}-wide {config['depth']}-block backbone, {config['steps']} steps at batch "
            f"{config['batch_size']}, {config['noises']} samples per checkpoint, seeds {', '.join(map(str, seeds))}.")


def robustness_table(result: dict) -> str:
    """Markdown: the configuration; per perturbation and run, the medians, the margins (median (lowest to
    highest sample)), the verdict and whether it and the margins agree with the reference; one sentence."""
    lines = [_configuration(result["config"]), "", "| numerics | photo | seed | PSNR DiT-only | PSNR DiP | PSNR margin | HF margin | misplaced DiT-only / DiP | "
             "shows the effect | same verdict, margins in the reference's spread |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        agrees = "(reference)" if r["perturbation"] == "reference" else (
            "yes" if r["same_verdict"] and r["in_spread"] else "no")
        lines.append(f"| {r['perturbation']} | {r['photo']} | {r['seed']} | {r['dit_psnr']:.2f} | {r['dip_psnr']:.2f} | "
                     f"{_margin(r, 'psnr_margin', 2)} | {_margin(r, 'hf_margin', 3)} | "
                     f"{r['misplaced_patches']['dit']} / {r['misplaced_patches']['dip']} | "
                     f"{'yes' if r['shows_effect'] else 'no'} | {agrees} |")
    perturbed = [r for r in result["rows"] if r["perturbation"] != "reference"]
    quartiles = sum(r["in_quartiles"] for r in perturbed)
    cpu = sum(result["timing"]["cpu_seconds"].values())
    lines += ["", (f"{'Holds' if result['holds'] else 'Does not hold'}: {sum(r['same_verdict'] for r in perturbed)} of "
                   f"{len(perturbed)} perturbed runs keep the reference's verdict and "
                   f"{sum(r['in_spread'] for r in perturbed)} of {len(perturbed)} keep both median margins inside "
                   f"the reference's spread over its samples ({quartiles} of {len(perturbed)} inside its quartiles); "
                   f"the median PSNR margins moved by {largest_move(result['rows']):.2f} dB at most. "
                   f"{cpu:.0f} CPU-s in all on {result['timing']['cpu_model']}.")]
    return "\n".join(lines)
