"""Official DiP weights on the command line (dip.official): a small synthetic checkpoint in the
official trainer's naming and Lightning layout goes through dip-convert, dip-sample, dip-train
--init-from and docs/released-weights.md's commands from released weights to FID."""
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from dip import cli, models, official
from dip.checkpoint import load_model_from_checkpoint
from dip.sample import GuidanceInterval, euler_sample
from test_models import official_names, randomize_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "DiP-Tiny"  # ten classes, so 16x16 images with one patch keep every sampler call small
SMALL = ["--steps", "2", "--image-size", "16", "--per-class", "1", "--batch-size", "4", "--cfg-scale", "2.0",
         "--device", "cpu", "--no-progress"]
STAND_IN = "lightning_stand_in"  # a module that exists while the checkpoint is written, not while it is read


def _pickled_by_an_absent_module():
    """Objects like those in a real Lightning checkpoint's hyper_parameters (Lightning's AttributeDict,
    the CLI's instantiator function), from a module that is gone before the file is read."""
    module = types.ModuleType(STAND_IN)

    class AttributeDict(dict):
        pass

    def instantiate_module():
        pass

    for obj in (AttributeDict, instantiate_module):
        obj.__module__, obj.__qualname__ = STAND_IN, obj.__name__
        setattr(module, obj.__name__, obj)
    return module, AttributeDict(lr=1e-4, _instantiator=instantiate_module, ema_decay=0.9999)


def write_lightning_checkpoint(path, ema_model, raw_model):
    """What the official trainer's ModelCheckpoint writes: the LightningModule's state_dict (EMA and
    raw denoisers under their attribute names, beside the trainer's other modules) and Lightning's
    bookkeeping."""
    config = ema_model.config
    state_dict = {**{official.EMA_PREFIX + k: v for k, v in official_names(ema_model.state_dict(), config).items()},
                  **{official.RAW_PREFIX + k: v for k, v in official_names(raw_model.state_dict(), config).items()},
                  "diffusion_trainer.proj.0.weight": torch.randn(8, config.hidden_size),
                  "diffusion_trainer.proj.0.bias": torch.randn(8)}
    module, hyper_parameters = _pickled_by_an_absent_module()
    sys.modules[STAND_IN] = module
    try:
        torch.save({"epoch": 3, "global_step": 4000, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
                    "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
                    "optimizer_states": [{"state": {0: {"step": torch.tensor(4000.0),
                                                        "exp_avg": torch.randn(4)}},
                                          "param_groups": [{"lr": 1e-4, "params": [0]}]}],
                    "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hyper_parameters}, path)
    finally:
        del sys.modules[STAND_IN]


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A DiP-Tiny Lightning checkpoint with different EMA and raw weights, and its dip-train conversion."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the conv head's small GEMMs crawl when 2 threads fight others for 2 cores
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    ema, raw = randomize_(models.DiPTiny()), randomize_(models.DiPTiny())
    path = root / "official.ckpt"
    write_lightning_checkpoint(path, ema, raw)
    converted = root / "converted.pt"
    assert cli.convert_main([str(path), str(converted), "--model", MODEL]) == 0
    yield types.SimpleNamespace(root=root, path=path, converted=converted, ema=ema.state_dict(),
                                raw=raw.state_dict())
    torch.set_num_threads(saved_threads)


def _assert_same_weights(got, expected):
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def _one_line_error(main, argv, capsys):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- reading
def test_reads_the_lightning_layout_without_lightning_or_the_official_code(official_ckpt):
    assert STAND_IN not in sys.modules
    checkpoint = official.read_checkpoint(str(official_ckpt.path))
    assert checkpoint.kind == official.LIGHTNING and checkpoint.details == "epoch 3, global_step 4000"
    _assert_same_weights(checkpoint.ema, official_ckpt.ema)
    _assert_same_weights(checkpoint.raw, official_ckpt.raw)
    hyper_parameters = official.load_file(str(official_ckpt.path))["hyper_parameters"]
    assert isinstance(hyper_parameters, official.PickledObject)
    assert type(hyper_parameters).__module__ == STAND_IN and STAND_IN not in sys.modules


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_reading_runs_no_code_from_the_file(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"ema_denoiser.x_embedder.weight": torch.ones(1)}, "epoch": 0,
                "hyper_parameters": _Hostile(marker)}, path)
    obj = official.load_file(str(path))
    assert not os.path.exists(marker)
    assert isinstance(obj["hyper_parameters"], official.PickledObject)
    assert torch.equal(obj["state_dict"]["ema_denoiser.x_embedder.weight"], torch.ones(1))


@pytest.mark.parametrize("layout", ["plain official", "ddp ema and model", "our names", "lightning ema only"])
def test_each_layout_gives_its_weights(official_ckpt, tmp_path, layout):
    config = models.DiPTiny().config
    ema_official = official_names(official_ckpt.ema, config)
    raw_official = official_names(official_ckpt.raw, config)
    expect_ema, expect_raw = None, official_ckpt.raw
    if layout == "plain official":
        obj = ema_official  # one set of weights, whichever it is: counted as the raw (only) set
        expect_raw = official_ckpt.ema
    elif layout == "ddp ema and model":
        obj = {"ema": {"module." + k: v for k, v in ema_official.items()},
               "model": {"module._orig_mod." + k: v for k, v in raw_official.items()}, "step": 7}
        expect_ema = official_ckpt.ema
    elif layout == "our names":
        obj = dict(official_ckpt.raw)
    else:
        obj = {"state_dict": {official.EMA_PREFIX + k: v for k, v in ema_official.items()}, "global_step": 1}
        expect_ema, expect_raw = official_ckpt.ema, None
    path = tmp_path / "weights.pt"
    torch.save(obj, path)
    checkpoint = official.read_checkpoint(str(path))
    assert checkpoint.kind == (official.LIGHTNING if layout == "lightning ema only" else official.STATE_DICT)
    for got, expected in ((checkpoint.ema, expect_ema), (checkpoint.raw, expect_raw)):
        if expected is None:
            assert got is None
        else:
            _assert_same_weights(got, expected)
    weights, which = checkpoint.weights()
    assert which == ("EMA" if expect_ema is not None else "raw")


# ----------------------------------------------------------------------------- dip-convert
def test_convert_round_trip(official_ckpt, capsys):
    state = torch.load(official_ckpt.converted, weights_only=False)
    _assert_same_weights(state["model"], official_ckpt.raw)
    _assert_same_weights(state["ema"], official_ckpt.ema)
    assert models.DiPConfig(**state["model_config"]) == models.DiPTiny().config
    assert state["step"] == 0 and state["config"]["image_size"] == official.OFFICIAL_IMAGE_SIZE
    # a normal dip-train checkpoint: dip-sample's loader needs no flags and takes the EMA weights
    model, _ = load_model_from_checkpoint(str(official_ckpt.converted))
    _assert_same_weights(model.state_dict(), official_ckpt.ema)
    assert official.read_checkpoint(str(official_ckpt.converted)).kind == official.DIP_TRAIN
    # converting it again is refused
    err = _one_line_error(cli.convert_main, [str(official_ckpt.converted), str(official_ckpt.root / "again.pt"),
                                             "--model", MODEL], capsys)
    assert "already a dip-train checkpoint" in err


def test_convert_never_replaces_an_output_unless_asked(official_ckpt, tmp_path, capsys):
    out = tmp_path / "out.pt"
    out.write_bytes(b"somebody's file")
    err = _one_line_error(cli.convert_main, [str(official_ckpt.path), str(out), "--model", MODEL], capsys)
    assert "--overwrite" in err and out.read_bytes() == b"somebody's file"
    assert cli.convert_main([str(official_ckpt.path), str(out), "--model", MODEL, "--overwrite"]) == 0
    _assert_same_weights(torch.load(out, weights_only=False)["ema"], official_ckpt.ema)
    assert sorted(os.listdir(tmp_path)) == ["out.pt"]  # no temporary file left behind


def test_convert_refuses_nonfinite_weights(official_ckpt, tmp_path, capsys):
    ema = models.DiPTiny()
    ema.load_state_dict(official_ckpt.ema)
    with torch.no_grad():
        ema.blocks[1].attn.proj.weight[0, 0] = float("nan")
    source = tmp_path / "nan.ckpt"
    write_lightning_checkpoint(source, ema, ema)
    err = _one_line_error(cli.convert_main, [str(source), str(tmp_path / "out.pt"), "--model", MODEL], capsys)
    assert "NaN" in err and "blocks.1.attn.proj.weight" in err
    assert not os.path.exists(tmp_path / "out.pt")


# ----------------------------------------------------------------------------- dip-sample
def test_sampling_the_official_file_equals_sampling_its_conversion(official_ckpt, tmp_path, capsys):
    arrays = {}
    for source, flags in (("official", [str(official_ckpt.path), "--model", MODEL]),
                          ("converted", [str(official_ckpt.converted)])):
        for weights in ("ema", "raw"):
            path = tmp_path / f"{source}-{weights}.npz"
            argv = flags + ["--npz", str(path)] + SMALL + (["--raw"] if weights == "raw" else [])
            assert cli.sample_main(argv) == 0
            with np.load(path) as f:
                assert f["arr_1"].tolist() == list(range(10))
                arrays[source, weights] = f["arr_0"]
    assert "sampling its EMA weights as DiP-Tiny" in capsys.readouterr().out
    for weights in ("ema", "raw"):
        np.testing.assert_array_equal(arrays["official", weights], arrays["converted", weights])
    assert not np.array_equal(arrays["official", "ema"], arrays["official", "raw"])


@pytest.mark.parametrize("case", ["no --model", "wrong --model", "--model on dip-train", "--raw without raw",
                                  "neither format", "not a torch file", "missing file"])
def test_sample_errors_are_one_line(official_ckpt, tmp_path, capsys, case):
    argv, needles = [str(official_ckpt.path)], []
    if case == "no --model":
        needles = ["does not say its model", "--model"]
    elif case == "wrong --model":
        argv += ["--model", "DiP-S/16"]
        needles = ["do not fit --model DiP-S/16", "of another shape (first ", "they fit DiP-Tiny (hidden_size=64"]
    elif case == "--model on dip-train":
        argv = [str(official_ckpt.converted), "--model", "DiP-S/16"]
        needles = ["is not the model of", "leave --model out"]
    elif case == "--raw without raw":
        path = tmp_path / "ema_only.ckpt"
        torch.save({"state_dict": {official.EMA_PREFIX + k: v for k, v in
                                   official_names(official_ckpt.ema, models.DiPTiny().config).items()},
                    "epoch": 1}, path)
        argv = [str(path), "--model", MODEL, "--raw"]
        needles = ["holds only EMA weights"]
    elif case == "neither format":
        path = tmp_path / "other.pt"
        torch.save({"weights": [1, 2, 3], "step": 4}, path)
        argv = [str(path), "--model", MODEL]
        needles = ["neither a dip-train checkpoint nor official DiP weights", "['step', 'weights']"]
    elif case == "not a torch file":
        path = tmp_path / "notes.ckpt"
        path.write_text("not a checkpoint\n")
        argv = [str(path), "--model", MODEL]
        needles = ["is not a PyTorch checkpoint file"]
    else:
        argv = [str(tmp_path / "absent.ckpt"), "--model", MODEL]
        needles = ["does not exist"]
    err = _one_line_error(cli.sample_main, argv + ["--npz", str(tmp_path / "x.npz")] + SMALL, capsys)
    assert err.startswith("dip-sample: error:") and all(n in err for n in needles), err
    assert not os.path.exists(tmp_path / "x.npz")


# ----------------------------------------------------------------------------- the presets
def test_paper_256_preset_is_appendix_c():
    preset = official.PRESETS["paper-256"]
    assert (preset.method, preset.steps, preset.cfg_scale, preset.image_size) == ("euler", 100, 2.9, 256)
    assert preset.guidance_interval == GuidanceInterval(0.11, 0.97, include_lo=True, include_hi=True)
    assert preset.per_class * 1000 == 50_000
    assert set(preset.sources) == set(official.SETTINGS)
    for name in ("method", "steps", "cfg_scale", "guidance_interval"):
        assert preset.sources[name].startswith(official.PAPER_CFG), name
    assert "arXiv 2511.18822v3" in official.PAPER_CFG and "Appendix C" in official.PAPER_CFG
    assert "NOT CONFIRMED" not in " ".join(preset.sources.values())
    # the paper's rule: step i (model time i/100) is guided iff 0.11 <= i/100 <= 0.97, in integers 11 <= i <= 97
    assert preset.guided_steps() == [i for i in range(100) if 11 <= i <= 97]
    assert preset.model_evaluations_per_image() == 2 * 87 + 13
    assert preset.official_sampler_evaluations_per_image() == 200


def test_official_config_preset_is_the_released_yaml():
    preset = official.PRESETS["official-config"]
    assert (preset.method, preset.steps, preset.cfg_scale, preset.image_size, preset.per_class) == \
        ("euler", 100, 1.0, 256, 50)
    assert preset.guidance_interval == GuidanceInterval(0.1, 1.0, include_lo=False, include_hi=False)
    assert set(preset.sources) == set(official.SETTINGS)
    assert all(v.startswith(official.OFFICIAL_CODE) for v in preset.sources.values())
    assert preset.guided_steps() == [] and preset.model_evaluations_per_image() == 100
    # its strict interval, were the scale raised, guides what the official min < t < max does on its grid
    guided = dataclasses.replace(preset, cfg_scale=3.5).guided_steps()
    official_grid = [i / 100 for i in range(100)]  # linspace(0, 0.99, 100); 1.0 is the end, never a step start
    assert guided == [i for i, t in enumerate(official_grid) if 0.1 < t < 1.0] == list(range(11, 100))


def test_every_step_runs_as_the_preset_plans():
    """The Euler sampler, run with each preset's settings, calls the model on 2B images exactly at the
    preset's guided steps and on B elsewhere (the unconditional half skipped), so the image-forwards
    per image are SamplingPreset.model_evaluations_per_image."""
    sizes = []

    class Recorder(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            sizes.append(x.shape[0])
            return torch.zeros_like(x)

    for preset in official.PRESETS.values():
        sizes.clear()
        euler_sample(Recorder(), torch.randn(1, 3, 2, 2), torch.tensor([3]), steps=preset.steps,
                     cfg_scale=preset.cfg_scale, guidance_interval=preset.guidance_interval)
        guided = set(preset.guided_steps())
        assert sizes == [2 if i in guided else 1 for i in range(preset.steps)], preset.name
        assert sum(sizes) == preset.model_evaluations_per_image()


def test_preset_fills_only_what_the_flags_leave_open():
    def resolved(*flags):
        args = cli.sample_parser().parse_args(["ckpt.pt"] + list(flags))
        official.apply_preset(args, cli.SAMPLE_DEFAULTS)
        return {name: getattr(args, name) for name in official.SETTINGS}

    paper = GuidanceInterval(0.11, 0.97, include_lo=True, include_hi=True)
    assert resolved("--preset", "paper-256") == {"method": "euler", "steps": 100, "cfg_scale": 2.9,
                                                 "guidance_interval": paper, "per_class": 50, "image_size": 256}
    assert resolved("--preset", "official-config")["guidance_interval"] == GuidanceInterval(0.1, 1.0, False, False)
    explicit = resolved("--preset", "paper-256", "--cfg-scale", "1.5", "--per-class", "2",
                        "--guidance-interval", "0.2,0.9", "--steps", "7")
    assert (explicit["cfg_scale"], explicit["per_class"], explicit["guidance_interval"], explicit["steps"]) == \
        (1.5, 2, GuidanceInterval(0.2, 0.9), 7) and explicit["method"] == "euler"
    assert resolved("--guidance-interval", "[0.11,0.97]")["guidance_interval"] == paper
    with pytest.raises(SystemExit) as exit_info:
        resolved("--guidance-interval", "0.1")
    assert exit_info.value.code == 2
    assert resolved() == {"method": None, "steps": 100, "cfg_scale": 1.0, "guidance_interval": None,
                          "per_class": 1, "image_size": None}


def test_preset_reaches_the_sampler(official_ckpt, tmp_path, monkeypatch):
    seen = []

    class RecordingSampler:  # stands in for the 100-step run at 256x256; records what dip-sample asks
        def __init__(self, model, **kwargs):
            seen.append(kwargs)

        def sample(self, labels, image_size, seed, device):
            seen.append({"image_size": image_size, "labels": list(labels)})
            return torch.zeros(len(labels), 3, image_size, image_size)

    monkeypatch.setattr(cli, "GraphSampler", RecordingSampler)
    path = tmp_path / "preset.npz"
    assert cli.sample_main([str(official_ckpt.converted), "--preset", "paper-256", "--npz", str(path),
                            "--per-class", "1", "--batch-size", "10", "--device", "cpu", "--no-progress"]) == 0
    assert seen[0] == {"steps": 100, "cfg_scale": 2.9, "autocast_dtype": None,
                       "guidance_interval": official.PRESETS["paper-256"].guidance_interval}
    assert seen[1] == {"image_size": 256, "labels": list(range(10))}
    with np.load(path) as f:
        assert f["arr_0"].shape == (10, 256, 256, 3)


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_does(official_ckpt, tmp_path):
    common = ["--model", MODEL, "--preset", "paper-256"] + SMALL + ["--per-class", "2", "--batch-size", "3"]
    one = tmp_path / "one.npz"
    assert cli.sample_main([str(official_ckpt.path), "--npz", str(one)] + common) == 0
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dip.cli", "sample", str(official_ckpt.path), "--npz", str(two_dir / "samples.npz")]
                         + common, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(one) as a, np.load(two_dir / "samples.npz") as b:
        assert b["arr_0"].dtype == np.uint8 and b["arr_0"].shape == (20, 16, 16, 3)
        assert b["arr_1"].tolist() == sorted(list(range(10)) * 2)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert one.read_bytes() == (two_dir / "samples.npz").read_bytes()  # the very same file, byte for byte
    assert os.listdir(two_dir) == ["samples.npz"]  # the per-rank parts are gone


# ----------------------------------------------------------------------------- dip-train --init-from
def _image_folder(root):
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(2):
            arr = np.random.default_rng(i + 3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _fine_tune(init_from, data, out, *extra):
    return cli.train_main([MODEL, "--data", str(data), "--out", str(out), "--init-from", str(init_from),
                           "--steps", "1", "--batch-size", "2", "--image-size", "16", "--device", "cpu",
                           "--num-workers", "0", "--no-progress"] + list(extra))


def test_init_from_starts_a_new_run_from_the_weights(official_ckpt, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    assert _fine_tune(official_ckpt.path, data, tmp_path / "run") == 0
    assert "initialised from" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    # a new run: step 1 of 1, and an optimizer that has taken exactly that one step
    assert state["step"] == 1 and state["data"]["index"] == 2
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {1.0}
    # the classes are the weights' (10), not the data's (2): the label embedding fits as it is
    assert state["model_config"]["num_classes"] == 10
    # the model trained from the raw weights: one AdamW step at lr 1e-4 moves each weight by ~1e-4
    drift = max(float((state["model"][k] - v).abs().max()) for k, v in official_ckpt.raw.items())
    assert 0 < drift < 1e-3
    # the EMA started from the EMA weights: after one update it is lerp(ema_0, model_1, 1 - decay)
    decay = state["config"]["ema"]
    for k, v in official_ckpt.ema.items():
        torch.testing.assert_close(state["ema"][k], torch.lerp(v, state["model"][k], 1 - decay), rtol=1e-6,
                                   atol=1e-6, msg=k)
    # starting from the converted checkpoint is the same run
    assert _fine_tune(official_ckpt.converted, data, tmp_path / "run2") == 0
    again = torch.load(tmp_path / "run2" / "latest.pt", weights_only=False)
    for key in ("model", "ema"):
        _assert_same_weights(again[key], state[key])
    # once the run has a checkpoint, --resume continues it and --init-from is not read again
    capsys.readouterr()
    assert _fine_tune(official_ckpt.path, data, tmp_path / "run", "--resume", "--steps", "2") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised from" not in out
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["step"] == 2


def test_init_from_weights_of_another_model_is_one_line(official_ckpt, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    err = _one_line_error(lambda argv: _fine_tune(official_ckpt.path, data, tmp_path / "run", *argv),
                          ["--model-set", "hidden_size=32", "--model-set", "num_heads=2"], capsys)
    assert "do not fit the model of this run (DiP-Tiny)" in err and "they fit DiP-Tiny" in err
    assert not os.path.exists(tmp_path / "run" / "latest.pt")


# ----------------------------------------------------------------------------- docs/released-weights.md
def _readme():
    with open(os.path.join(REPO, "docs", "released-weights.md")) as f:
        return f.read()


def _readme_commands():
    section = _readme().split("# From the released weights to FID", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_commands_run_end_to_end(official_ckpt, tmp_path, monkeypatch, capsys):
    from dip import evaluate
    commands = _readme_commands()
    assert [c[0] for c in commands] == ["dip-convert", "torchrun", "dip-eval"]
    convert, sample, evaluation = commands
    monkeypatch.chdir(tmp_path)
    shutil.copy(official_ckpt.path, tmp_path / convert[1])  # the released file, here a DiP-Tiny stand-in
    # the commands as written, at DiP-Tiny's size: the model name swapped, the sizes made small
    assert cli.convert_main([MODEL if a == "DiP-XL/16" else a for a in convert[1:]]) == 0
    dip_cli = sample.index("dip.cli")
    assert sample[dip_cli - 1] == "-m" and "--preset" in sample
    assert cli.main(sample[dip_cli + 1:] + SMALL) == 0
    samples, reference = evaluation[1], evaluation[2]
    np.savez(reference, np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    # no Inception weights here: mean colours as the features
    monkeypatch.setattr(evaluate, "load_extractor",
                        lambda *a, **k: (lambda x: x.reshape(x.shape[0], -1, 3).mean(1).astype(np.float64)))
    capsys.readouterr()
    assert cli.eval_main(evaluation[1:] + ["--device", "cpu", "--no-progress"]) == 0
    assert re.search(r"^fid: \d+\.\d+$", capsys.readouterr().out, re.M)
    with np.load(samples) as f:
        assert f["arr_0"].shape == (10, 16, 16, 3)


def test_released_weights_page_states_the_preset_the_code_has():
    # the time estimate on that page is checked with every generated section (tests/test_docs.py)
    assert official.PRESETS["paper-256"].summary() in _readme()


def test_estimate_cli(capsys):
    assert official.main(["--estimate"]) == 0 and capsys.readouterr().out.strip() == official.estimate_markdown()
    assert official.main(["--presets"]) == 0 and capsys.readouterr().out.strip() == official.presets_markdown()
    assert official.main(["--bogus"]) == 2 and "usage" in capsys.readouterr().err


def test_anchors_file_agrees_with_the_shared_reference_numbers():
    """bench/anchors.json holds the numbers of shared/ANCHORS.md that the estimate uses; where the
    shared file is present (a checkout inside the project's workspace) they must agree."""
    candidates = [os.path.join(REPO, *up, "shared", "ANCHORS.md") for up in ((), ("..",), ("..", ".."))]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        pytest.skip("shared/ANCHORS.md is not beside this checkout")
    with open(found) as f:
        text = f.read()
    with open(official.ANCHORS_FILE) as f:
        anchors = json.load(f)
    xl = anchors["dipxl16_256"]
    assert re.search(rf"\| forward, batch 64 \| {xl['forward_batch64_ms']['eager']} ms \|", text)
    assert re.search(rf"\| bf16 matmul 8192\^3 \| {anchors['bf16_matmul_tflops']} TFLOP/s \|", text)
    assert f"{xl['gflop_per_image_forward']} GFLOP per 256x256 image" in text
    step = xl["train_step_batch32_ms"]
    assert re.search(rf"\| training step, batch 32, [^|]*\| {step['eager']} ms [^|]*\| *\| {step['compile']} ms", text)
    paper = anchors["paper_training"]
    assert f"{paper['epochs']} epochs in {paper['hours']}x{paper['gpus']} GPU-hours" in text
    assert anchors["date"] in text and "H200" in text


def test_convert_help_and_module_entry():
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--help"])
    assert exc.value.code == 0
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'dip-convert = "dip.cli:convert_main"' in f.read()
