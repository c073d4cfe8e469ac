"""The diagnostics' math on known values: CKA's invariances, estimators ranking a separable toy
problem's features, LEEP against its closed form, Kendall's tau; then the diagnostic jobs' keys and
dependencies (no Ray, no training)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from raytransfer.diagnostics import (CKAAccumulator, gram, h_score, hsic1, kendall_tau, leep, linear_cka, logme,
                                     probe_accuracy)


def test_cka_of_a_representation_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(200, 30))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, batch_size=50) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 20))
    y = x @ rng.normal(size=(20, 15)) + 0.5 * rng.normal(size=(240, 15))      # related, not equal
    q = ortho_group.rvs(15, random_state=2)
    for batch in (None, 60):
        base = linear_cka(x, y, batch)
        assert 0.2 < base < 0.999
        assert linear_cka(x, y @ q, batch) == pytest.approx(base, rel=1e-9)
        assert linear_cka(x, 7.5 * y, batch) == pytest.approx(base, rel=1e-9)
        assert linear_cka(x + 100.0, y, batch) == pytest.approx(base, rel=1e-9)   # HSIC_1 ignores a shift


def test_cka_of_independent_representations_is_near_zero_and_minibatches_agree_with_one_batch():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(1000, 10)), rng.normal(size=(1000, 10))
    assert abs(linear_cka(x, y, batch_size=100)) < 0.05      # the debiased estimator: no small-sample inflation
    z = x[:, :5] @ rng.normal(size=(5, 8))
    assert linear_cka(x, z, batch_size=250) == pytest.approx(linear_cka(x, z), abs=0.05)


def test_hsic1_matches_its_u_statistic_definition_on_a_small_case():
    """Song et al.'s estimator equals the average over ordered 4-tuples of distinct indices of
    (k_ij l_ij + k_ij l_kq - 2 k_ij l_ik) -- checked by brute force on 6 examples."""
    from itertools import permutations

    rng = np.random.default_rng(4)
    k, l = gram(rng.normal(size=(6, 3))), gram(rng.normal(size=(6, 4)))
    tuples = list(permutations(range(6), 4))
    brute = np.mean([k[i, j] * l[i, j] + k[i, j] * l[a, b] - 2 * k[i, j] * l[i, a] for i, j, a, b in tuples])
    assert hsic1(k, l) == pytest.approx(brute, rel=1e-9)


def test_accumulator_counts_each_self_term_once_per_minibatch():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    acc = CKAAccumulator()
    acc.add("a", "a", gram(a), gram(a))
    acc.add("a", "b", gram(a), gram(b))
    assert acc.cka("a", "a") == pytest.approx(1.0)
    assert acc.cka("a", "b") == pytest.approx(linear_cka(a, b))


def separable_problem(seed=0, n=600, classes=4):
    """Features that carry the label (class means far apart) and features that are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.normal(scale=4.0, size=(classes, 8))
    good = means[y] + rng.normal(size=(n, 8))
    weak = 0.3 * means[y] + rng.normal(size=(n, 8))
    noise = rng.normal(size=(n, 8))
    return y, good, weak, noise


def test_logme_and_h_score_rank_informative_features_first():
    y, good, weak, noise = separable_problem()
    for estimator in (logme, h_score):
        scores = [estimator(f, y) for f in (good, weak, noise)]
        assert scores[0] > scores[1] > scores[2], estimator.__name__
    assert h_score(noise, y) == pytest.approx(0.0, abs=0.1)     # no class signal: cov(E[f|y]) ~ 0


def test_logme_does_not_depend_on_more_units_than_images():
    """A layer wider than the image count (fc6 at paper scale against a few thousand images)."""
    y, good, _, noise = separable_problem(n=50)
    wide_good = np.hstack([good, np.random.default_rng(1).normal(size=(50, 100))])
    assert np.isfinite(logme(wide_good, y)) and logme(wide_good, y) > logme(noise, y)


def test_probe_separates_a_separable_problem():
    y, good, _, noise = separable_problem()
    assert probe_accuracy(good[:400], y[:400], good[400:], y[400:]) > 0.95
    assert probe_accuracy(noise[:400], y[:400], noise[400:], y[400:]) < 0.5


def test_leep_equals_its_closed_form_on_a_hand_computed_case():
    # two source classes, two target classes, three images
    theta = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    y = np.array([0, 1, 1])
    # P(y, z) = (1/3) sum_i theta(z|x_i) [y_i = y]
    joint = np.array([[0.8, 0.2], [0.8, 1.2]]) / 3
    cond = joint / joint.sum(0)                  # P(y | z): column z sums to 1
    # cond = [[0.5, 1/7], [0.5, 6/7]]
    assert cond == pytest.approx(np.array([[0.5, 1 / 7], [0.5, 6 / 7]]))
    by_hand = np.mean([np.log(0.8 * 0.5 + 0.2 / 7), np.log(0.3 * 0.5 + 0.7 * 6 / 7),
                       np.log(0.5 * 0.5 + 0.5 * 6 / 7)])
    assert leep(theta, y) == pytest.approx(by_hand, rel=1e-12)


def test_leep_is_higher_when_source_classes_predict_target_classes():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 300)
    aligned = np.eye(3)[y] * 0.9 + 0.1 / 3
    scrambled = np.eye(3)[rng.integers(0, 3, 300)] * 0.9 + 0.1 / 3
    assert leep(aligned, y) > leep(scrambled, y)


def test_kendall_tau_of_a_perfect_and_a_reversed_ranking():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])[:1] == (pytest.approx(1.0),)
    tau, p, used = kendall_tau([1, 2, 3, 4, np.nan], [4, 3, 2, 1, 0])
    assert tau == pytest.approx(-1.0) and used == 4 and 0 < p < 1
    assert np.isnan(kendall_tau([1, 2], [1, 2])[0])


# ---------------------------------------------------------------------------------------------
# Diagnostic jobs: keys and dependencies (dry run), then one job's rows on real loaders

from conftest import tiny_jobs  # noqa: E402  (the networks of a small grid, keys only)


def diag_jobs(kinds=("cka", "probe", "estimators"), ns=(1, 2), settings=None):
    from raytransfer.sweep.jobs import DiagnosticSettings, build_diagnostic_jobs
    jobs = tiny_jobs(ns=ns, treatments=("AnB", "BnB", "AnB+", "random_frozen"))
    return jobs, build_diagnostic_jobs(jobs, kinds, settings or DiagnosticSettings())


def test_diagnostic_jobs_depend_on_the_nets_they_read_and_key_by_them():
    from raytransfer.sweep.jobs import DiagnosticSettings

    jobs, diags = diag_jobs()
    by_kind = {d.treatment: d for d in diags}
    assert set(by_kind) == {"diag_cka", "diag_probe", "diag_estimators"}
    base = {j.treatment: j.key for j in jobs if j.treatment in ("baseA", "baseB")}
    transfers = {j.key for j in jobs if j.treatment in ("AnB", "BnB", "AnB+")}
    assert set(by_kind["diag_cka"].deps) == {base["baseA"], base["baseB"]} | transfers   # no random_frozen
    assert by_kind["diag_probe"].deps == by_kind["diag_estimators"].deps == (base["baseA"],)   # target B: baseA
    assert all(d.is_diagnostic and d.base_key is None and d.row()["deps"] == list(d.deps) for d in diags)
    assert len({d.key for d in diags} | {j.key for j in jobs}) == len(diags) + len(jobs)
    # same inputs, same keys; another setting or another net read, another key
    assert [d.key for d in diag_jobs()[1]] == [d.key for d in diags]
    other = {d.treatment: d.key for d in diag_jobs(settings=DiagnosticSettings(val_images=100))[1]}
    assert all(other[t] != by_kind[t].key for t in by_kind)
    more_n = {d.treatment: d.key for d in diag_jobs(ns=(1, 2, 3))[1]}
    assert more_n["diag_cka"] != by_kind["diag_cka"].key and more_n["diag_probe"] == by_kind["diag_probe"].key


def test_diagnostics_flag_defaults_by_scale_and_refuses_unknown_kinds():
    from types import SimpleNamespace

    from raytransfer.sweep.errors import SweepError
    from raytransfer.sweep.runner import SCALES, diagnostic_kinds

    assert diagnostic_kinds(SimpleNamespace(diagnostics=None), SCALES["demo"]) == ("cka", "probe", "estimators")
    assert diagnostic_kinds(SimpleNamespace(diagnostics=None), SCALES["smoke"]) == ()
    assert diagnostic_kinds(SimpleNamespace(diagnostics=None), SCALES["paper"]) == ()
    assert diagnostic_kinds(SimpleNamespace(diagnostics="none"), SCALES["demo"]) == ()
    assert diagnostic_kinds(SimpleNamespace(diagnostics="all"), SCALES["smoke"]) == ("cka", "probe", "estimators")
    assert diagnostic_kinds(SimpleNamespace(diagnostics="probe,cka"), SCALES["paper"]) == ("probe", "cka")
    with pytest.raises(SweepError, match="unknown diagnostic 'ckaa'; expected one of cka, probe, estimators"):
        diagnostic_kinds(SimpleNamespace(diagnostics="ckaa"), SCALES["demo"])


def test_searcher_releases_a_diagnostic_after_all_its_nets_and_a_base_only_after_it():
    from ray.tune.search import Searcher

    from raytransfer.sweep.searcher import DependencySearcher

    jobs, diags = diag_jobs(kinds=("cka",), ns=(1,))
    released = []
    s = DependencySearcher(jobs + diags, release=released.append)
    (cka,) = diags
    done_trials = []
    while True:
        cfg = s.suggest(f"t{len(done_trials)}")
        if cfg in (None, Searcher.FINISHED):
            break
        assert cfg["job_key"] != cka.key or all(d in s.done for d in cka.deps)
        key = cfg["job_key"]
        done_trials.append(key)
        if key == cka.key:
            assert set(cfg["base_uris"]) == set(cka.deps)
            assert not released or all(b not in released for b in cka.deps if "base" in b)
            s.on_trial_complete(f"t{len(done_trials) - 1}", {"output_uri": f"/r/{key}.json"})
        else:
            s.on_trial_complete(f"t{len(done_trials) - 1}", {"weights_uri": f"/w/{key}"})
    assert cka.key in s.done and s.done[cka.key] == f"/r/{cka.key}.json" and len(s.done) == len(jobs) + 1
    bases = [j.key for j in jobs if j.treatment in ("baseA", "baseB")]
    assert set(released) == set(bases) and done_trials[-1] == cka.key   # bases only, once the diagnostic ended


def test_each_diagnostic_computes_its_rows_on_the_half_images(synthetic_dataset):
    import torch

    from raytransfer.diagnose import run_diagnostic
    from raytransfer.models import build_model, layer_names
    from raytransfer.recipes import get_recipe
    from raytransfer.sweep.jobs import DiagnosticSettings, build_diagnostic_jobs

    folder, manifest = synthetic_dataset
    jobs = tiny_jobs(ns=(2,), treatments=("AnB", "BnB"))
    recipe = get_recipe("smoke")
    states = {}
    for i, j in enumerate(jobs):
        torch.manual_seed(i)
        states[j.key] = build_model(recipe.arch, 4, **recipe.arch_kwargs()).state_dict()
    settings = DiagnosticSettings(val_images=8, train_images=16, batch_size=8)
    diags = build_diagnostic_jobs(jobs, ("cka", "probe", "estimators"), settings)
    names = layer_names(recipe.arch)
    for d in diags:
        spec = {**d.spec, "data_dir": str(folder), "dataset_fingerprint": manifest["fingerprint"],
                "target_classes": [c["id"] for c in manifest["classes"]][:4]}
        rows = run_diagnostic(spec, states.__getitem__, torch.device("cpu"))
        kinds = {r["kind"] for r in rows}
        if d.treatment == "diag_cka":
            assert kinds == {"cka"} and len(rows) == len(names) ** 2 + 2 * len(names)   # AxB pairs + 2 transfers
            assert all(np.isfinite(r["value"]) for r in rows), [r["value"] for r in rows]
        elif d.treatment == "diag_probe":
            assert kinds == {"probe"} and [r["layer_a"] for r in rows] == list(names[:-1])
            assert all(0.0 <= r["value"] <= 1.0 for r in rows)
        else:
            assert kinds == {"hscore", "logme", "leep"} and len(rows) == 2 * (len(names) - 1) + 1
        assert all(r["net_a"] in states and r["split_kind"] == "similar" and r["seed"] == 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# One smoke sweep with diagnostics on a local Ray, then the same command again

def test_smoke_sweep_writes_diagnostics_and_skips_them_on_a_rerun(tmp_path):
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import pandas as pd

    from raytransfer.sweep.status import sweep_status

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp"),
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "exp"
    cmd = [sys.executable, str(root / "sweeps" / "full_paper.py"), "--scale", "smoke", "--splits", "similar",
           "--n", "1,4,7", "--treatments", "AnB,AnB+", "--diagnostics", "all", "--no-dashboard", "--num-cpus", "2",
           "--out", str(out)]

    def run():
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    first = run()
    assert "11 jobs, 0 done, 11 to run" in first                      # 2 bases + 6 transfers + 3 diagnostics
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 8 and not results.treatment.str.startswith("diag_").any()   # networks only
    diag = pd.read_csv(out / "diagnostics.csv")
    assert {"kind", "split_kind", "split_seed", "seed", "net_a", "net_b", "layer_a", "layer_b", "value"} <= set(diag)
    assert set(diag.kind) == {"cka", "probe", "hscore", "logme", "leep"}
    assert set(diag.net_a) <= set(results.job_key) and set(diag.net_b.dropna()) <= set(results.job_key)
    ab = diag[(diag.kind == "cka") & (diag.treatment == "baseA-baseB")]
    assert len(ab) == 64 and ab.value.between(-0.5, 1.0 + 1e-9).all()
    frozen = diag[(diag.kind == "cka") & (diag.treatment == "AnB") & (diag.n == 7)]
    copied = frozen[frozen.layer_a.isin(["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"])]
    assert (copied.value.round(6) == 1.0).all()                          # frozen copies: their base's layers
    assert len(diag[diag.kind == "probe"]) == len(diag[diag.kind == "logme"]) == 7
    assert (out / "diagnostics.parquet").is_file()
    tau = json.loads((out / "transferability.json").read_text())["estimators"]
    assert set(tau) == {"hscore", "logme", "leep", "probe"}
    for estimator in ("hscore", "logme", "probe"):
        for treatment in ("AnB", "AnB+"):
            cell = tau[estimator][treatment]
            assert cell["points"] == 3 and -1.0 <= cell["tau"] <= 1.0 and 0.0 <= cell["p_value"] <= 1.0
    assert 'id="diagnostics"' in (out / "report.html").read_text()
    records = {f.stem: json.loads(f.read_text()) for f in (out / "jobstore" / "jobs").glob("*diag_*.json")}
    assert len(records) == 3 and all(r["diagnostic"] and r["rows"] for r in records.values())
    status = sweep_status(str(out))
    assert status["done"] == 11 and status["waiting"] == 0
    base_a = next(b for b in status["bases"] if "-baseA-" in b["job_key"])
    assert base_a["dependents"] == 3 + 3 + 3       # AnB x 3, AnB+ x 3 and the three diagnostics that read it
    again = run()                                                      # same command: nothing runs again
    assert "11 jobs, 11 done, 0 to run" in again
    assert {k: json.loads((out / "jobstore" / "jobs" / f"{k}.json").read_text())["recorded_at"] for k in records} == \
        {k: r["recorded_at"] for k, r in records.items()}
    pd.testing.assert_frame_equal(pd.read_csv(out / "diagnostics.csv"), diag)


def test_estimators_pair_with_the_measured_nets_of_their_own_split_only():
    """Two --split-file manifests are both split_kind 'file', seed 0: the unit's split label keeps them apart."""
    import pandas as pd

    from raytransfer.diagnostics import estimator_pairs

    unit = {"split_kind": "file", "split_seed": 0, "seed": 0, "target_half": "B"}
    measured = pd.DataFrame([{**unit, "split": s, "n": 1, "top1_best10": v} for s, v in (("mine1", 0.4), ("mine2", 0.6))])
    estimates = pd.DataFrame([{**unit, "split": s, "n": 1, "value": v} for s, v in (("mine1", -1.0), ("mine2", -2.0))])
    pairs = estimator_pairs(measured, estimates, "logme")
    assert len(pairs) == 2
    assert dict(zip(pairs["split"], pairs["value"])) == {"mine1": -1.0, "mine2": -2.0}


def test_the_report_says_when_the_bases_started_from_one_init():
    import pandas as pd

    from analysis.diagnostics import bases_share_init

    def bases(recipe, overrides=""):
        return pd.DataFrame([{"treatment": t, "recipe": recipe, "recipe_set": overrides} for t in ("baseA", "baseB")])

    assert bases_share_init(bases("demo")) is True                       # one init stream for both bases
    assert bases_share_init(bases("paper")) is False                     # the paper: independent bases
    assert bases_share_init(bases("paper", "independent_bases=False;iterations=300")) is True
    assert bases_share_init(bases("demo", "independent_bases=True")) is False
