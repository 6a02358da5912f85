"""The short form of the demo's robustness check (`dip-demo --robustness` is the long one, its table
committed in docs/demo/robustness/): a small demo under what differs between machines (the thread
count, the head's backend, a 1-ulp change of the initial weights) keeps its verdict, and its median
margins stay inside the spread over its samples."""
from dip import demo


def test_small_demo_holds_under_numerics_perturbations(tmp_path):
    cfg = demo.DemoConfig(image_size=32, hidden_size=64, depth=1, num_heads=4, steps=20, batch_size=2, warmup_steps=5,
                          checkpoints=(20,), sample_steps=6, noises=4, seeds=(0,), jobs=1, threads=1, device="cpu",
                          out=str(tmp_path), progress=False)
    result = demo.run_robustness(cfg)
    rows = result["rows"]
    assert {r["perturbation"] for r in rows} == set(demo.PERTURBATIONS)
    reference = next(r for r in rows if r["perturbation"] == "reference")
    for row in rows:
        assert row["same_verdict"] and row["in_spread"], demo.robustness_table(result)
        # each perturbation changed the numbers (a check that ran the same numerics twice proves nothing)
        if row is not reference:
            assert row["psnr_margin"] != reference["psnr_margin"] or row["dip_psnr"] != reference["dip_psnr"]
    assert result["holds"]
    # the head that ran is the one each perturbation asked for
    for name, (_, overrides) in demo.PERTURBATIONS.items():
        saved = demo.load_report(str(tmp_path / name.replace(" ", "-") / "demo.json"))
        assert saved["head_backend"] == overrides.get("head_backend", demo.ONEDNN)
        assert saved["timing"]["threads"] == overrides.get("threads", 1)
    # the table and the README's sentence give the largest move of a median margin
    assert f"moved by {demo.report.largest_move(rows):.2f} dB at most" in demo.robustness_table(result)


def test_largest_move_is_against_each_runs_own_reference():
    rows = [{"perturbation": "reference", "photo": "a", "seed": 0, "psnr_margin": 8.0},
            {"perturbation": "reference", "photo": "a", "seed": 1, "psnr_margin": 5.0},
            {"perturbation": "x", "photo": "a", "seed": 0, "psnr_margin": 7.5},
            {"perturbation": "x", "photo": "a", "seed": 1, "psnr_margin": 5.75}]
    assert demo.report.largest_move(rows) == 0.75
    assert demo.report.largest_move(rows[:2]) == 0.0
