"""The demo's generated text: docs/demo.md's tables and the README's summary, rendered from the
committed results in docs/demo/ (dip.docs lists them with the other generated sections and writes
them; ``dip-demo --update-docs`` writes these)."""
import json
import os
from typing import Callable, List, Tuple

from .ablation import ABLATION_RESULTS, ablation_table
from .config import REPO, RESULTS, ROBUSTNESS_RESULTS
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


def _report_section(name: str) -> Callable[[], str]:
    return lambda: report_markdown(load_report(RESULTS[name]), checkpoints=name == "default")


# (marker name, the file it lives in, the results it is rendered from, renderer), for dip.docs
SECTIONS: List[Tuple[str, str, List[str], Callable[[], str]]] = [
    ("demo default", "docs/demo.md", [_relative(RESULTS["default"])], _report_section("default")),
    ("demo robustness", "docs/demo.md", [_relative(ROBUSTNESS_RESULTS)],
     lambda: robustness_table(committed_robustness())),
    ("demo thorough", "docs/demo.md", [_relative(RESULTS["thorough"])], _report_section("thorough")),
    ("demo ablation", "docs/demo.md", [_relative(ABLATION_RESULTS)], lambda: ablation_table(committed_ablation())),
    ("ablation summary", "README.md", [_relative(ABLATION_RESULTS)], lambda: ablation_table(committed_ablation())),
    ("demo summary", "README.md", [_relative(RESULTS["default"]), _relative(ROBUSTNESS_RESULTS)], committed_summary),
]
