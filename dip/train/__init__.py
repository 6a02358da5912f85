"""Training, in torchtitan's parts: ``config`` (TrainConfig, load_config), ``step`` (what one step
computes), ``trainer`` (``Trainer.train_step``: accumulation, clipping, the non-finite skip, EMA)
and ``run`` (``train``: the run folder, data, resume, checkpoints, samples and FID around it).
The process group and its collectives are ``dip.distributed``'s."""
from .config import TrainConfig, load_config
from .run import train
from .step import draw_loss_inputs, make_loss_fn
from .trainer import StepResult, Trainer

__all__ = ["TrainConfig", "load_config", "train", "Trainer", "StepResult", "draw_loss_inputs", "make_loss_fn"]
