import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dip import checkpoint as ckpt
from dip.data import InMemoryImageDataset
from dip.train import TrainConfig, load_config, train

TINY = dict(hidden_size=32, num_heads=2, depth=1)


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images (low-res noise upsampled) so there is structure to learn
    low = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return list(torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


def _write_folder(root, n=6, size=16):
    for i, img in enumerate(_images(n, size)):
        folder = os.path.join(root, f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        arr = ((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))
    return root


def _cfg(tmp_path, name="run", **kw):
    base = dict(model="DiP-Tiny", model_overrides=dict(TINY, head="none"), out=str(tmp_path / name),
                image_size=16, global_batch=4, steps=6, lr=1e-3, num_workers=0, log_interval=1, ckpt_interval=3,
                progress=False, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    state = ckpt.load_checkpoint(path)
    return state["model"], state["ema"]


def _assert_same_weights(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.fixture
def one_thread():
    # the conv head's small GEMMs crawl when 2 OpenMP threads fight other processes for 2 cores
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_overfit_tiny_model_drives_loss_down(tmp_path, one_thread):
    data = InMemoryImageDataset(_images(2))
    cfg = _cfg(tmp_path, model_overrides=dict(TINY, head="patch_detailer"), steps=40, global_batch=4, lr=2e-3,
               label_dropout=0.0, ckpt_interval=1000)
    result = train(cfg, dataset=data)
    lines = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert set(lines[0]) >= {"step", "loss", "lr", "img_per_s", "grad_norm", "time"}
    first = np.mean([m["loss"] for m in lines[:8]])
    last = np.mean([m["loss"] for m in lines[-8:]])
    assert last < 0.6 * first, (first, last)
    assert os.path.isfile(result["checkpoint"])


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    data = InMemoryImageDataset(_images(5), labels=[0, 1, 0, 1, 1], random_flip=True)
    full = train(_cfg(tmp_path, "full", steps=7), dataset=data)

    class Killed(Exception):
        pass

    def kill_at_5(step, info):
        if step == 5:  # the last checkpoint is step 3: steps 4 and 5 are lost, as in a real crash
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(tmp_path, "killed", steps=7), dataset=data, on_step=kill_at_5)
    state = ckpt.load_checkpoint(os.path.join(tmp_path, "killed"))
    assert state["step"] == 3 and state["data"] == {"epoch": 2, "index": 2, "seed": 3, "dataset_size": 5,
                                                    "global_batch": 4}
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    resumed = train(_cfg(tmp_path, "killed", steps=7, resume="auto"), dataset=data)
    assert resumed["step"] == 7
    model_a, ema_a = _weights(full["checkpoint"])
    model_b, ema_b = _weights(resumed["checkpoint"])
    _assert_same_weights(model_a, model_b)
    _assert_same_weights(ema_a, ema_b)
    opt_a = ckpt.load_checkpoint(full["checkpoint"])["optimizer"]["state"]
    opt_b = ckpt.load_checkpoint(resumed["checkpoint"])["optimizer"]["state"]
    for pid in opt_a:
        torch.testing.assert_close(opt_a[pid]["exp_avg_sq"], opt_b[pid]["exp_avg_sq"], atol=0, rtol=0)


def test_atomic_checkpoint_write_keeps_previous_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, str(tmp_path), 1)
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, str(tmp_path), 2)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load_checkpoint(str(tmp_path))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]  # no temp file left behind
    ckpt.save_checkpoint({"step": 3}, str(tmp_path), 3, keep_numbered=True)
    assert sorted(os.listdir(tmp_path)) == ["latest.pt", "step_00000003.pt"]
    assert ckpt.load_checkpoint(str(tmp_path))["step"] == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, parallel):
    if parallel == "fsdp":
        from dip.distributed import fully_shard_fn
        try:
            fully_shard_fn()
        except RuntimeError as err:
            pytest.skip(str(err))
    data = _write_folder(str(tmp_path / "data"))
    # a short EMA, so the EMA follows the steps it is compared after
    common = dict(data=data, steps=4, global_batch=4, label_dropout=0.5, random_flip=True, ckpt_interval=100,
                  ema=0.5)
    # one process runs the 2 shards of each global batch as 2 accumulation steps; 2 processes run one each
    single = train(_cfg(tmp_path, "single", grad_accum=2, **common))
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, _cfg(tmp_path, "ddp", parallel=parallel, **common)), nprocs=2, join=True)
    # AdamW cancels a constant factor in the gradients, so the weights alone cannot see a gradient
    # averaged wrongly across processes: every step's loss and gradient norm must agree too
    logs = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("single", "ddp")]
    assert [m["step"] for m in logs[0]] == [m["step"] for m in logs[1]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([m[key] for m in logs[1]], dtype=torch.float64),
                                   torch.tensor([m[key] for m in logs[0]], dtype=torch.float64),
                                   atol=1e-6, rtol=1e-4, msg=lambda m: f"per-step {key}: {m}")
    model_a, ema_a = _weights(single["checkpoint"])
    model_b, ema_b = _weights(str(tmp_path / "ddp"))
    _assert_same_weights(model_a, model_b, atol=1e-5, rtol=1e-4)
    _assert_same_weights(ema_a, ema_b, atol=1e-5, rtol=1e-4)
    state = ckpt.load_checkpoint(str(tmp_path / "ddp"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_load_config_yaml_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: DiP-Tiny, head: none}\nsteps: 5\nlr: 3.0e-4\n")
    cfg = load_config(str(path), out="x")
    assert cfg.model == "DiP-Tiny" and cfg.model_overrides == {"head": "none"} and cfg.steps == 5 and cfg.out == "x"
    with pytest.raises(ValueError, match="unknown config fields"):
        load_config("DiP-Tiny", bogus=1)
    with pytest.raises(ValueError, match="objective"):
        load_config("DiP-Tiny", objective="gan")
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.yaml"))
    assert load_config("DiP-Tiny").compile is False
    cfg = load_config("DiP-Tiny", compile=True, compile_backend="aot_eager", grad_checkpointing=True)
    assert cfg.compile and cfg.compile_backend == "aot_eager" and cfg.grad_checkpointing
    with pytest.raises(ValueError, match="compile_backend"):
        load_config("DiP-Tiny", compile_backend="")
