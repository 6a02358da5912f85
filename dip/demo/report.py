"""The verdict on a demo's runs, and its tables as Markdown."""
import json
from typing import List, Optional

import numpy as np

from .config import LAYOUT_POOL, LAYOUT_PSNR_MIN
from .metrics import MISPLACED_BY, PATCH_PSNR_MIN, spread

VERDICT_RULE = (f"a run (photo, seed) shows the paper's effect when, at the last checkpoint and on the median over "
                f"its samples (one per starting noise, the same noises for both models), both models' layout PSNR "
                f"is at least {LAYOUT_PSNR_MIN:g} dB (both drew the photo's layout and colours), DiP's PSNR is higher "
                f"than DiT-only's, and DiP's high-frequency ratio is closer to 1 than DiT-only's")
METRICS_DOC = {
    "psnr": "dB against the target; images in [-1, 1] mapped to [0, 1]",
    "layout_psnr": f"PSNR of sample and target average-pooled {LAYOUT_POOL}x{LAYOUT_POOL}: layout and colour",
    "hf_ratio": ("high-frequency share of the sample / that of the target; share = power of the mean-removed "
                 "per-channel 2D FFT at radius > 1/4 Nyquist (0.125 cycles/pixel) over the total power; < 1 blurrier "
                 "than the target, > 1 noisier"),
    "misplaced_patches": (f"16x16 patches of a sample under {PATCH_PSNR_MIN:g} dB against the target's patch at "
                          f"their place, or {MISPLACED_BY:g} dB closer to a target patch elsewhere"),
    "median": "each metric is the median over a checkpoint's samples, one per starting noise ('per_noise')",
}
MARGINS = ("psnr_margin", "hf_margin")


def final_metrics(run: dict, key: str) -> dict:
    checkpoints = run["models"][key]["checkpoints"]
    return checkpoints[max(checkpoints, key=int)]


def per_noise(metrics: dict, name: str) -> List[float]:
    """A checkpoint's per-sample values of a metric (one value where a results file kept one sample)."""
    return list(metrics.get("per_noise", {}).get(name, [metrics[name]]))


def judge(run: dict) -> dict:
    """The verdict on one run (VERDICT_RULE) with its margins at the last checkpoint, per noise and their
    spread: PSNR margin = DiP's PSNR - DiT-only's; HF margin = |DiT-only's HF ratio - 1| - |DiP's HF
    ratio - 1| (both positive when DiP is better; the two models start from the same noises, so the
    margin is taken noise by noise)."""
    dit, dip = final_metrics(run, "dit"), final_metrics(run, "dip")
    layout = min(dit["layout_psnr"], dip["layout_psnr"]) >= LAYOUT_PSNR_MIN
    psnr_margins = np.subtract(per_noise(dip, "psnr"), per_noise(dit, "psnr"))
    hf_margins = (np.abs(np.subtract(per_noise(dit, "hf_ratio"), 1)) - np.abs(np.subtract(per_noise(dip, "hf_ratio"), 1)))
    verdict = {"layout_converged": bool(layout)}
    for name, values in (("psnr_margin", psnr_margins), ("hf_margin", hf_margins)):
        verdict[name] = spread(values)["median"]
        verdict[f"{name}_spread"] = spread(values)
        verdict[f"{name}_per_noise"] = [float(v) for v in values]
    if "misplaced_patches" in dip:  # results files from before the patch count have none
        verdict["misplaced_patches"] = {key: int(sum(per_noise(final_metrics(run, key), "misplaced_patches")))
                                        for key in ("dit", "dip")}
    verdict["shows_effect"] = bool(layout and verdict["psnr_margin"] > 0 and verdict["hf_margin"] > 0)
    return verdict


def misplaced_sentence(runs: List[dict], named_up_to: int = 8) -> str:
    """Which final samples drew patches in the wrong place: per run and model the count, and each patch
    named by noise and (row, col) where there are at most ``named_up_to`` of them."""
    parts = []
    for run in runs:
        for key, entry in run["models"].items():
            wrong = final_metrics(run, key).get("misplaced", [])
            total, samples = sum(len(p) for p in wrong), sum(1 for p in wrong if p)
            if not total:
                continue
            text = f"{run['photo']} seed {run['seed']} {entry['name']}: {total} in {samples} of {len(wrong)} samples"
            if total <= named_up_to:
                text += " (" + "; ".join(f"noise {n} at " + ", ".join(f"({r},{c})" for r, c in p)
                                         for n, p in enumerate(wrong) if p) + ")"
            parts.append(text)
    if not parts:
        return "No final sample has a patch in the wrong place."
    return "Patches in the wrong place, (row, col), in the final samples: " + "; ".join(parts) + "."


def summarize(runs: List[dict]) -> dict:
    """Margins over the runs (the runs' medians: mean and worst; the per-noise values: lowest) and the
    verdict sentence."""
    verdicts = [run["verdict"] for run in runs]
    shown = [r for r, v in zip(runs, verdicts) if v["shows_effect"]]
    margins = {k: {"mean": float(np.mean([v[k] for v in verdicts])), "worst": float(min(v[k] for v in verdicts)),
                   "lowest_sample": float(min(v[f"{k}_spread"]["min"] for v in verdicts))} for k in MARGINS}
    label = lambda r: f"{r['photo']} seed {r['seed']}"  # noqa: E731
    noises = len(per_noise(final_metrics(runs[0], "dip"), "psnr"))
    if len(shown) == len(runs):
        sentence = (f"This run shows the paper's effect on all {len(runs)} runs, judged on the median of {noises} "
                    f"samples each: DiP beats DiT-only on PSNR (by a median of {margins['psnr_margin']['worst']:.2f} "
                    f"dB or more) and on the high-frequency ratio's distance from 1 (by "
                    f"{margins['hf_margin']['worst']:.3f} or more), both models on the photo's layout.")
    elif shown:
        missing = ", ".join(label(r) for r in runs if not r["verdict"]["shows_effect"])
        sentence = f"This run shows the paper's effect on {len(shown)} of {len(runs)} runs; not on {missing}."
    else:
        sentence = f"This run does not show the paper's effect on any of its {len(runs)} runs."
    return {"rule": VERDICT_RULE, "runs_showing_effect": len(shown), "runs": len(runs),
            "shows_effect": len(shown) == len(runs), "margins": margins, "sentence": sentence,
            "misplaced": misplaced_sentence(runs)}


def _range(metrics: dict, name: str, digits: int) -> str:
    values = per_noise(metrics, name)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.median(values):.{digits}f} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def _margin(verdict: dict, name: str, digits: int) -> str:
    s = verdict.get(f"{name}_spread")
    if s is None or s["min"] == s["max"]:
        return f"{verdict[name]:+.{digits}f}"
    return f"{s['median']:+.{digits}f} ({s['q25']:+.{digits}f} to {s['q75']:+.{digits}f})"


def checkpoint_table(report: dict) -> str:
    """Markdown: every run, model and checkpoint; the median over the samples, (lowest to highest)."""
    lines = ["| photo | seed | model | step | train loss | PSNR (dB) | layout PSNR (dB) | HF ratio | misplaced patches |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for entry in run["models"].values():
            for step, m in entry["checkpoints"].items():
                misplaced = sum(per_noise(m, "misplaced_patches")) if "misplaced_patches" in m else "-"
                lines.append(f"| {run['photo']} | {run['seed']} | {entry['name']} | {step} | {m['loss']:.3f} | "
                             f"{_range(m, 'psnr', 2)} | {_range(m, 'layout_psnr', 2)} | {_range(m, 'hf_ratio', 3)} | "
                             f"{misplaced} |")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """Markdown: one row per run at its last checkpoint (medians over the samples), the margins (median,
    (quartiles) over the samples), and the verdict."""
    lines = ["| photo | seed | PSNR DiT-only | PSNR DiP | HF ratio DiT-only | HF ratio DiP | PSNR margin | "
             "HF margin | misplaced patches DiT-only / DiP | layout (both) | shows the effect |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        dit, dip, v = final_metrics(run, "dit"), final_metrics(run, "dip"), run["verdict"]
        wrong = v.get("misplaced_patches")
        wrong = f"{wrong['dit']} / {wrong['dip']}" if wrong else "-"
        lines.append(f"| {run['photo']} | {run['seed']} | {dit['psnr']:.2f} | {dip['psnr']:.2f} | "
                     f"{dit['hf_ratio']:.3f} | {dip['hf_ratio']:.3f} | {_margin(v, 'psnr_margin', 2)} | "
                     f"{_margin(v, 'hf_margin', 3)} | {wrong} | "
                     f"{'yes' if v['layout_converged'] else 'no'} | {'yes' if v['shows_effect'] else 'no'} |")
    m = report["summary"]["margins"]
    lines.append(f"| mean | | | | | | {m['psnr_margin']['mean']:+.2f} | {m['hf_margin']['mean']:+.3f} | | | |")
    lines.append(f"| worst | | | | | | {m['psnr_margin']['worst']:+.2f} | {m['hf_margin']['worst']:+.3f} | | | |")
    return "\n".join(lines)


def run_facts(report: dict) -> str:
    """One line: what was run, on what, in how long."""
    c, t = report["config"], report["timing"]
    photos = ", ".join(dict.fromkeys(r["photo"] for r in report["runs"]))
    seeds = ", ".join(str(s) for s in dict.fromkeys(r["seed"] for r in report["runs"]))
    noises = c.get("noises", 1)
    cpu = f" ({t['cpu_model']})" if t.get("cpu_model") else ""
    return (f"{photos} at {c['image_size']}x{c['image_size']}, seeds {seeds}; {c['steps']} steps at batch "
            f"{c['batch_size']}, lr {c['lr']:g} ({c.get('lr_schedule', 'constant')} after {c['warmup_steps']} "
            f"warm-up steps), EMA {c['ema']:g}, a {c['hidden_size']}-wide {c['depth']}-block backbone"
            f"{_t_mean_text(c)}, Euler {c['sample_steps']} steps, {noises} sample{'s' * (noises > 1)} per "
            f"checkpoint; head backend {report['head_backend']}. {t['wall_seconds'] / 60:.1f} min wall, "
            f"{t['cpu_seconds']:.0f} CPU-s, in {t['jobs']} process(es) x {t['threads']} thread(s) on {t['cores']} "
            f"cores{cpu}{_load_text(t)}.")


def _t_mean_text(config: dict) -> str:
    t_mean = config.get("t_mean")
    return f", training times logit-normal with mean {t_mean:.2f}" if t_mean else ""


def _load_text(timing: dict) -> str:
    loads = timing.get("load_average")
    if not loads or None in loads:
        return ""
    return f", load average {loads[0]:.1f} before and {loads[1]:.1f} after"


def report_markdown(report: dict, checkpoints: bool = True) -> str:
    parts = [run_facts(report), ""]
    if checkpoints:
        parts += [checkpoint_table(report), ""]
    parts += [summary_table(report), "", report["summary"]["sentence"]]
    if "misplaced" in report["summary"]:
        parts += ["", report["summary"]["misplaced"]]
    return "\n".join(parts)


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if "runs" not in report or "summary" not in report:
        raise ValueError(f"{path!r} is not a dip-demo results file (no runs / summary)")
    return report


def readme_summary(report: dict, robustness: Optional[dict] = None) -> str:
    """3 to 6 lines for the README's front page: what the default demo showed, with its spread, and
    (given the robustness results) whether it held under other numerics."""
    s, c, t = report["summary"], report["config"], report["timing"]
    m = s["margins"]
    dip = [final_metrics(r, "dip")["psnr"] for r in report["runs"]]
    dit = [final_metrics(r, "dit")["psnr"] for r in report["runs"]]
    return "\n".join([
        f"`make demo` overfits one {c['image_size']}x{c['image_size']} photo with DiT-only and with DiP (same "
        f"backbone, {c['steps']} steps, {len(report['runs'])} seeds, {c.get('noises', 1)} "
        f"sample{'s' * (c.get('noises', 1) > 1)} per checkpoint; "
        f"about {t['cpu_seconds']:.0f} CPU-seconds).",
        f"Median PSNR at the last step: DiP {min(dip):.1f} to {max(dip):.1f} dB, DiT-only {min(dit):.1f} to "
        f"{max(dit):.1f} dB; DiP ahead by a median of {m['psnr_margin']['worst']:.1f} dB or more per seed "
        f"(single samples: {m['psnr_margin'].get('lowest_sample', m['psnr_margin']['worst']):+.1f} dB at worst).",
        f"Verdict: {'shows' if s['shows_effect'] else 'does not show'} the paper's effect on "
        f"{s['runs_showing_effect']} of {s['runs']} runs.{_robustness_sentence(robustness, c)} The digits differ "
        "between machines; see [docs/demo.md](docs/demo.md).",
    ])


def largest_move(rows: List[dict], margin: str = "psnr_margin") -> float:
    """How far a perturbation moved a median margin from the reference's, at most over the rows."""
    reference = {(r["photo"], r["seed"]): r[margin] for r in rows if r["perturbation"] == "reference"}
    return max((abs(r[margin] - reference[(r["photo"], r["seed"])]) for r in rows
                if r["perturbation"] != "reference"), default=0.0)


def _robustness_sentence(robustness: Optional[dict], config: dict) -> str:
    if robustness is None:
        return ""
    perturbed = [r for r in robustness["rows"] if r["perturbation"] != "reference"]
    verdict = sum(r["same_verdict"] for r in perturbed)
    spread_kept = sum(r["same_verdict"] and r["in_spread"] for r in perturbed)
    names = ", ".join(k for k in robustness["perturbations"] if k != "reference")
    which = "this configuration" if robustness.get("config") == config else "a reduced configuration"
    return (f" Under other numerics ({names}), {verdict} of {len(perturbed)} runs of {which} keep their verdict, "
            f"{spread_kept} of them with both margins inside the reference's spread; the median PSNR margins "
            f"moved by {largest_move(robustness['rows']):.1f} dB at most.")
