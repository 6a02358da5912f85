"""Trainer.train_step on its own: DiP-Tiny, no run folder, no process group."""
import copy

import pytest
import torch
import torch.distributed as dist

from dip.diffusion import drop_labels
from dip.errors import TrainingDiverged
from dip.models import build_model
from dip.train import TrainConfig, Trainer
from dip.train.step import draw_loss_inputs, step_generator


def _trainer(**settings):
    values = dict(model="DiP-Tiny", image_size=32, global_batch=4, lr=1e-3, ema=0.9, seed=3, device="cpu")
    values.update(settings)
    cfg = TrainConfig(**values).validate()
    torch.manual_seed(0)
    return Trainer(cfg, build_model("DiP-Tiny"))


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, torch.tensor([0, 1, 2, 3])


def _expected_loss(trainer, step, images, labels):
    """The step's loss computed by hand: the mean over micro-batches, each with its own generator."""
    cfg, micro, losses = trainer.cfg, trainer.micro_batch, []
    model = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for j in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, step, j, torch.device("cpu"))
            x = images[j * micro:(j + 1) * micro]
            y = drop_labels(labels[j * micro:(j + 1) * micro], model.num_classes, cfg.label_dropout, gen)
            losses.append(trainer.objective.loss(model, x, y, **draw_loss_inputs(trainer.objective, x, gen))["loss"])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_accumulates_updates_and_moves_the_ema(grad_accum):
    trainer = _trainer(grad_accum=grad_accum)
    images, labels = _batch()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    expected = _expected_loss(trainer, 1, images, labels)
    result = trainer.train_step(1, images, labels)
    assert not dist.is_initialized()
    assert result.applied and result.lr == pytest.approx(1e-3)
    assert trainer.micro_batch == 4 // grad_accum
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-6)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len([p for p in trainer.model.parameters()])
    # EMA after one step: decay * initial + (1 - decay) * updated, for every parameter
    for name, shadow in zip(trainer.ema.names, trainer.ema.shadow):
        now = dict(trainer.model.named_parameters())[name].detach()
        torch.testing.assert_close(shadow, 0.9 * before[name] + 0.1 * now, rtol=1e-5, atol=1e-7)


def test_train_step_clips_the_gradient_norm():
    trainer = _trainer(grad_clip=1e-3)
    result = trainer.train_step(1, *_batch())
    assert float(result.grad_norm) > 1e-3  # the norm before clipping is reported
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert float(clipped) <= 1e-3 * (1 + 1e-5)


def test_train_step_skips_a_nonfinite_step_then_stops():
    trainer = _trainer(skip_nonfinite=1)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda *args: loss_fn(*args) * float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    shadow = [s.clone() for s in trainer.ema.shadow]
    result = trainer.train_step(1, *_batch())
    assert not result.applied and trainer.nonfinite_skipped == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainer.ema.shadow))
    with pytest.raises(TrainingDiverged, match="step 2: the loss or gradient norm is not finite"):
        trainer.train_step(2, *_batch())
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_train_step_is_deterministic_and_its_state_round_trips():
    first, second = _trainer(), _trainer()
    images, labels = _batch()
    for step in (1, 2):
        a, b = first.train_step(step, images, labels), second.train_step(step, images, labels)
        assert torch.equal(a.loss, b.loss)
    state = first.full_state()
    third = _trainer()
    third.load_full_state(state, "in memory")
    assert torch.equal(first.train_step(3, images, labels).loss, third.train_step(3, images, labels).loss)
    for p, q in zip(first.model.parameters(), third.model.parameters()):
        assert torch.equal(p, q)
