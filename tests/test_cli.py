import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dip import cli
from dip.checkpoint import load_model_from_checkpoint

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


@pytest.fixture(scope="module")
def one_thread():
    # the conv head's small GEMMs crawl when 2 OpenMP threads fight other processes for 2 cores
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """A two-class DiP-Tiny checkpoint trained for two steps at 16x16."""
    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "data"
    for c in ("a", "b"):
        os.makedirs(data / c)
        for i in range(2):
            arr = np.random.default_rng(i + 7).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / c / f"{i}.png")
    out = root / "run"
    code = cli.train_main(["DiP-Tiny", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
                           "--image-size", "16", "--device", "cpu", "--num-workers", "0",
                           "--model-set", "hidden_size=32", "--model-set", "num_heads=2", "--model-set", "depth=1",
                           "--no-progress"])
    assert code == 0
    return out


SAMPLE_ARGS = ["--per-class", "2", "--batch-size", "3", "--steps", "3", "--cfg-scale", "2.0", "--seed", "4",
               "--device", "cpu", "--no-progress"]


def _expected_npz_images(run, seed=4):
    """What dip-sample must write for SAMPLE_ARGS: labels [0, 0, 1, 1] in batches [0, 0, 1], [1], batch
    k drawn by dip.sample.sample with seed + k."""
    from dip import sample as sampling
    model, _ = load_model_from_checkpoint(str(run))
    batches = [[0, 0, 1], [1]]
    return np.concatenate([sampling.to_uint8(sampling.sample(model, labels, 16, steps=3, cfg_scale=2.0, seed=seed + k,
                                                             device="cpu", progress=False))
                           for k, labels in enumerate(batches)])


def test_sample_euler_goes_through_the_graph_sampler_with_the_eager_seeds(tiny_run, tmp_path, monkeypatch,
                                                                          one_thread):
    from dip import graph_sampler
    made = []

    class CountingSampler(graph_sampler.GraphSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cli, "GraphSampler", CountingSampler)
    with_graphs, without = tmp_path / "graphs.npz", tmp_path / "eager.npz"
    assert cli.sample_main([str(tiny_run), "--npz", str(with_graphs)] + SAMPLE_ARGS) == 0
    assert len(made) == 1 and made[0].steps == 3 and made[0].cfg_scale == 2.0 and made[0].autocast_dtype is None
    assert not made[0].graphs_usable("cpu")  # so the CPU run took the eager fallback
    assert cli.sample_main([str(tiny_run), "--npz", str(without), "--no-cuda-graph"] + SAMPLE_ARGS) == 0
    assert len(made) == 1  # --no-cuda-graph builds no sampler
    expected = _expected_npz_images(tiny_run)
    for path in (with_graphs, without):
        with np.load(path) as f:
            assert f["arr_1"].tolist() == [0, 0, 1, 1]
            np.testing.assert_array_equal(f["arr_0"], expected)
    # other methods never use it
    assert cli.sample_main([str(tiny_run), "--npz", str(tmp_path / "heun.npz"), "--method", "heun"] + SAMPLE_ARGS) == 0
    assert len(made) == 1


def _sample_worker(rank, world_size, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    if cli.sample_main(argv) != 0:
        raise RuntimeError(f"rank {rank}: dip-sample failed")


def test_sample_npz_across_two_processes_matches_one(tiny_run, tmp_path, one_thread):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "two.npz"
    mp.spawn(_sample_worker, args=(2, port, [str(tiny_run), "--npz", str(path)] + SAMPLE_ARGS), nprocs=2, join=True)
    with np.load(path) as f:
        assert f["arr_1"].tolist() == [0, 0, 1, 1]
        np.testing.assert_array_equal(f["arr_0"], _expected_npz_images(tiny_run))
    assert sorted(os.listdir(tmp_path)) == ["two.npz"]  # the per-rank parts are gone


def test_train_flags_reach_the_config(monkeypatch, capsys):
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return {"step": 0, "loss": 0.0, "checkpoint": None, "unreadable_images": 0}

    monkeypatch.setattr(cli, "train", fake_train)
    assert cli.train_main(["DiP-Tiny", "--data", "d", "--compile", "--grad-checkpointing",
                           "--set", "compile_backend=aot_eager"]) == 0
    assert seen[-1].compile and seen[-1].grad_checkpointing and seen[-1].compile_backend == "aot_eager"
    assert cli.train_main(["DiP-Tiny", "--data", "d"]) == 0
    assert not seen[-1].compile and not seen[-1].grad_checkpointing and seen[-1].compile_backend == "inductor"
