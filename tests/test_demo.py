"""dip-demo (dip/demo/): its metrics, photos, verdict rule, training schedule, outputs, parallel runs,
command line, and docs/demo.md's tables against the committed results they are generated from."""
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dip import cli, demo, docs



def _tiny(tmp_path, **overrides):
    cfg = dict(image_size=32, hidden_size=32, depth=1, num_heads=2, steps=2, batch_size=1, checkpoints=(1, 2),
               sample_steps=2, noises=3, out=str(tmp_path), progress=False, device="cpu", jobs=1)
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


def test_misplaced_patches_are_found_and_blur_is_not_misplacement():
    photo = demo.load_target(64, "astronaut")
    assert demo.misplaced_patches(photo, photo) == []
    blurred = torch.nn.functional.avg_pool2d(photo[None], 3, 1, 1, count_include_pad=False)[0]
    assert demo.misplaced_patches(blurred, photo) == []  # blur loses detail, not place
    swapped = photo.clone()  # the face's patch (1, 1) and a patch of the dark background (0, 3) trade places
    swapped[:, 16:32, 16:32], swapped[:, 0:16, 48:64] = photo[:, 0:16, 48:64], photo[:, 16:32, 16:32]
    assert sorted(demo.misplaced_patches(swapped, photo)) == [[0, 3], [1, 1]]


def _run(photo, seed, dit, dip):
    """A run as run_one makes it, with final-checkpoint metrics per noise: (psnr, layout_psnr, hf_ratio)
    lists, their medians as the metrics."""
    models = {}
    for (key, _, name), values in zip(demo.MODELS, (dit, dip)):
        per = dict(zip(("psnr", "layout_psnr", "hf_ratio"), (list(v) for v in values)))
        per["misplaced_patches"] = [0] * len(per["psnr"])
        m = {k: float(np.median(v)) for k, v in per.items()}
        models[key] = {"name": name, "checkpoints": {"10": dict(m, loss=0.1, per_noise=per,
                                                                 misplaced=[[]] * len(per["psnr"]))}}
    run = {"photo": photo, "seed": seed, "models": models}
    run["verdict"] = demo.judge(run)
    return run


def test_verdict_rule_judges_the_median_over_noises():
    lay = (25.0, 25.0, 25.0)
    good = _run("a", 0, dit=((20.0, 20.0, 20.0), lay, (0.6, 0.6, 0.6)), dip=((21.0, 22.0, 15.0), lay, (0.9, 0.9, 1.5)))
    v = good["verdict"]
    assert v["shows_effect"]  # one unlucky sample (noise 2) does not decide it
    assert v["psnr_margin"] == pytest.approx(1.0) and v["hf_margin"] == pytest.approx(0.3)
    assert v["psnr_margin_spread"]["min"] == pytest.approx(-5.0) and v["psnr_margin_spread"]["max"] == pytest.approx(2.0)
    noisier = _run("a", 1, dit=((20.0,), (25.0,), (1.2,)), dip=((21.0,), (25.5,), (1.3,)))  # DiP further from 1
    off_layout = _run("b", 0, dit=((20.0,), (25.0,), (0.6,)), dip=((21.0,), (demo.LAYOUT_PSNR_MIN - 1,), (1.0,)))
    assert not noisier["verdict"]["shows_effect"] and not off_layout["verdict"]["shows_effect"]
    assert not off_layout["verdict"]["layout_converged"]
    all_good = demo.summarize([good, good])
    assert all_good["shows_effect"] and "shows the paper's effect on all 2 runs" in all_good["sentence"]
    assert "median of 3 samples" in all_good["sentence"]
    some = demo.summarize([good, noisier, off_layout])
    assert not some["shows_effect"] and some["runs_showing_effect"] == 1
    assert "1 of 3" in some["sentence"] and "a seed 1" in some["sentence"] and "b seed 0" in some["sentence"]
    assert some["margins"]["hf_margin"]["worst"] == pytest.approx(-0.1)
    assert "does not show" in demo.summarize([noisier])["sentence"]


def test_misplaced_patches_are_named_in_the_summary():
    run = _run("a", 0, dit=((20.0, 20.0), (25.0, 25.0), (0.6, 0.6)), dip=((21.0, 21.0), (25.0, 25.0), (0.9, 0.9)))
    final = run["models"]["dip"]["checkpoints"]["10"]
    final["misplaced"], final["per_noise"]["misplaced_patches"] = [[], [[2, 3]]], [0, 1]
    run["verdict"] = demo.judge(run)
    assert run["verdict"]["misplaced_patches"] == {"dit": 0, "dip": 1}
    assert "a seed 0 DiP: 1 in 1 of 2 samples (noise 1 at (2,3))" in demo.summarize([run])["misplaced"]


def test_lr_schedule_and_ema_ramp():
    cfg = demo.DemoConfig(steps=100, warmup_steps=10, lr=1e-3, lr_schedule="cosine", checkpoints=(100,)).validate()
    rates = [cfg.lr_at(s) for s in range(1, 101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] == pytest.approx(0, abs=1e-12)
    assert demo.DemoConfig(lr_schedule="constant").validate().lr_at(200) == pytest.approx(1e-3)
    assert cfg.ema_decay(0) == pytest.approx(0.1) and cfg.ema_decay(1000) == cfg.ema
    assert demo.DemoConfig(ema=0).ema_decay(1000) == 0


def test_one_ulp_perturbation_moves_every_weight_by_one_ulp():
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        model.bias[0] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    demo.perturb_ulps_(model, 1)
    for old, new in zip(before, model.parameters()):
        moved = new.detach() != old
        assert torch.equal(moved, old != 0)
        assert torch.equal(new.detach()[moved], torch.nextafter(old[moved], old[moved].sign() * math.inf))


def test_tiny_demo_writes_png_json_and_tables(tmp_path):
    report = demo.run_demo(_tiny(tmp_path, seeds=(0, 1)))
    with open(tmp_path / "demo.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert set(saved) >= {"config", "metrics_doc", "head_backend", "runs", "summary", "figure", "curves", "timing"}
    assert saved["head_backend"] == demo.ONEDNN and saved["timing"]["jobs"] == 1 and saved["timing"]["cpu_model"]
    assert [(r["photo"], r["seed"]) for r in saved["runs"]] == [("astronaut", 0), ("astronaut", 1)]
    for run in saved["runs"]:
        assert set(run["models"]) == {"dit", "dip"} and set(run["verdict"]) >= {"shows_effect", "psnr_margin_spread"}
        for key, head in (("dit", "none"), ("dip", "patch_detailer")):
            entry = run["models"][key]
            assert entry["head"] == head and set(entry["checkpoints"]) == {"1", "2"} and len(entry["losses"]) == 2
            for m in entry["checkpoints"].values():
                assert set(m) == {"loss", "psnr", "layout_psnr", "hf_ratio", "misplaced_patches", "per_noise",
                                  "misplaced"}
                assert all(len(v) == 3 for v in m["per_noise"].values()) and len(m["misplaced"]) == 3
                assert m["psnr"] == pytest.approx(float(np.median(m["per_noise"]["psnr"])))
                assert all(math.isfinite(m[k]) for k in ("loss", "psnr", "layout_psnr", "hf_ratio"))
    png = Image.open(tmp_path / "demo.png")
    # per run two rows of tiles; columns: target, 2 checkpoints, 2 more noises, 2 zoomed crops
    assert png.size[0] >= 7 * 96 and png.size[1] >= 4 * 96
    assert Image.open(tmp_path / "curves.png").size[1] >= 2 * 200
    text = demo.report_markdown(saved)
    assert text.count("| astronaut |") == 2 * 2 * 2 + 2  # checkpoint rows + summary rows
    assert saved["summary"]["sentence"] in text and saved["summary"]["misplaced"] in text
    assert demo.load_report(str(tmp_path / "demo.json")) == saved


def test_worker_processes_give_the_in_process_results(tmp_path):
    one = demo.run_demo(_tiny(tmp_path / "one", photos=("astronaut", "coffee"), seeds=(3,)))
    two = demo.run_demo(_tiny(tmp_path / "two", photos=("astronaut", "coffee"), seeds=(3,), jobs=2))
    assert two["timing"]["jobs"] == 2
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["photo"], a["seed"]) == (b["photo"], b["seed"])
        for key in ("dit", "dip"):
            for step, m in a["models"][key]["checkpoints"].items():
                assert b["models"][key]["checkpoints"][step]["per_noise"]["psnr"] == pytest.approx(
                    m["per_noise"]["psnr"], abs=1e-3)


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


def _cfg(*argv):
    return cli.demo_config_from_args(cli.demo_parser().parse_args(list(argv)))


def test_cli_arguments_map_to_config(tmp_path):
    cfg = _cfg("--steps", "40", "--image-size", "32", "--seeds", "4,5", "--photos", "coffee,chelsea", "--noises", "4",
               "--lr-schedule", "constant", "--init-ulps", "1")
    assert cfg.steps == 40 and cfg.checkpoints == (16, 28, 40) and cfg.image_size == 32 and cfg.noises == 4
    assert cfg.seeds == (4, 5) and cfg.photos == ("coffee", "chelsea") and cfg.resolved_head_backend() == demo.ONEDNN
    assert cfg.lr_schedule == "constant" and cfg.init_ulps == 1
    # the head's oneDNN backend under its name and its former one
    assert _cfg("--head-backend", "cpu").resolved_head_backend() == _cfg("--head-backend", "onednn").resolved_head_backend()
    assert _cfg("--head-backend", "eager").resolved_head_backend() == _cfg("--head-backend", "reference").resolved_head_backend() == demo.REFERENCE
    thorough = _cfg("--thorough")
    assert thorough.image_size >= 128 and len(thorough.photos) >= 3 and len(thorough.seeds) >= 2
    # training times shift with the resolution: T_MEAN_64 at 64x64, the log-SNR by ln 4 more at 128x128
    assert demo.DemoConfig().training_t_mean() == demo.T_MEAN_64 < 0
    assert thorough.training_t_mean() - demo.T_MEAN_64 == pytest.approx(-math.log(2))
    assert cfg.training_t_mean() - demo.T_MEAN_64 == pytest.approx(math.log(2))  # cfg: 32x32
    shifted = _cfg("--thorough", "--t-mean", "0.5", "--rope-only")
    assert shifted.training_t_mean() == 0.5 and not shifted.absolute_positions
    full = _cfg("--full")
    assert full.image_size == 256 and full.hidden_size == 768 and full.depth == 12
    assert _cfg("--robustness").out == "demo_out_robustness"
    with pytest.raises(ValueError, match="photos"):
        _cfg("--photos", "lena")
    with pytest.raises(FileNotFoundError, match="image"):
        _cfg("--image", str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="head_backend onednn"):
        _cfg("--device", "cuda", "--head-backend", "onednn")
    with pytest.raises(ValueError, match="noises"):
        _cfg("--noises", "0")


def test_report_command_and_readme_summary(tmp_path, capsys):
    report = demo.run_demo(_tiny(tmp_path))
    assert cli.demo_main(["--report", str(tmp_path / "demo.json")]) == 0
    assert capsys.readouterr().out.strip() == demo.report_markdown(report)
    robustness = {"perturbations": {"reference": "", "x": ""}, "rows": []}
    summary = demo.readme_summary(report, robustness)
    assert 3 <= len(summary.splitlines()) <= 6 and "docs/demo.md" in summary
    assert report["summary"]["sentence"] not in summary  # a summary, not the page


def test_the_demo_sections_are_generated_by_dip_docs():
    """docs/demo.md's tables and the README's summary are dip.docs sections (tests/test_docs.py checks
    that every generated block agrees with the committed results)."""
    names = {s.name: s.doc for s in docs.SECTIONS}
    assert names["demo default"] == names["demo robustness"] == names["demo thorough"] == "docs/demo.md"
    assert names["demo summary"] == "README.md"
    section = next(s for s in docs.SECTIONS if s.name == "demo default")
    assert section.render() == demo.report_markdown(demo.load_report(demo.RESULTS["default"]))


def test_committed_default_run_shows_the_effect_on_two_seeds():
    """docs/demo/default/demo.json is a run of the default training recipe. It may predate the samples
    per checkpoint (docs/demo.md says so when it does): every setting it records is the default's."""
    report = demo.load_report(demo.RESULTS["default"])
    assert len(report["runs"]) >= 2 and len({r["seed"] for r in report["runs"]}) >= 2
    assert report["summary"]["shows_effect"]
    assert report["config"]["head_backend"] is None and report["head_backend"] in ("cpu", "onednn")  # the oneDNN backend, by either name
    defaults = demo.runner.config_dict(demo.DemoConfig().validate())
    recorded = {k: v for k, v in report["config"].items() if k != "noises"}
    assert recorded == {k: v for k, v in defaults.items() if k in recorded}
    assert set(defaults) - set(report["config"]) <= {"lr_schedule", "noises", "init_ulps"}
    assert defaults["lr_schedule"] == report["config"].get("lr_schedule", "constant")
    for run in report["runs"]:
        assert run["verdict"]["shows_effect"] == demo.judge(run)["shows_effect"]


def test_committed_robustness_table():
    """docs/demo/robustness/robustness.json: a configuration under every perturbation, 2 seeds or more,
    and the verdict and margins held; its table says whether that configuration is the default."""
    with open(demo.ROBUSTNESS_RESULTS) as f:
        result = json.load(f)
    names = set(demo.PERTURBATIONS)
    assert set(result["perturbations"]) == names and len(names - {"reference"}) >= 3
    seeds = {r["seed"] for r in result["rows"]}
    assert len(seeds) >= 2 and len(result["rows"]) == len(names) * len(seeds)
    # the verdict must hold under every perturbation; whether the margins stay inside the reference's
    # spread is reported in the table (a 1-ulp change can move a patch and a median), not required
    assert all(r["same_verdict"] and r["shows_effect"] for r in result["rows"])
    assert demo.robustness.check([dict(r) for r in result["rows"]]) == result["rows"]
    is_default = result["config"] == demo.runner.config_dict(demo.DemoConfig().validate())
    assert demo.robustness_table(result).startswith("The default configuration" if is_default else "A reduced")


def test_committed_thorough_run_is_the_thorough_preset():
    """docs/demo/thorough/demo.json is `dip-demo --thorough`'s run: at least 3 photos x 2 seeds at
    128x128 or more (whether each run shows the effect is what it reports, not asserted here). It was
    measured with a former recipe (docs/demo.md says so): the sizes, steps and learning rate are
    compared, not the schedule, warm-up, EMA, training times or samples per checkpoint."""
    report = demo.load_report(demo.RESULTS["thorough"])
    preset = _cfg("--thorough")
    for name in ("image_size", "hidden_size", "depth", "steps", "batch_size", "lr", "sample_steps"):
        assert report["config"][name] == getattr(preset, name), name
    runs = {(r["photo"], r["seed"]) for r in report["runs"]}
    assert runs == {(p, s) for p in preset.photos for s in preset.seeds}
    assert len(preset.photos) >= 3 and len(preset.seeds) >= 2 and preset.image_size >= 128
    verdicts = [r["verdict"] for r in report["runs"]]
    assert report["summary"]["runs_showing_effect"] == sum(v["shows_effect"] for v in verdicts)


@pytest.mark.parametrize("mode, result", [([], "demo.json"), (["--robustness"], "robustness.json"),
                                          (["--heads", "none,mlp"], "ablation.json")])
def test_demo_refuses_to_replace_results_without_overwrite(tmp_path, capsys, mode, result):
    """A finished run's results are the user's: a second run into the same --out stops before any
    work, exit 2, the file untouched; --overwrite lets it through to the configuration check."""
    (tmp_path / result).write_text("earlier results")
    assert cli.demo_main(mode + ["--out", str(tmp_path), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / result).read_text() == "earlier results" and len(os.listdir(tmp_path)) == 1
    assert cli.demo_main(mode + ["--out", str(tmp_path), "--overwrite", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
