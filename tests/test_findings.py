"""analysis/findings.py and raytransfer/convergence.py: the paper's four findings with paired t intervals
over units (split x training seed), computed by hand here; networks whose base did not converge left out;
the plateau rule on hand-made curves."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from analysis.findings import science_check, units_to_resolve, welch_interval
from analysis.results import normalise_rows, with_base
from raytransfer.convergence import PLATEAU_POINTS, plateau_rise


def row(key, treatment, target, n=0, value=0.5, split_kind="similar", seed=0, converged=True):
    return {"job_key": key, "dataset": "toy", "split_kind": split_kind, "split_seed": 0, "seed": seed,
            "split": "dissimilar" if split_kind == "dissimilar" else "similar-s0", "treatment": treatment,
            "target_half": target, "n": n, "arch": "tiny", "recipe": "demo", "top1_best10": value,
            "converged": converged, "status": "done"}


# per training seed: (BnB − base at n = 3..6, AnB7 − base similar, AnB7 − base dissimilar, AnB+ − base, random − AnB)
EFFECTS = {0: (-0.02, -0.01, -0.10, 0.010, -0.30), 1: (-0.03, -0.02, -0.08, 0.020, -0.25),
           2: (-0.01, 0.00, -0.12, 0.015, -0.35)}


def table(effects=EFFECTS, base_converged=True) -> pd.DataFrame:
    rows = []
    for seed, (bnb, anb_sim, anb_dis, anbp, random_minus_anb) in effects.items():
        for kind, anb7 in (("similar", anb_sim), ("dissimilar", anb_dis)):
            p = f"{kind}-s{seed}-"
            base = 0.80
            rows += [row(p + "bA", "baseA", "A", value=0.75, split_kind=kind, seed=seed),
                     row(p + "bB", "baseB", "B", value=base, split_kind=kind, seed=seed, converged=base_converged)]
            for n in range(1, 8):
                anb = anb7 if n == 7 else 0.0
                rows += [row(f"{p}BnB{n}", "BnB", "B", n, base + (bnb if 3 <= n <= 6 else 0.0), kind, seed),
                         row(f"{p}AnB{n}", "AnB", "B", n, base + anb, kind, seed),
                         row(f"{p}AnBp{n}", "AnB+", "B", n, base + anbp, kind, seed),
                         row(f"{p}rf{n}", "random_frozen", "B", n, base + anb + random_minus_anb, kind, seed)]
    return with_base(normalise_rows(pd.DataFrame(rows)))


def t_interval(values):
    mean, sd, g = sum(values) / len(values), pd.Series(values).std(ddof=1), len(values)
    half = stats.t.ppf(0.975, g - 1) * sd / math.sqrt(g)
    return mean, mean - half, mean + half


def test_each_finding_is_a_paired_t_interval_over_units():
    check = science_check(table())
    # co-adaptation: every split kind and seed is a unit (6), each the mean of BnB - base over n = 3..6
    mean, low, high = t_interval([-0.02, -0.02, -0.03, -0.03, -0.01, -0.01])
    part = check["co_adaptation"]
    assert part["estimate"] == pytest.approx(mean) and part["interval"] == pytest.approx([low, high])
    assert part["answer"] == "yes" and part["units"] == 6 and part["networks"] == 6 * 4
    # specificity: paired by training seed, dissimilar minus similar at n = 7: -0.09, -0.06, -0.12
    mean, low, high = t_interval([-0.09, -0.06, -0.12])
    part = check["specificity"]
    assert part["estimate"] == pytest.approx(mean) and part["interval"] == pytest.approx([low, high])
    assert part["answer"] == "yes" and part["units"] == 3 and part["pairing"] == "training seed"
    # fine-tuning: similar split only, mean over n = 3..7 per seed: 0.010, 0.020, 0.015 -> a boost
    mean, low, high = t_interval([0.010, 0.020, 0.015])
    part = check["fine_tuning"]
    assert part["estimate"] == pytest.approx(mean) and part["interval"] == pytest.approx([low, high])
    assert part["answer"] == "yes" and part["networks"] == 3 * 5
    # random vs transfer: random_frozen - AnB, n >= 3, both split kinds
    part = check["random_vs_transfer"]
    assert part["answer"] == "yes" and part["estimate"] == pytest.approx(-0.30) and part["units"] == 6
    for part in check.values():
        assert set(part) >= {"question", "answer", "estimate", "interval", "networks", "text"}


def test_an_interval_that_includes_zero_is_unresolved_and_says_how_many_seeds_would_resolve_it():
    effects = {0: (0.01, 0, -0.1, 0.03, -0.3), 1: (-0.02, 0, -0.1, -0.02, -0.3), 2: (0.005, 0, -0.1, 0.01, -0.3)}
    part = science_check(table(effects))["fine_tuning"]
    assert part["answer"] == "unresolved" and part["interval"][0] < 0 < part["interval"][1]
    need = units_to_resolve([0.03, -0.02, 0.01])
    assert part["seeds_to_resolve"] == need and need > 3
    # the number is the first g where t(g - 1) * sd / sqrt(g) < |mean|
    sd, mean = pd.Series([0.03, -0.02, 0.01]).std(ddof=1), abs(0.02 / 3)
    assert stats.t.ppf(0.975, need - 1) * sd / math.sqrt(need) < mean
    assert stats.t.ppf(0.975, need - 2) * sd / math.sqrt(need - 1) >= mean
    assert f"{need} seeds" in part["text"]


def test_comparisons_against_a_base_that_did_not_converge_are_left_out():
    check = science_check(table(base_converged=False))
    for part in check.values():
        assert part["answer"] == "not enough rows" and part["left_out_unconverged_base"] > 0


def test_comparisons_against_a_base_of_unknown_convergence_are_left_out_and_counted():
    """A base whose row does not say whether it converged (None) counts as not known to have converged;
    the finding leaves its networks out and says so, apart from the bases that did not converge."""
    check = science_check(table(base_converged=None))
    for part in check.values():
        assert part["answer"] == "not enough rows" and part["left_out_unknown_convergence"] > 0
        assert part["left_out_unconverged_base"] == 0 and "convergence is not recorded" in part["text"]
    mixed = table()
    mixed["base_converged"] = mixed["base_converged"].astype(object)
    seed0 = (mixed["seed"] == 0) & (mixed["split_kind"] == "similar")
    mixed.loc[seed0, "base_converged"] = None                   # one unit's base: unknown
    seed1 = (mixed["seed"] == 1) & (mixed["split_kind"] == "similar")
    mixed.loc[seed1, "base_converged"] = False                  # another's: did not converge
    part = science_check(mixed)["co_adaptation"]
    assert part["answer"] != "not enough rows" and part["units"] == 4     # 6 units less those two
    assert (part["left_out_unknown_convergence"], part["left_out_unconverged_base"]) == (28, 28)
    assert ("28 networks left out: their base did not converge. 28 networks left out: their base's convergence "
            "is not recorded") in part["text"]


def test_rows_from_old_records_without_convergence_are_left_out(tmp_path):
    """A results table from before the sweep recorded `converged` (no such column; or the column empty, as
    a table that mixes old and new records writes it): every comparison's base is of unknown convergence."""
    old = table().drop(columns=["converged", "base_converged", "base_value", "rel"])
    for frame in (old, old.assign(converged=float("nan"))):
        frame.to_csv(tmp_path / "results.csv", index=False)
        rows = with_base(normalise_rows(pd.read_csv(tmp_path / "results.csv")))
        check = science_check(rows)
        assert {p["answer"] for p in check.values()} == {"not enough rows"}
        assert all(p["left_out_unknown_convergence"] > 0 for p in check.values())


def test_welch_interval_matches_scipy():
    a, b = [-0.10, -0.12, -0.09, -0.11], [-0.01, 0.02, 0.00]
    estimate, low, high = welch_interval(a, b)
    result = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert estimate == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert [low, high] == pytest.approx([result.low, result.high])


def test_plateau_rise_reads_the_last_fifth_of_the_curve():
    def history(values):        # one evaluation per 10 of 100 steps
        return [{"step": 10 * (i + 1), "val_top1": v} for i, v in enumerate(values)]
    rising = history([0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    assert plateau_rise(rising, 100) == pytest.approx(0.75 - 0.65)          # step 100 vs step 80
    flat = history([0.1, 0.5, 0.7, 0.8, 0.82, 0.83, 0.84, 0.845, 0.846, 0.848])
    assert plateau_rise(flat, 100) < PLATEAU_POINTS
    assert math.isnan(plateau_rise(history([0.5]), 100))


def test_until_plateau_decays_at_each_plateau_and_stops_after_the_last():
    from raytransfer.convergence import plateau_state

    rising = [0.1 * e for e in range(10)]
    assert plateau_state(rising, decays=2, patience=3) == (0, False)
    # flat from epoch 6 on: the first level plateaus at the end of epoch 6 (mean of 4..6 vs 1..3 is higher
    # by 0.3, so not yet); then 3 + 3 more flat epochs per level
    flat = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] + [0.6] * 6
    level, stop = plateau_state(flat, decays=2, patience=3)
    assert (level, stop) == (1, False)
    assert plateau_state(flat + [0.6] * 6, decays=2, patience=3) == (2, False)
    assert plateau_state(flat + [0.6] * 12, decays=2, patience=3) == (2, True)


def two_arms(main_bnb=(0.01, -0.01, 0.0), lrn_bnb=(-0.03, -0.04, -0.02)):
    """The grid of `table` trained twice, as `--recipes demo,demo_lrn` does: BnB − base at n = 3..6 per training
    seed given per arm; the other effects as EFFECTS."""
    frames = []
    for recipe, bnb in (("demo", main_bnb), ("demo_lrn", lrn_bnb)):
        effects = {seed: (b, *EFFECTS[seed][1:]) for seed, b in enumerate(bnb)}
        frame = table(effects).drop(columns=["base_value", "rel", "base_converged"])
        frames.append(frame.assign(recipe=recipe, sweep_recipe=recipe, job_key=frame["job_key"] + "-" + recipe))
    return pd.concat(frames, ignore_index=True)


def test_co_adaptation_is_answered_per_arm_with_its_interval_and_the_paired_difference():
    from analysis.findings import co_adaptation_by_arm
    from analysis.report import arms_of

    arms, small = arms_of(two_arms())
    assert list(arms) == ["demo", "demo_lrn"] and small == {"demo", "demo_lrn"}
    result = co_adaptation_by_arm(arms, "the rule", small)
    assert result["main"] == "demo"
    # each arm: 6 units (2 split kinds x 3 seeds), each the mean of BnB − base over n = 3..6
    for label, bnb in (("demo", (0.01, -0.01, 0.0)), ("demo_lrn", (-0.03, -0.04, -0.02))):
        mean, low, high = t_interval([v for v in bnb for _ in range(2)])
        part = result["arms"][label]
        assert part["estimate"] == pytest.approx(mean) and part["interval"] == pytest.approx([low, high])
        assert part["networks"] == 24 and part["units"] == 6 and part["bases"] == 12
        assert part["bases_not_converged"] == 0 and "24 networks" in part["text"]
    assert result["arms"]["demo"]["answer"] == "unresolved" and result["arms"]["demo_lrn"]["answer"] == "yes"
    # the difference demo_lrn − demo, paired by unit: -0.04, -0.03, -0.02 per seed, each in two split kinds
    difference = result["difference"]["demo_lrn"]
    mean, low, high = t_interval([-0.04, -0.04, -0.03, -0.03, -0.02, -0.02])
    assert difference["estimate"] == pytest.approx(mean) and difference["interval"] == pytest.approx([low, high])
    assert difference["units"] == 6 and difference["minus"] == "demo"
    assert "co-adaptation shows more there" in result["reading"]
    assert "dip (BnB below its base at n = 3..6) shows with demo_lrn, not with demo" in result["reading"]


def test_arms_without_a_dip_say_the_finding_is_not_reproduced_and_why_at_demo_size():
    from analysis.findings import co_adaptation_by_arm
    from analysis.report import arms_of

    arms, small = arms_of(two_arms(lrn_bnb=(0.0, 0.01, -0.005)))
    result = co_adaptation_by_arm(arms, "the rule", small)
    assert {p["answer"] for p in result["arms"].values()} == {"unresolved"}
    assert "cannot tell the arms apart" in result["reading"]
    assert "not reproduced in any arm" in result["reading"] and "expected reading at demo size" in result["reading"]
    # the same arms trained with recipes of the paper's size: no claim about demo size
    big = {label.replace("demo", "paper"): rows for label, rows in arms.items()}
    assert "demo size" not in co_adaptation_by_arm(big, "the rule", set())["reading"]
    # one arm: nothing to compare
    assert co_adaptation_by_arm({"demo": arms["demo"]}, "the rule") is None


def test_the_report_answers_co_adaptation_per_arm_beside_the_main_arms_findings(tmp_path):
    """science_check.json keeps its keys for the main arm (the first recipe) and adds each arm's answer."""
    import json

    from analysis.report import build_report

    two_arms().drop(columns=["sweep_recipe"]).to_csv(tmp_path / "results.csv", index=False)
    build_report(tmp_path)
    check = json.loads((tmp_path / "science_check.json").read_text())
    assert set(check) == {"co_adaptation", "specificity", "fine_tuning", "random_vs_transfer", "convergence",
                          "co_adaptation_by_arm"}
    by_arm = check["co_adaptation_by_arm"]
    assert by_arm["main"] == "demo" and list(by_arm["arms"]) == ["demo", "demo_lrn"]
    assert check["co_adaptation"]["estimate"] == pytest.approx(by_arm["arms"]["demo"]["estimate"])
    assert check["co_adaptation"]["networks"] == 24 and check["convergence"]["bases"] == 12
    page = (tmp_path / "report.html").read_text()
    assert 'id="co-adaptation-arms"' in page and 'data-arm="demo_lrn"' in page
    assert "co-adaptation is answered for each at the top" in page


def test_one_demo_sized_arm_without_the_dip_says_it_is_not_reproduced_and_why(tmp_path):
    """The default demo (one arm): its report says plainly that the paper's dip is not reproduced at demo size and
    why that is the expected reading; a table of paper-sized nets and a table that shows the dip say nothing."""
    import json

    from analysis.findings import co_adaptation_reading
    from analysis.report import build_report

    demo = two_arms().query("recipe == 'demo'").drop(columns=["sweep_recipe"])
    demo.to_csv(tmp_path / "results.csv", index=False)
    build_report(tmp_path)
    part = json.loads((tmp_path / "science_check.json").read_text())["co_adaptation"]
    assert part["answer"] == "unresolved"
    assert part["reading"].startswith("The paper's dip (BnB below its base at n = 3..6) is not reproduced at demo size")
    assert "expected reading at demo size" in part["reading"]
    page = (tmp_path / "report.html").read_text()
    assert "is not reproduced at demo size. That is the expected reading" in page
    assert co_adaptation_reading(part, small=False) is None
    assert co_adaptation_reading({**part, "answer": "yes"}, small=True) is None
    assert co_adaptation_reading({**part, "answer": "not enough rows"}, small=True) is None


def test_an_estimate_too_close_to_zero_says_so_rather_than_asking_for_an_interval_it_has():
    part = science_check(table({s: (v, *EFFECTS[s][1:]) for s, v in enumerate((0.01, -0.01, 0.0))}))["co_adaptation"]
    assert part["answer"] == "unresolved" and part["interval"] is not None and "seeds_to_resolve" not in part
    assert "too close to zero" in part["text"] and "give an interval" not in part["text"]
