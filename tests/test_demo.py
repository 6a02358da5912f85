"""dip-demo (dip/demo.py): its metrics, photos, verdict rule, outputs, parallel runs, command line,
and the README's demo tables against the committed results they are generated from."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

from dip import cli, demo

README = os.path.join(demo.REPO, "README.md")


def _tiny(tmp_path, **overrides):
    cfg = dict(image_size=32, hidden_size=32, depth=1, num_heads=2, steps=2, batch_size=1, checkpoints=(1, 2),
               sample_steps=2, out=str(tmp_path), progress=False, device="cpu", jobs=1)
    cfg.update(overrides)
    return demo.DemoConfig(**cfg)


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


def test_layout_psnr_sees_layout_not_detail():
    photo = demo.load_target(64, "astronaut")
    blurred = torch.nn.functional.avg_pool2d(photo[None], 4, 1, padding=0)
    blurred = torch.nn.functional.interpolate(blurred, size=64, mode="bilinear")[0]
    # patches in the wrong places: the same pixels, another layout
    shuffled = photo.unfold(1, 16, 16).unfold(2, 16, 16).reshape(3, 16, 16, 16)[:, torch.randperm(16)]
    shuffled = shuffled.reshape(3, 4, 4, 16, 16).permute(0, 1, 3, 2, 4).reshape(3, 64, 64)
    assert demo.psnr(blurred, photo) < demo.layout_psnr(blurred, photo) - 3  # detail lost, layout kept
    assert demo.layout_psnr(blurred, photo) > demo.LAYOUT_PSNR_MIN
    assert demo.layout_psnr(shuffled, photo) < demo.LAYOUT_PSNR_MIN


@pytest.mark.parametrize("name", demo.PHOTOS)
def test_bundled_photos_load(name):
    img = demo.load_target(32, name)
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1 and img.std() > 0.05


def test_users_photo_is_centre_cropped(tmp_path):
    arr = torch.zeros(50, 90, 3, dtype=torch.uint8)
    arr[:, 45:] = 255  # right half white: a centre crop keeps both halves
    path = tmp_path / "wide.png"
    Image.fromarray(arr.numpy()).save(path)
    img = demo.load_target(32, str(path))
    assert img.shape == (3, 32, 32)
    assert img[:, :, :12].max() < -0.9 and img[:, :, -12:].min() > 0.9
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError):
        demo.load_target(32, str(tmp_path / "broken.jpg"))


def _run(photo, seed, dit, dip):
    """A run as run_one makes it, with final-checkpoint metrics (psnr, layout_psnr, hf_ratio)."""
    models = {key: {"name": name, "checkpoints": {"10": dict(zip(("psnr", "layout_psnr", "hf_ratio"), m), loss=0.1)}}
              for (key, _, name), m in zip(demo.MODELS, (dit, dip))}
    run = {"photo": photo, "seed": seed, "models": models}
    run["verdict"] = demo.judge(run)
    return run


def test_verdict_rule():
    good = _run("a", 0, dit=(20.0, 25.0, 0.6), dip=(21.0, 25.5, 0.9))
    assert good["verdict"]["shows_effect"]
    assert good["verdict"]["psnr_margin"] == pytest.approx(1.0) and good["verdict"]["hf_margin"] == pytest.approx(0.3)
    noisier = _run("a", 1, dit=(20.0, 25.0, 1.2), dip=(21.0, 25.5, 1.3))  # DiP further from 1
    off_layout = _run("b", 0, dit=(20.0, 25.0, 0.6), dip=(21.0, demo.LAYOUT_PSNR_MIN - 1, 1.0))
    assert not noisier["verdict"]["shows_effect"] and not off_layout["verdict"]["shows_effect"]
    assert not off_layout["verdict"]["layout_converged"]
    all_good = demo.summarize([good, good])
    assert all_good["shows_effect"] and "shows the paper's effect on all 2 runs" in all_good["sentence"]
    some = demo.summarize([good, noisier, off_layout])
    assert not some["shows_effect"] and some["runs_showing_effect"] == 1
    assert "1 of 3" in some["sentence"] and "a seed 1" in some["sentence"] and "b seed 0" in some["sentence"]
    assert some["margins"]["hf_margin"]["worst"] == pytest.approx(-0.1)
    assert "does not show" in demo.summarize([noisier])["sentence"]


def test_tiny_demo_writes_png_json_and_tables(tmp_path):
    report = demo.run_demo(_tiny(tmp_path, seeds=(0, 1)))
    with open(tmp_path / "demo.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert set(saved) >= {"config", "metrics_doc", "head_backend", "runs", "summary", "figure", "timing"}
    assert saved["head_backend"] == "onednn" and saved["timing"]["jobs"] == 1
    assert [(r["photo"], r["seed"]) for r in saved["runs"]] == [("astronaut", 0), ("astronaut", 1)]
    for run in saved["runs"]:
        assert set(run["models"]) == {"dit", "dip"} and set(run["verdict"]) >= {"shows_effect", "psnr_margin"}
        for key, head in (("dit", "none"), ("dip", "patch_detailer")):
            entry = run["models"][key]
            assert entry["head"] == head and set(entry["checkpoints"]) == {"1", "2"}
            for m in entry["checkpoints"].values():
                assert set(m) == {"loss", "psnr", "layout_psnr", "hf_ratio"}
                assert all(math.isfinite(v) for v in m.values())
    png = Image.open(tmp_path / "demo.png")
    # per run two rows of 128-px tiles; columns: target, 2 checkpoints, 2 zoomed crops
    assert png.size[0] >= 5 * 128 and png.size[1] >= 4 * 128
    text = demo.report_markdown(saved)
    assert text.count("| astronaut |") == 2 * 2 * 2 + 2  # checkpoint rows + summary rows
    assert saved["summary"]["sentence"] in text
    assert demo.load_report(str(tmp_path / "demo.json")) == saved


def test_worker_processes_give_the_in_process_results(tmp_path):
    one = demo.run_demo(_tiny(tmp_path / "one", photos=("astronaut", "coffee"), seeds=(3,)))
    two = demo.run_demo(_tiny(tmp_path / "two", photos=("astronaut", "coffee"), seeds=(3,), jobs=2))
    assert two["timing"]["jobs"] == 2
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["photo"], a["seed"]) == (b["photo"], b["seed"])
        for key in ("dit", "dip"):
            for step, m in a["models"][key]["checkpoints"].items():
                assert b["models"][key]["checkpoints"][step]["psnr"] == pytest.approx(m["psnr"], abs=1e-3)


def test_he_init_lets_the_token_reach_the_heads_output():
    cfg = demo.DemoConfig(hidden_size=64, num_heads=4).validate()
    sens = {init: demo.head_sensitivity(demo.build_demo_model(replace(cfg, head_init=init), "patch_detailer"))
            for init in demo.HEAD_INITS}
    # PyTorch's default: the token, nine layers from the output, barely moves it; He: it does
    assert sens["default"]["token"] < 1e-3 * sens["default"]["patch"]
    assert sens["he"]["token"] > 0.05 * sens["he"]["patch"]
    assert 0.3 < sens["he"]["output"] < 3  # and the output keeps a sane scale


def test_detail_window_finds_the_detailed_corner():
    img = torch.zeros(3, 64, 64)
    img[:, 40:56, 8:24] = torch.rand(3, 16, 16) * 2 - 1
    top, left = demo.detail_window(img, 16)
    assert abs(top - 40) <= 4 and abs(left - 8) <= 4


def test_cli_arguments_map_to_config(tmp_path):
    args = cli.demo_parser().parse_args(["--steps", "40", "--image-size", "32", "--seeds", "4,5",
                                     "--photos", "coffee,chelsea"])
    cfg = demo.config_from_args(args)
    assert cfg.steps == 40 and cfg.checkpoints == (10, 20, 40) and cfg.image_size == 32
    assert cfg.seeds == (4, 5) and cfg.photos == ("coffee", "chelsea") and cfg.resolved_head_backend() == "cpu"
    thorough = demo.config_from_args(cli.demo_parser().parse_args(["--thorough"]))
    assert thorough.image_size >= 128 and len(thorough.photos) >= 3 and len(thorough.seeds) >= 2
    # training times shift with the resolution: none at 64x64, the log-SNR by ln 4 at 128x128
    assert demo.DemoConfig().training_t_mean() == 0
    assert thorough.training_t_mean() == pytest.approx(-math.log(2)) == -cfg.training_t_mean()  # cfg: 32x32
    shifted = demo.config_from_args(cli.demo_parser().parse_args(["--thorough", "--t-mean", "0.5", "--rope-only"]))
    assert shifted.training_t_mean() == 0.5 and not shifted.absolute_positions
    full = demo.config_from_args(cli.demo_parser().parse_args(["--full"]))
    assert full.image_size == 256 and full.hidden_size == 768 and full.depth == 12
    with pytest.raises(ValueError, match="photos"):
        demo.config_from_args(cli.demo_parser().parse_args(["--photos", "lena"]))
    with pytest.raises(FileNotFoundError, match="image"):
        demo.config_from_args(cli.demo_parser().parse_args(["--image", str(tmp_path / "missing.png")]))
    with pytest.raises(ValueError, match="head_backend cpu"):
        demo.config_from_args(cli.demo_parser().parse_args(["--device", "cuda", "--head-backend", "cpu"]))


def test_report_and_update_readme_commands(tmp_path, capsys):
    report = demo.run_demo(_tiny(tmp_path))
    assert demo.main(["--report", str(tmp_path / "demo.json")]) == 0
    assert capsys.readouterr().out.strip() == demo.report_markdown(report)
    begin, end = demo.readme_markers("default")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{begin}\nstale\n{end}\n\nafter\n")
    updated = demo.update_readme(readme.read_text(), {"default": report})
    assert "stale" not in updated and updated.endswith("after\n")
    assert demo.readme_section("default", report) in updated
    with pytest.raises(ValueError, match="README has no"):
        demo.update_readme("no markers here", {"default": report})


@pytest.mark.parametrize("section", sorted(demo.RESULTS))
def test_readme_tables_are_the_committed_results(section):
    """README.md's demo tables are generated from docs/demo/<section>/demo.json
    (`dip-demo --update-readme`); edit neither by hand."""
    report = demo.load_report(demo.RESULTS[section])
    with open(README) as f:
        readme = f.read()
    begin, end = demo.readme_markers(section)
    assert begin in readme and end in readme, f"README lacks the {section} demo block"
    block = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert block == demo.readme_section(section, report).strip(), (
        f"README's {section} demo table differs from {demo.RESULTS[section]}: run `dip-demo --update-readme`")


def test_committed_default_run_shows_the_effect_on_two_seeds():
    report = demo.load_report(demo.RESULTS["default"])
    assert len(report["runs"]) >= 2 and len({r["seed"] for r in report["runs"]}) >= 2
    assert report["summary"]["shows_effect"]
    assert report["config"]["head_backend"] in (None, "cpu") and report["head_backend"] == "cpu"
    # the committed file is the default configuration's run
    defaults = demo.DemoConfig()
    for name in ("image_size", "hidden_size", "depth", "steps", "batch_size", "lr", "ema", "sample_steps"):
        assert report["config"][name] == getattr(defaults, name), name
    assert report["config"]["seeds"] == list(defaults.seeds) and report["config"]["photos"] == list(defaults.photos)


def test_committed_thorough_run_is_the_thorough_preset():
    """docs/demo/thorough/demo.json is `dip-demo --thorough`'s run: at least 3 photos x 2 seeds at
    128x128 or more (whether each run shows the effect is what it reports, not asserted here)."""
    report = demo.load_report(demo.RESULTS["thorough"])
    preset = demo.config_from_args(cli.demo_parser().parse_args(["--thorough"]))
    for name in ("image_size", "hidden_size", "depth", "steps", "batch_size", "lr", "ema", "sample_steps"):
        assert report["config"][name] == getattr(preset, name), name
    assert report["config"]["t_mean"] == pytest.approx(preset.training_t_mean())
    runs = {(r["photo"], r["seed"]) for r in report["runs"]}
    assert runs == {(p, s) for p in preset.photos for s in preset.seeds}
    assert len(preset.photos) >= 3 and len(preset.seeds) >= 2 and preset.image_size >= 128
    verdicts = [r["verdict"] for r in report["runs"]]
    assert report["summary"]["runs_showing_effect"] == sum(v["shows_effect"] for v in verdicts)
