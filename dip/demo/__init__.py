"""The paper's Fig. 3 experiment: overfit one image with a DiT-only model and with DiP.

Both models share one backbone (patch embedding on 16x16 pixel patches, the same DiT blocks, the
same initial weights for a seed) and differ only in the output head: ``head="none"`` is the DiT
final layer (a linear map from each token to its 768 pixel values), ``head="patch_detailer"`` is
DiP's Patch Detailer Head (a small conv U-Net on every patch, conditioned on the token). Each is
trained with flow matching on copies of a single photo (the copies differ in their noise and time
draws; there is no other augmentation, so the target is the one image) for the same number of steps,
with the same noise and time draws, and sampled with the Euler solver from the same noises at several
checkpoints. Paper's claim: the DiT-only model gets the layout and colours but stays blurry; DiP
renders sharp detail.

Backbone width: the DiT final layer maps each token linearly to the 768 values of its 16x16x3
patch, so a backbone narrower than 768 can only emit patches in a subspace and its samples stay
noisy for that reason alone; every preset uses a 768-wide backbone so that the comparison is about
the head, not the rank.

One sample is luck: a tiny model overfitting one photo is chaotic, and a difference in rounding
between two machines can move one 16x16 patch. So every checkpoint is sampled from ``noises``
starting noises, every metric is the median over them, and :data:`VERDICT_RULE` judges the medians;
patches drawn in the wrong place are counted and named on their own (:func:`misplaced_patches`).
``dip-demo --robustness`` reruns the default under other numerics (thread count, head backend, a
1-ulp change of the initial weights) and checks that the verdict and margins hold (dip.demo.robustness).

The parts: ``config`` (DemoConfig, presets), ``metrics``, ``experiment`` (the models and one run),
``runner`` (worker processes, the results file), ``report`` (verdict, tables), ``figure`` (demo.png,
curves.png), ``robustness``, ``ablation`` (the paper's head ablation as a CPU proxy: ``--heads``) and ``docs`` (docs/demo.md's tables and the README's summary, rendered
from the committed results and written by dip.docs).
The command line is ``dip-demo`` (dip.cli).
"""
from .config import (DOCS, HEAD_BACKENDS, HEAD_INITS, LAYOUT_POOL, LAYOUT_PSNR_MIN, LR_SCHEDULES, MODELS, ONEDNN, PHOTOS, PRESETS, REFERENCE,
                     REPO, RESULTS, ROBUSTNESS_RESULTS, T_MEAN_64, DemoConfig)
from .ablation import (ABLATION_HEADS, ABLATION_PHOTOS, ABLATION_RESULTS, HEAD_LABELS, PAPER_FID, ablation_config,
                       ablation_table, run_ablation)
from . import docs
from .experiment import (AbsolutePositions, build_demo_model, he_init_, head_sensitivity, perturb_ulps_, run_one, seeded_model,
                         train_and_sample)
from .figure import detail_window, make_curves, make_figure
from .metrics import (high_frequency_ratio, high_frequency_share, layout_psnr, load_target, misplaced_patches,
                      noise_metrics, psnr, sample_metrics, source_name)
from .report import (VERDICT_RULE, checkpoint_table, judge, load_report, readme_summary, report_markdown,
                     summarize, summary_table)
from .robustness import PERTURBATIONS, robustness_table, run_robustness
from .runner import run_all, run_demo, usable_cores
