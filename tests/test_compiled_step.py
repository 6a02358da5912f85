"""The compiled training step (TrainConfig.compile): one graph with the dip custom ops inside, and the
same weights as the eager step. CPU: torch.compile's aot_eager backend (Dynamo + AOTAutograd, the
tracing that matters here, without inductor's C++ builds)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dip import checkpoint as ckpt
from dip.data import InMemoryImageDataset
from dip.diffusion import DDPM, FlowMatching
from dip.models import DiPTiny
from dip.train import TrainConfig, draw_loss_inputs, make_loss_fn, train

# two blocks and the conv Patch Detailer Head: every dip op is in the traced step
TINY = dict(hidden_size=32, num_heads=2, depth=2, head="patch_detailer")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs: two OpenMP threads on two shared cores only fight
    yield
    torch.set_num_threads(saved)
    torch._dynamo.reset()


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return list(torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


def _cfg(tmp_path, name, **kw):
    base = dict(model="DiP-Tiny", model_overrides=dict(TINY), out=str(tmp_path / name), image_size=32,
                global_batch=4, grad_accum=2, steps=3, lr=1e-3, num_workers=0, log_interval=1, ckpt_interval=100,
                progress=False, device="cpu", seed=5, ema=0.9, label_dropout=0.5, compile_backend="aot_eager")
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_checkpoints(path_a, path_b, atol, rtol):
    a, b = ckpt.load_checkpoint(path_a), ckpt.load_checkpoint(path_b)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=rtol, msg=lambda m: f"{part} {k}: {m}")


def _ops_in(graph_module):
    # Dynamo records the op packet (dip.attention) or an overload (dip.attention.default)
    return {str(n.target).removesuffix(".default") for n in graph_module.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("objective,grad_checkpointing", [("flow", False), ("ddpm", True)])
def test_loss_traces_into_one_graph_with_the_dip_ops(objective, grad_checkpointing):
    from torch._dynamo.utils import counters
    model = DiPTiny(**TINY).set_grad_checkpointing(grad_checkpointing)
    obj = FlowMatching() if objective == "flow" else DDPM()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    counters.clear()
    # fullgraph=True raises at the first graph break; the counters double-check it
    loss_fn = torch.compile(make_loss_fn(obj), fullgraph=True, dynamic=False, backend=recording_backend)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    draws = draw_loss_inputs(obj, x, torch.Generator().manual_seed(0))
    loss = loss_fn(model, x, torch.tensor([1, 10]), draws)
    loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) == 1
    found = _ops_in(graphs[0])
    if grad_checkpointing:  # the blocks sit in the checkpoint higher-order op's subgraphs
        for sub in graphs[0].modules():
            if isinstance(sub, torch.fx.GraphModule):
                found |= _ops_in(sub)
    for op in ("patchify", "attention", "rmsnorm_modulate", "gated_residual", "swiglu", "patch_detailer",
               "unpatchify"):
        assert f"dip.{op}" in found, (op, sorted(found))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_draw_loss_inputs_reproduce_the_generator_loss():
    model = DiPTiny(**TINY)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 4, 10])
    for obj in (FlowMatching(), DDPM()):
        expected = obj.loss(model, x, y, generator=torch.Generator().manual_seed(7))["loss"]
        draws = draw_loss_inputs(obj, x, torch.Generator().manual_seed(7))
        assert torch.equal(make_loss_fn(obj)(model, x, y, draws), expected)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_steps_give_the_eager_weights(tmp_path, grad_checkpointing):
    data = InMemoryImageDataset(_images(6), labels=[0, 1, 2, 0, 1, 2], random_flip=True)
    from torch._dynamo.utils import counters
    eager = train(_cfg(tmp_path, "eager", grad_checkpointing=grad_checkpointing), dataset=data)
    counters.clear()
    compiled = train(_cfg(tmp_path, "compiled", compile=True, grad_checkpointing=grad_checkpointing), dataset=data)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # it did run compiled
    # fp32 throughout; AOTAutograd's backward may sum gradient contributions in another order
    _assert_same_checkpoints(eager["checkpoint"], compiled["checkpoint"], atol=1e-5, rtol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, cfg, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg, dataset=data)


@pytest.mark.slow  # ~15 s each: two spawned processes, each compiling
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_two_processes_match_eager_one_process(tmp_path, parallel):
    if parallel == "fsdp":
        from dip.distributed import fully_shard_fn
        try:
            fully_shard_fn()
        except RuntimeError as err:
            pytest.skip(str(err))
    data = InMemoryImageDataset(_images(4), labels=[0, 1, 2, 0], random_flip=True)
    single = train(_cfg(tmp_path, "single", steps=2), dataset=data)
    mp.spawn(_worker, args=(2, _free_port(), _cfg(tmp_path, "multi", steps=2, grad_accum=1, parallel=parallel,
                                                  compile=True), data), nprocs=2, join=True)
    _assert_same_checkpoints(single["checkpoint"], str(tmp_path / "multi"), atol=1e-5, rtol=1e-4)
