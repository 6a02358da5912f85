import json
import math
import os

import torch
from PIL import Image

from dip import demo


def test_metrics_behave():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 32, 32, generator=g) * 2 - 1
    assert math.isinf(demo.psnr(target, target))
    assert 5 < demo.psnr(torch.zeros_like(target), target) < 15
    blur3 = torch.nn.functional.avg_pool2d(target[None], 3, 1, 1, count_include_pad=False)[0]
    blur7 = torch.nn.functional.avg_pool2d(target[None], 7, 1, 3, count_include_pad=False)[0]
    assert demo.high_frequency_ratio(blur7, target) < demo.high_frequency_ratio(blur3, target) < 0.8
    assert abs(demo.high_frequency_ratio(target, target) - 1) < 1e-12
    # one slow cosine (1/32 cycles per pixel) is all low frequency, a fast one (1/4) all high
    x = torch.arange(32, dtype=torch.float64)
    assert demo.high_frequency_share(torch.cos(2 * math.pi * x / 32).expand(3, 32, 32)) < 1e-12
    assert demo.high_frequency_share(torch.cos(2 * math.pi * x / 4).expand(3, 32, 32)) > 1 - 1e-12


def test_load_target():
    img = demo.load_target(32)
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1 and img.std() > 0.2


def test_tiny_demo_writes_png_and_json(tmp_path):
    cfg = demo.DemoConfig(image_size=32, hidden_size=32, depth=1, num_heads=2, steps=2, batch_size=1,
                          checkpoints=(1, 2), sample_steps=2, out=str(tmp_path), progress=False, device="cpu")
    report = demo.run_demo(cfg)
    with open(tmp_path / "demo.json") as f:
        saved = json.load(f)
    assert set(saved) >= {"config", "metrics_doc", "target_hf_share", "models", "figure", "seconds"}
    assert set(saved["models"]) == {"dit", "dip"}
    for key, head in (("dit", "none"), ("dip", "patch_detailer")):
        entry = saved["models"][key]
        assert entry["head"] == head and set(entry["checkpoints"]) == {"1", "2"}
        for m in entry["checkpoints"].values():
            assert set(m) == {"loss", "psnr", "hf_ratio"} and all(math.isfinite(v) for v in m.values())
    png = Image.open(tmp_path / "demo.png")
    assert png.size[0] >= 3 * 128 and png.size[1] >= 2 * 128
    table = demo.summary_table(report)
    assert "DiT-only" in table and "DiP" in table and len(table.splitlines()) == 5


def test_cli_arguments_map_to_config():
    args = demo.parser().parse_args(["--steps", "40", "--image-size", "32"])
    cfg = demo.config_from_args(args)
    assert cfg.steps == 40 and cfg.checkpoints == (10, 20, 40) and cfg.image_size == 32
    full = demo.config_from_args(demo.parser().parse_args(["--full"]))
    assert full.image_size == 256 and full.hidden_size == 768 and full.depth == 12
