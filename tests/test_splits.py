"""Class splits: the paper's halves rebuilt bit-exactly, the WordNet rule, files, hashes, bad input."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from raytransfer import splits, wordnet
from raytransfer.splits import (Split, SplitError, builtin_classes, dissimilar_split, file_split, half_classes,
                                half_indices, paper_indices, run_split, similar_split, validate_split,
                                wordnet_difference)
from raytransfer.wordnet import WordNetUnavailable, lexnames_text, load_wordnet

DEBIAN_WORDNET = Path("/usr/share/wordnet")
needs_debian_wordnet = pytest.mark.skipif(not (DEBIAN_WORDNET / "data.noun").is_file(),
                                          reason="Debian wordnet-base not installed")


@pytest.fixture(scope="module")
def imagenet():
    return builtin_classes("imagenet-1k")


@pytest.fixture(scope="module")
def debian_wordnet():
    return load_wordnet([DEBIAN_WORDNET])  # the dict folder path, not nltk's data path


@pytest.fixture
def toy_dataset(tmp_path):
    """A prepared-dataset directory like the synthetic one: 6 classes in two tagged families."""
    classes = [{"index": i, "id": f"{fam}_{k}", "name": f"{fam} {k}", "superclass": fam}
               for i, (fam, k) in enumerate([(f, k) for f in ("animals", "tools") for k in range(3)])]
    manifest = {"name": "synthetic", "source": "synthetic", "classes": classes,
                "superclass_order": ["tools", "animals"], "counts": {}, "settings": {}, "fingerprint": "0"}
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "toy", classes


def split_args(dataset, out, **kw):
    args = dict(dataset=str(dataset), kind="similar", seed=None, rule="auto", a_file=None, b_file=None,
                wordnet_dir=None, out=str(out))
    return argparse.Namespace(**{**args, **kw})


# -- similar: the paper's four random halves -------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_similar_split_rebuilds_paper_halves_bit_exactly(imagenet, seed):
    split = similar_split("imagenet-1k", imagenet, seed)
    assert half_indices(split, "A", imagenet) == paper_indices(f"half{seed}A")
    assert half_indices(split, "B", imagenet) == paper_indices(f"half{seed}B")
    assert (split.kind, split.rule, split.seed) == ("similar", "paper-random", seed)
    assert (len(split.A), len(split.B)) == (500, 500)


def test_shipped_paper_lists_match_shared_copies():
    shared = Path("/work/shared/paper")
    if not shared.is_dir():
        pytest.skip("no shared paper folder on this machine")
    for name in ["half0A", "half3B", "man", "nat"]:
        assert paper_indices(name) == [int(x) for x in (shared / f"paper_split_{name}.txt").read_text().split()]


def test_seed_4_and_plain_int_seed_give_other_halves(imagenet):
    paper_a = [paper_indices(f"half{s}A") for s in range(4)]
    seed4 = half_indices(similar_split("imagenet-1k", imagenet, 4), "A", imagenet)
    assert len(seed4) == 500 and seed4 not in paper_a
    # why the one-element list matters: seed(s) and seed([s]) seed RandomState differently
    np.random.seed(0)
    plain = sorted(int(i) for i in np.random.choice(np.arange(1000), 500, replace=False))
    assert plain != paper_a[0]


def test_similar_split_generalises_to_odd_class_counts(toy_dataset):
    _, classes = toy_dataset
    split = similar_split("synthetic", classes[:5], seed=0)
    assert len(split.A) == 2 and len(split.B) == 3 and not set(split.A) & set(split.B)
    assert split == similar_split("synthetic", classes[:5], seed=0)


# -- dissimilar: man-made vs natural ---------------------------------------------------------------

def test_dissimilar_paper_lists_are_551_man_made_449_natural(imagenet):
    split = dissimilar_split("imagenet-1k", imagenet, ["man-made", "natural"])
    man, nat = half_indices(split, "A", imagenet), half_indices(split, "B", imagenet)
    assert (split.rule, split.A_name, split.B_name) == ("paper-lists", "man-made", "natural")
    assert (len(man), len(nat)) == (551, 449)
    assert man == paper_indices("man") and nat == paper_indices("nat")
    assert not set(man) & set(nat) and sorted(man + nat) == list(range(1000))


@needs_debian_wordnet
def test_wordnet_rule_gives_522_478_and_differs_from_paper_by_29(imagenet, debian_wordnet):
    split = dissimilar_split("imagenet-1k", imagenet, rule="wordnet", wordnet=debian_wordnet)
    assert (len(split.A), len(split.B)) == (522, 478)
    diff = wordnet_difference(imagenet, debian_wordnet)
    assert diff["count"] == 29 and diff["man_made_in_wordnet_only"] == []
    names = {row["name"] for row in diff["man_made_in_paper_only"]}
    assert {"pizza", "espresso", "street sign", "toilet tissue"} <= names
    paper_man = set(paper_indices("man"))
    assert set(half_indices(split, "A", imagenet)) == paper_man - {r["index"] for r in diff["man_made_in_paper_only"]}


@needs_debian_wordnet
def test_wordnet_rule_is_auto_for_other_wnid_datasets(imagenet, debian_wordnet):
    subset = [dict(c, index=i, superclass=None) for i, c in enumerate(imagenet[::100])]  # tench ... 10 classes
    split = dissimilar_split("my-folder", subset, None, wordnet=debian_wordnet)
    assert split.rule == "wordnet" and len(split.A) + len(split.B) == 10
    assert "n01440764" in split.B  # tench is natural


@needs_debian_wordnet
def test_debian_dict_folder_is_staged_where_nltk_accepts_it(tmp_path, monkeypatch):
    import nltk
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])  # only the staged root
    folder = wordnet._nltk_folder_for(DEBIAN_WORDNET)
    assert folder == tmp_path / "raytransfer" / "nltk_data" / "corpora" / "wordnet"
    assert (folder / "lexnames").read_text() == lexnames_text()
    assert not (folder / "data.noun").is_symlink()  # nltk >= 3.10 refuses links out of its data path
    assert nltk.data.path == [str(tmp_path / "raytransfer" / "nltk_data")]
    assert nltk.data.find("corpora/wordnet").path == str(folder)
    mtime = (folder / "data.noun").stat().st_mtime_ns
    assert wordnet._nltk_folder_for(DEBIAN_WORDNET) == folder and (folder / "data.noun").stat().st_mtime_ns == mtime


def test_generated_lexnames_is_wordnet_30s():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[6] == "06\tnoun.artifact\t1"
    assert lines[-1] == "44\tadj.ppl\t3"


def test_superclass_tags_give_the_family_split(toy_dataset):
    path, classes = toy_dataset
    name, classes, order = splits.load_classes(path)
    split = dissimilar_split(name, classes, order)
    assert split.rule == "superclass" and (split.A_name, split.B_name) == ("tools", "animals")
    assert split.A == ["tools_0", "tools_1", "tools_2"] and split.B == ["animals_0", "animals_1", "animals_2"]


# -- file split, hashing ---------------------------------------------------------------------------

def test_file_split_reads_indices_and_wnids(imagenet, tmp_path):
    (tmp_path / "a.txt").write_text("# half A\n0\nn01443537\n\n2\n")
    (tmp_path / "b.txt").write_text("999\n998  # comment\n")
    split = file_split("imagenet-1k", imagenet, tmp_path / "a.txt", tmp_path / "b.txt")
    assert half_indices(split, "A", imagenet) == [0, 1, 2] and half_indices(split, "B", imagenet) == [998, 999]
    assert half_classes(split, "A") == ["n01440764", "n01443537", "n01484850"]
    assert (split.kind, split.rule, split.seed) == ("file", "file", None)


def test_save_load_round_trip_keeps_sha256(imagenet, tmp_path):
    split = similar_split("imagenet-1k", imagenet, 1)
    loaded = Split.load(split.save(tmp_path / "s.json"))
    assert loaded == split and loaded.sha256 == split.sha256 and len(split.sha256) == 64
    assert similar_split("imagenet-1k", imagenet, 2).sha256 != split.sha256


def test_tampered_split_file_is_refused(imagenet, tmp_path):
    path = similar_split("imagenet-1k", imagenet, 0).save(tmp_path / "s.json")
    d = json.loads(path.read_text())
    d["A"], d["B"] = d["A"][:-1], sorted(d["B"] + d["A"][-1:])
    path.write_text(json.dumps(d))
    with pytest.raises(SplitError, match="was modified"):
        Split.load(path)


# -- bad input: one clear message each -------------------------------------------------------------

def test_unknown_classes_are_named(imagenet, tmp_path):
    (tmp_path / "a.txt").write_text("n01440764\nn99999999\n1000\n")
    (tmp_path / "b.txt").write_text("5\n")
    with pytest.raises(SplitError, match=r"does not have: 1000, n99999999; use the manifest's class ids"):
        file_split("imagenet-1k", imagenet, tmp_path / "a.txt", tmp_path / "b.txt")


def test_overlapping_halves_are_named(imagenet):
    split = Split("imagenet-1k", "file", None, "file", A=["n01440764", "n01443537"], B=["n01443537"])
    with pytest.raises(SplitError, match=r"share 1 class\(es\): n01443537; remove each from one"):
        validate_split(split, imagenet)


def test_empty_half_is_refused(toy_dataset, tmp_path):
    _, classes = toy_dataset
    (tmp_path / "a.txt").write_text("tools_0\n")
    (tmp_path / "b.txt").write_text("# nothing yet\n")
    with pytest.raises(SplitError, match="half B .* is empty"):
        file_split("synthetic", classes, tmp_path / "a.txt", tmp_path / "b.txt")


def test_wordnet_unavailable_says_how_to_get_it(tmp_path, monkeypatch, imagenet):
    with pytest.raises(WordNetUnavailable, match="apt-get install wordnet-base"):
        load_wordnet([tmp_path])
    monkeypatch.setenv("RAYTRANSFER_WORDNET_DIR", str(tmp_path))
    subset = [dict(c, index=i, superclass=None) for i, c in enumerate(imagenet[:4])]
    with pytest.raises(WordNetUnavailable, match="nltk.downloader wordnet"):
        dissimilar_split("my-folder", subset)


def test_paper_lists_refused_off_imagenet(toy_dataset):
    _, classes = toy_dataset
    with pytest.raises(SplitError, match="needs the 1000 ImageNet-1k classes"):
        dissimilar_split("synthetic", classes, ["tools", "animals"], rule="paper-lists")


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_writes_split_json(tmp_path, capsys):
    out = tmp_path / "splits" / "similar-s0.json"
    assert run_split(split_args("imagenet-1k", out, seed=0)) == 0
    d = json.loads(out.read_text())
    assert {"A", "B", "kind", "seed", "sha256"} <= set(d) and (d["kind"], d["seed"]) == ("similar", 0)
    assert d["A"][:1] == ["n01440764"] and Split.load(out).sha256 == d["sha256"]
    assert d["sha256"] in capsys.readouterr().out


def test_cli_superclass_split_of_a_prepared_dataset(toy_dataset, tmp_path):
    path, _ = toy_dataset
    out = tmp_path / "d.json"
    assert run_split(split_args(path, out, kind="dissimilar")) == 0
    assert Split.load(out).A == ["tools_0", "tools_1", "tools_2"]


@needs_debian_wordnet
def test_cli_reports_wordnet_difference(tmp_path, capsys, debian_wordnet):
    out = tmp_path / "w.json"
    assert run_split(split_args("imagenet-1k", out, kind="dissimilar", rule="wordnet",
                                wordnet_dir=str(DEBIAN_WORDNET))) == 0
    text = capsys.readouterr().out
    assert "522/478 vs 551/449; 29 classes differ" in text and "pizza" in text


def test_cli_bad_input_returns_2_with_one_message(tmp_path, capsys):
    assert run_split(split_args("imagenet-1k", tmp_path / "x.json")) == 2  # similar without --seed
    assert "needs --seed" in capsys.readouterr().err
    assert run_split(split_args(tmp_path / "nowhere", tmp_path / "x.json", seed=0)) == 2
    assert "containing manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# -- graded splits: between dissimilar and similar ------------------------------------------------

def two_families(size=12):
    """Classes like the demo's built-in data: two superclass families of `size` classes each."""
    return [{"index": i, "id": f"{fam}{k:02d}", "name": f"{fam} {k}", "superclass": fam}
            for i, (fam, k) in enumerate([(f, k) for f in ("manmade", "natural") for k in range(size)])]


def test_splits_made_before_graded_splits_keep_their_hashes(imagenet, tmp_path):
    # the sha256 of these two splits before `level` existed: the jobs keyed by them keep their keys
    assert similar_split("imagenet-1k", imagenet, 0).sha256 == \
        "16fbae8f0b68ec92e0c81576235c62174e4e15357a186d356c8ddad75e5a43b3"
    dissimilar = dissimilar_split("imagenet-1k", imagenet)
    assert dissimilar.sha256 == "0890c6c6f0e32b34fa3371dfad91bdbc86f684f694b2f5bb8c61e42144af6b37"
    path = dissimilar.save(tmp_path / "d.json")
    assert "level" not in json.loads(path.read_text()) and Split.load(path) == dissimilar


@pytest.mark.parametrize("seed", [0, 3])
def test_graded_levels_swap_that_share_of_a_and_one_seed_walks_one_path(seed):
    classes = two_families()
    order = ["manmade", "natural"]
    family = {c["id"]: c["superclass"] for c in classes}
    made = {p: splits.graded_split("toy", classes, p, seed, order) for p in ("0", "1/6", "1/3", "1/2")}
    assert made["0"] == dissimilar_split("toy", classes, order)             # level 0 is the dissimilar split
    swapped = {}
    for p, split in made.items():
        k = round(splits.parse_level(p) * 12)
        assert len(split.A) == len(split.B) == 12 and not set(split.A) & set(split.B)
        assert sum(family[c] == "natural" for c in split.A) == k == sum(family[c] == "manmade" for c in split.B)
        swapped[p] = {c for c in split.A if family[c] == "natural"}
    assert swapped["0"] < swapped["1/6"] < swapped["1/3"] < swapped["1/2"]   # each level swaps the lower ones' too
    assert made["1/3"].level == pytest.approx(1 / 3) and made["1/3"].kind == "graded"
    assert len({s.sha256 for s in made.values()}) == 4
    other = splits.graded_split("toy", classes, "1/3", seed + 1, order)
    assert other.A != made["1/3"].A and other.sha256 != made["1/3"].sha256     # the seed picks the classes


def test_graded_split_round_trips_through_its_file(tmp_path):
    split = splits.graded_split("toy", two_families(), "1/6", 0, ["manmade", "natural"])
    path = split.save(tmp_path / "g.json")
    assert json.loads(path.read_text())["level"] == pytest.approx(1 / 6)
    assert Split.load(path) == split


@pytest.mark.parametrize("level,message", [
    ("0.55", "not exact on families of 12 (manmade) and 12 (natural) classes: 12 x 0.55 is not a whole number of "
             "classes. The nearest exact levels are 1/2 and 7/12"),
    ("1.5", "graded level 1.5 is outside [0, 1]"),
    ("half", "graded level 'half' is not a number: write it as a fraction such as 1/6"),
    ("1/0", "is not a number"),
])
def test_a_bad_graded_level_is_one_error_naming_the_fix(level, message):
    with pytest.raises(SplitError, match=re_escape(message)):
        splits.graded_split("toy", two_families(), level, 0, ["manmade", "natural"])


def re_escape(text):
    import re
    return re.escape(text)


def test_graded_levels_on_imagenet_are_the_paper_families_own(imagenet):
    split = splits.graded_split("imagenet-1k", imagenet, "200/551", 0)
    paper = dissimilar_split("imagenet-1k", imagenet)
    assert len(split.A) == 551 and len(set(split.A) - set(paper.A)) == 200 and split.rule == "paper-lists"
    with pytest.raises(SplitError, match=re_escape("nearest exact levels are 275/551 and 276/551")):
        splits.graded_split("imagenet-1k", imagenet, "0.5", 0)
    with pytest.raises(SplitError, match=re_escape("highest level these families allow is 449/551")):
        splits.graded_split("imagenet-1k", imagenet, "450/551", 0)


def test_graded_split_needs_two_superclass_families():
    untagged = [{"index": i, "id": f"c{i}", "name": f"c{i}"} for i in range(8)]
    with pytest.raises(SplitError, match="a graded split mixes two superclass families, and dataset 'plain' has "
                                         "neither superclass tags nor wnid class ids"):
        splits.graded_split("plain", untagged, "1/4", 0, None)


def test_cli_graded_split_and_its_flag_checks(toy_dataset, tmp_path, capsys):
    data, _ = toy_dataset
    parser = splits.add_split_arguments(argparse.ArgumentParser())
    out = tmp_path / "g.json"
    assert run_split(parser.parse_args([str(data), "--kind", "graded", "--level", "1/3", "--seed", "2",
                                        "--out", str(out)])) == 0
    assert "graded split of synthetic (superclass seed 2 level 1/3)" in capsys.readouterr().out
    assert Split.load(out).level == pytest.approx(1 / 3)
    for argv, message in ((["--kind", "graded", "--seed", "0"], "--kind graded needs --level P"),
                          (["--kind", "similar", "--seed", "0", "--level", "1/3"], "--level applies to --kind graded")):
        assert run_split(parser.parse_args([str(data), *argv, "--out", str(out)])) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_graded_levels_in_the_grid_key_their_jobs_and_level_0_is_the_dissimilar_split():
    from ray import tune

    from raytransfer.recipes import get_recipe
    from raytransfer.sweep.errors import SweepError
    from raytransfer.sweep.jobs import Dataset, build_jobs, expand_axes
    from raytransfer.synthetic import FAMILIES, SyntheticSpec

    classes = SyntheticSpec(superclasses_per_family=3, classes_per_superclass=2).classes()   # 6 + 6 classes
    for i, c in enumerate(classes):
        c["index"] = i
    ds = Dataset("unused", "synthetic", "f" * 64, classes, list(FAMILIES))

    def jobs(splits, seeds=(0,)):
        grid = {"split": tune.grid_search(splits), "split_seed": tune.grid_search(list(seeds)), "target": "B",
                "seed": 0, "treatment": "AnB", "n": 1}
        return build_jobs(expand_axes(grid), ds, get_recipe("smoke"))

    made, by_label = jobs(["dissimilar", "graded:0", "graded:1/6", "graded:1/2"], seeds=(0, 1))
    anb = {j.key: j for j in made if j.treatment == "AnB"}
    # level 0 is the dissimilar split at every seed: its bases and AnB exist once
    assert sorted(by_label) == ["dissimilar", "graded-1of2-s0", "graded-1of2-s1", "graded-1of6-s0", "graded-1of6-s1"]
    assert len(anb) == 5 and sum(j.split_kind == "dissimilar" for j in anb.values()) == 1
    assert sorted(j.row()["split_level"] for j in anb.values()) == [0.0, 1 / 6, 1 / 6, 0.5, 0.5]
    assert {k.split("-")[0] for k in anb} == {"dissimilar0", "graded1of6s0", "graded1of6s1", "graded1of2s0",
                                              "graded1of2s1"}
    again, _ = jobs(["graded:1/6"], seeds=(0,))
    assert {j.key for j in again} <= {j.key for j in made}                  # the same level and seed: the same keys
    with pytest.raises(SplitError, match=re_escape("graded level 1/4 is not exact on families of 6")):
        jobs(["graded:1/4"])
    with pytest.raises(SweepError, match="graded level 'x' is not a number"):
        jobs(["graded:x"])
