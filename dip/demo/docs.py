"""The demo's generated text: docs/demo.md's tables and the README's summary, rendered from the
committed results in docs/demo/ (dip.docs lists them with the other generated sections and writes
them; ``dip-demo --update-docs`` writes these)."""
import glob
import json
import os
from typing import Callable, List, Tuple

from .ablation import ABLATION_RESULTS, ablation_table
from .config import DOCS, REPO, RESULTS, ROBUSTNESS_RESULTS
from .report import load_report, readme_summary, report_markdown
from .robustness import robustness_table


def _relative(path: str) -> str:
    return os.path.relpath(path, REPO)


def committed_robustness() -> dict:
    with open(ROBUSTNESS_RESULTS) as f:
        return json.load(f)


def committed_ablation() -> dict:
    with open(ABLATION_RESULTS) as f:
        return json.load(f)


def committed_summary() -> str:
    """The README's summary of the committed default run and robustness table."""
    return readme_summary(load_report(RESULTS["default"]), committed_robustness())


RECIPE_SCAN = os.path.join(DOCS, "recipe-scan")
SCAN_STEPS = (100, 150, 175, 200, 300)
_RECIPE_KEYS = ("image_size", "t_mean", "lr", "warmup_steps", "ema")


def recipe_scan_table(reports: List[dict]) -> str:
    """Markdown: per recipe tried (one demo.json each), DiT-only's layout PSNR and DiP's PSNR at each
    checkpoint (the lower of the runs' medians: the verdict needs every run), and CPU-s per run."""
    lines = ["| image | t mean | lr | warm-up | EMA | " + " | ".join(f"step {s}: layout DiT-only / PSNR DiP"
                                                            for s in SCAN_STEPS) + " | CPU-s per run (steps) |",
             "|" + "---|" * (6 + len(SCAN_STEPS))]
    for report in sorted(reports, key=lambda r: [r["config"][k] for k in _RECIPE_KEYS] + [r["config"]["steps"]]):
        c = report["config"]
        cells = []
        for step in SCAN_STEPS:
            metrics = [run["models"][key]["checkpoints"].get(str(step)) for run in report["runs"] for key in ("dit", "dip")]
            if None in metrics:
                cells.append("")
                continue
            layout = min(m["layout_psnr"] for m in metrics[0::2])
            dip = min(m["psnr"] for m in metrics[1::2])
            cells.append(f"{layout:.1f} / {dip:.1f}")
        per_run = report["timing"]["cpu_seconds"] / len(report["runs"])
        lines.append(f"| {c['image_size']} | {c['t_mean']:+.1f} | {c['lr']:g} | {c['warmup_steps']} | {c['ema']:g} | "
                     + " | ".join(cells) + f" | {per_run:.0f} ({c['steps']}) |")
    return "\n".join(lines)


def committed_recipe_scan() -> str:
    paths = sorted(glob.glob(os.path.join(RECIPE_SCAN, "*", "demo.json")))
    return recipe_scan_table([load_report(p) for p in paths])


def _report_section(name: str) -> Callable[[], str]:
    return lambda: report_markdown(load_report(RESULTS[name]), checkpoints=name == "default")


# (marker name, the file it lives in, the results it is rendered from, renderer), for dip.docs
SECTIONS: List[Tuple[str, str, List[str], Callable[[], str]]] = [
    ("demo default", "docs/demo.md", [_relative(RESULTS["default"])], _report_section("default")),
    ("demo robustness", "docs/demo.md", [_relative(ROBUSTNESS_RESULTS)],
     lambda: robustness_table(committed_robustness())),
    ("demo recipe scan", "docs/demo.md", [_relative(RECIPE_SCAN)], committed_recipe_scan),
    ("demo thorough", "docs/demo.md", [_relative(RESULTS["thorough"])], _report_section("thorough")),
    ("demo ablation", "docs/demo.md", [_relative(ABLATION_RESULTS)], lambda: ablation_table(committed_ablation())),
    ("ablation summary", "README.md", [_relative(ABLATION_RESULTS)], lambda: ablation_table(committed_ablation())),
    ("demo summary", "README.md", [_relative(RESULTS["default"]), _relative(ROBUSTNESS_RESULTS)], committed_summary),
]
