"""What the paper's head ablation (arXiv 2511.18822v3, Table 2) costs at full size.

Each row is a ``dip-train`` config in configs/ablation/: its model's parameters, its forward FLOPs
per 256x256 image (dip.flops: torch's FlopCounterMode on a meta-device model, the dip ops'
matmuls and convolutions added analytically), and the GPU-hours a run
takes. The hours are derived, not measured: the reference DiP-XL/16 training step of
bench/anchors.json (batch 32, bf16, one card) scaled by each model's FLOPs relative to DiP-XL/16's, i.e.
at the same achieved FLOP/s. That flatters the heads made of many small matmuls (coordinate MLP,
intra-patch attention), which reach a lower share of the card's peak than the backbone's large
ones, and leaves out REPA's frozen encoder forward, which the reference step did not run.

``python -m dip.docs`` writes the generated part of docs/ablation.md from this module, and
tests/test_docs.py checks that the page holds exactly that.
"""
import functools
import json
import os
from typing import Any, Dict

import torch

from .flops import forward_flops_per_image
from .models import HEAD_ABLATION, build_model
from .official import ANCHORS_FILE
from .train import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN_IMAGES = 1_281_167  # the ImageNet-1k training split
EPOCHS = (80, 160)
REFERENCE = "configs/ablation/patch_detailer.yaml"  # DiP-XL/16, the model the anchors timed
# (config, what the paper's Table 2 calls it, its FID on ImageNet 256 there): a run per head, then the
# scaled DiT the paper also compares against
RUNS = tuple((f"configs/ablation/{head}.yaml", label + (", DiP-XL/16" if head == "patch_detailer" else ""), fid)
             for head, (label, fid) in HEAD_ABLATION.items()) + (
    ("configs/ablation/dit-1.1b.yaml", "DiT scaled to 1.1B", 2.83),
)


def steps_for_epochs(epochs: int, global_batch: int) -> int:
    """Optimizer steps that show the model ``epochs`` passes over ImageNet-1k's training images."""
    return round(epochs * IMAGENET_TRAIN_IMAGES / global_batch)


def run_facts(config_path: str) -> Dict[str, Any]:
    """Parameters (model, head), forward FLOPs per image and epochs of one config."""
    cfg = load_config(os.path.join(REPO, config_path))
    build = functools.partial(build_model, cfg.model, **cfg.model_overrides)
    with torch.device("meta"):
        model = build()
    flops = forward_flops_per_image(build, cfg.image_size)
    if flops is None:
        raise RuntimeError(f"could not count the FLOPs of {config_path}'s model on the meta device")
    return {"config": config_path, "model": cfg.model, "head": model.config.head, "hidden": model.config.hidden_size,
            "params": sum(p.numel() for p in model.parameters()),
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "gflop": flops / 1e9, "epochs": cfg.steps * cfg.global_batch / IMAGENET_TRAIN_IMAGES}


def gpu_hours(facts: Dict[str, Any], reference: Dict[str, Any], step_ms: float, epochs: float) -> float:
    """Hours on one card of the anchors' kind: the reference model's images/s at a batch-32 training
    step of ``step_ms``, scaled by the FLOP ratio."""
    reference_images_per_s = 32 / (step_ms / 1000.0)
    return epochs * IMAGENET_TRAIN_IMAGES * (facts["gflop"] / reference["gflop"]) / reference_images_per_s / 3600


def ablation_markdown(anchors_path: str = ANCHORS_FILE) -> str:
    """docs/ablation.md's table and the sentences about its cost."""
    with open(anchors_path) as f:
        anchors = json.load(f)
    step = anchors["dipxl16_256"]["train_step_batch32_ms"]
    paper = anchors["paper_training"]
    facts = [run_facts(path) for path, _, _ in RUNS]
    reference = next(f for f in facts if f["config"] == REFERENCE)
    head = ["run (Table 2)", "paper FID", "`dip-train` config", "parameters", "of which the head",
            "GFLOP per image (forward)"]
    head += [f"GPU-hours, {e} epochs" for e in EPOCHS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (path, label, fid), f in zip(RUNS, facts):
        hours = [f"{gpu_hours(f, reference, step['eager'], e):,.0f} "
                 f"({gpu_hours(f, reference, step['compile'], e):,.0f})" for e in EPOCHS]
        lines.append(f"| {label} | {fid:.2f} | [`{path}`](../{path}) | {f['params']:,} | {f['head_params']:,} | "
                     f"{f['gflop']:.1f} | " + " | ".join(hours) + " |")
    total = [sum(gpu_hours(f, reference, step[kind], e) for f in facts)
             for e in EPOCHS for kind in ("eager", "compile")]
    paper_hours = paper["gpus"] * paper["hours"]
    lines += [
        "",
        f"GPU-hours on one {anchors['gpu']}, at the speed of a reference DiP-XL/16 training step (batch 32, bf16, "
        f"{step['eager']} ms; in brackets at {step['compile']} ms, the same step under torch.compile), measured "
        f"{anchors['date']} on {anchors['implementation']}, scaled by each model's FLOPs. The whole table costs "
        f"about {total[0]:,.0f} ({total[1]:,.0f}) GPU-hours at {EPOCHS[0]} epochs and {total[2]:,.0f} "
        f"({total[3]:,.0f}) at {EPOCHS[1]}. For scale, the paper reports {paper['epochs']} epochs of "
        f"{paper['model']} in {paper['hours']} x {paper['gpus']} = {paper_hours} GPU-hours (GPU {paper['gpu']}; "
        f"{paper['source']}), where the estimate above gives "
        f"{gpu_hours(reference, reference, step['eager'], paper['epochs']):,.0f}.",
        "",
        f"Each config trains {reference['epochs']:.0f} epochs ({steps_for_epochs(160, 256):,} steps at batch 256); "
        f"for {EPOCHS[0]} epochs add `--steps {steps_for_epochs(EPOCHS[0], 256)}`.",
    ]
    return "\n".join(lines)
