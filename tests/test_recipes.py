"""The full-size training recipes in configs/: every YAML loads with dip-train's loader and builds the
model the paper names (parameter counts on the meta device), the ablation runs differ from the paper
preset only in their model, their step counts are the epochs they claim, and docs/ablation.md holds
the table dip.recipes generates."""
import dataclasses
import glob
import json
import os
import re

import pytest
import torch

from dip import models
from dip.train import TrainConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dip import recipes as ablation
PAPER_PRESET = os.path.join(REPO, "configs", "dip-xl16-paper.yaml")
ABLATION = {head: os.path.join(REPO, "configs", "ablation", f"{head}.yaml") for head in models.HEADS}
SCALED_DIT = os.path.join(REPO, "configs", "ablation", "dit-1.1b.yaml")
IMAGENET_TRAIN_IMAGES = 1_281_167


def _params(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        model = models.build_model(cfg.model, **cfg.model_overrides)
    return model, sum(p.numel() for p in model.parameters())


def test_every_config_loads_and_builds():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert set(paths) == {PAPER_PRESET, SCALED_DIT, *ABLATION.values()}
    for path in paths:
        cfg = load_config(path)
        model, _ = _params(cfg)
        assert model.config.patch_size == 16 and cfg.image_size == 256 and cfg.objective == "flow", path


def test_parameter_counts_are_the_papers():
    """The paper's Table 2: DiT only 629M, DiP-XL/16 631M (it writes 631M for 631.99M), the scaled DiT 1.1B."""
    heads = {head: _params(load_config(path)) for head, path in ABLATION.items()}
    for head, (model, _) in heads.items():
        assert model.config.head == head and model.config.hidden_size == 1152 and model.config.depth == 26
    assert round(heads["none"][1] / 1e6) == 629
    assert int(heads["patch_detailer"][1] / 1e6) == 631
    assert _params(load_config(PAPER_PRESET))[1] == heads["patch_detailer"][1]
    scaled, count = _params(load_config(SCALED_DIT))
    assert (scaled.config.head, scaled.config.hidden_size) == ("none", 1536) and round(count / 1e8) == 11
    # adding the head costs far less than widening: the paper's point
    assert heads["patch_detailer"][1] - heads["none"][1] < 0.01 * (count - heads["none"][1])


def test_ablation_runs_differ_from_the_paper_preset_only_in_the_model():
    preset = dataclasses.asdict(load_config(PAPER_PRESET))
    for path in [*ABLATION.values(), SCALED_DIT]:
        cfg = dataclasses.asdict(load_config(path))
        differ = {k for k in preset if cfg[k] != preset[k]}
        assert differ <= {"model", "model_overrides", "steps"}, (path, differ)


def test_weight_decay_is_the_papers_and_the_official_value_is_named():
    cfg = load_config(PAPER_PRESET)
    assert cfg.weight_decay == 0.0
    with open(PAPER_PRESET) as f:
        text = f.read()
    assert "Table 4" in text and "1e-3" in text and "--set weight_decay=1e-3" in text


def _epochs(steps, batch=256):
    return steps * batch / IMAGENET_TRAIN_IMAGES


def test_step_counts_are_the_epochs_they_claim():
    assert round(_epochs(load_config(PAPER_PRESET).steps), 3) == 600
    for path in [*ABLATION.values(), SCALED_DIT]:
        cfg = load_config(path)
        assert cfg.global_batch == 256 and round(_epochs(cfg.steps), 3) == 160, path
    # every "--steps N" a config's comments suggest is a whole number of epochs
    for path in [PAPER_PRESET, SCALED_DIT, *ABLATION.values()]:
        with open(path) as f:
            suggested = [int(n) for n in re.findall(r"--steps (\d+)", f.read())]
        assert suggested and all(abs(_epochs(n) - round(_epochs(n))) < 1e-3 for n in suggested), path


def test_ablation_page_lists_every_ablation_config():
    # the page's table itself is checked with every generated section (tests/test_docs.py)
    with open(os.path.join(REPO, "docs", "ablation.md")) as f:
        page = f.read()
    assert sorted(path for path, _, _ in ablation.RUNS) == sorted(os.path.relpath(p, REPO) for p in
                                                                  [*ABLATION.values(), SCALED_DIT])
    assert "shared/" not in page and "/work/" not in page


def test_gpu_hours_scale_the_reference_step():
    with open(ablation.ANCHORS_FILE) as f:
        step_ms = json.load(f)["dipxl16_256"]["train_step_batch32_ms"]["eager"]
    reference = {"gflop": 200.0}
    # the reference model itself: epochs x images / (32 images per step_ms), in hours
    expected = 160 * IMAGENET_TRAIN_IMAGES / (32 / (step_ms / 1000)) / 3600
    assert ablation.gpu_hours(reference, reference, step_ms, 160) == pytest.approx(expected)
    assert ablation.gpu_hours({"gflop": 300.0}, reference, step_ms, 80) == pytest.approx(expected * 1.5 / 2)
    assert ablation.steps_for_epochs(160, 256) == load_config(ABLATION["none"]).steps
