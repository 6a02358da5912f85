import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dip import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAINS = {"dip-train": cli.train_main, "dip-sample": cli.sample_main, "dip-eval": cli.eval_main,
         "dip-demo": cli.demo_main}


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_help(prog, capsys):
    with pytest.raises(SystemExit) as exc:
        MAINS[prog](["--help"])
    assert exc.value.code == 0
    assert f"usage: {prog}" in capsys.readouterr().out


@pytest.mark.parametrize("prog,argv,needle", [
    ("dip-train", [], "the following arguments are required"),
    ("dip-train", ["DiP-Tiny", "--steps", "zero"], "positive integer"),
    ("dip-train", ["DiP-Nope", "--data", "x"], "unknown model"),
    ("dip-train", ["DiP-Tiny", "--data", "/no/such/folder", "--device", "cpu"], "does not exist"),
    ("dip-sample", ["/no/such/ckpt.pt"], "does not exist"),
    ("dip-sample", ["x.pt", "--method", "magic"], "invalid choice"),
    ("dip-eval", ["/no/a.npz", "/no/b.npz"], "does not exist"),
    ("dip-demo", ["--steps", "3", "--checkpoints", "9"], "checkpoints"),
    ("dip-demo", ["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_error(prog, argv, needle, capsys):
    try:
        code = MAINS[prog](argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error:") and needle in err, err


def test_console_error_has_no_traceback(tmp_path):
    # the same through a real interpreter, as the console script would run
    out = subprocess.run([sys.executable, "-m", "dip.cli", "sample", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_train_then_sample_png_and_npz(tmp_path, capsys):
    data = tmp_path / "data"
    for c in ("a", "b"):
        os.makedirs(data / c)
        for i in range(2):
            arr = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / c / f"{i}.png")
    out = tmp_path / "run"
    code = cli.train_main(["DiP-Tiny", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
                           "--image-size", "16", "--device", "cpu", "--num-workers", "0", "--head", "none",
                           "--model-set", "hidden_size=32", "--model-set", "num_heads=2", "--model-set", "depth=1",
                           "--log-interval", "1", "--no-progress"])
    assert code == 0 and os.path.isfile(out / "latest.pt") and os.path.isfile(out / "metrics.jsonl")
    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    code = cli.sample_main([str(out), "--grid", str(grid), "--num", "4", "--npz", str(npz), "--per-class", "3",
                            "--batch-size", "4", "--steps", "2", "--device", "cpu", "--no-progress"])
    assert code == 0
    assert Image.open(grid).size[0] > 16
    with np.load(npz) as f:
        assert f["arr_0"].shape == (6, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 0, 0, 1, 1, 1]
    # resuming a finished run to more steps continues from its checkpoint
    code = cli.train_main(["DiP-Tiny", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
                           "--image-size", "16", "--device", "cpu", "--num-workers", "0", "--head", "none",
                           "--model-set", "hidden_size=32", "--model-set", "num_heads=2", "--model-set", "depth=1",
                           "--resume", "--no-progress"])
    assert code == 0 and "resumed from" in capsys.readouterr().out


def test_eval_on_two_npz_files(tmp_path, monkeypatch, capsys):
    from dip import evaluate
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    real = evaluate.evaluate

    def with_pixel_features(*args, **kwargs):  # no Inception weights here: mean colours as features
        kwargs["feature_fn"] = lambda x: x.reshape(x.shape[0], -1, 3).mean(1).astype(np.float64)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", with_pixel_features)
    code = cli.eval_main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--device", "cpu", "--no-progress"])
    assert code == 0 and "fid:" in capsys.readouterr().out
