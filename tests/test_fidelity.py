"""The numbers are the method's: full-precision scores, descriptor sentences that name their class, and the public
descriptor files mapped onto the right class indices."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import load_stage

corpus_stage = load_stage("01_build_corpus.py")
eval_stage = load_stage("04_eval_hlc.py")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # the public files, beside the checkout


def two_class_arrays(cos0, cos1, tau=0.0):
    """One image, two classes whose cosine logits are cos0 and cos1 (times scale 25)."""
    w = np.array([[cos0, np.sqrt(1 - cos0 ** 2)], [cos1, np.sqrt(1 - cos1 ** 2)]], dtype=np.float32)
    v = np.array([[1.0, 0.0]], dtype=np.float32)
    return dict(labels=np.array([1]), hlc_features=v, plain_features=v, w_cls=w, scale=np.float64(25.0),
                desc_proto=w, desc_proto_unweighted=w, classname_features=w, logit_scale=np.float64(100.0),
                class_prior=np.array([0.5, 0.5]), k=np.int64(1), tau=np.float64(tau))


def test_float16_scores_flip_a_decision_the_kit_gets_right():
    arrays = two_class_arrays(0.8, 0.8002)  # logits 20.000 and 20.005: one float16 step at 20 is 0.0156
    logits = 25.0 * arrays["hlc_features"].astype(np.float64) @ arrays["w_cls"].astype(np.float64).T
    assert logits.argmax() == 1 and logits.astype(np.float16).argmax() == 0  # the rounded copy ties, and flips
    preds = eval_stage.predict(arrays, k=1, tau=0.0)
    for name in ("coarse", "coarse_la", "hlc", "zero_shot", "descriptors_zero_shot", "k1", "kall", "tau0_hlc"):
        assert preds[name].tolist() == [1], name


def test_topk_rerank_by_hand():
    adjusted = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.95], [0.5, 0.1, 0.1, 0.2]], dtype=torch.float64)
    assert common.rerank(adjusted, scores, 1).tolist() == [0, 3]  # K = 1: the classifier alone
    assert common.rerank(adjusted, scores, 3).tolist() == [2, 3]  # class 3 (score .95) is not a candidate
    assert common.rerank(adjusted, scores, 99).tolist() == [3, 0]  # K >= C: over every class
    tie = torch.tensor([[0.5, 0.5, 0.1, 0.0]], dtype=torch.float64)  # equal scores: the better-ranked candidate
    assert common.rerank(adjusted[:1], tie, 3).tolist() == [0]


# ---- descriptor sentences ----

@pytest.mark.parametrize("raw, sentence", [
    ("a long neck", "giraffe, which is a long neck"),  # VCD: a/an -> 'which is'
    ("an orange coat", "giraffe, which is an orange coat"),
    ("has spots", "giraffe, which has spots"),  # has/often/typically/may/can -> 'which'
    ("often found in Africa", "giraffe, which often found in Africa"),
    ("used for browsing", "giraffe, which is used for browsing"),
    ("long legs", "giraffe, which has long legs"),  # anything else -> 'which has'
    ("antlers", "giraffe, which has antlers"),  # the word 'a', not the letter (VCD's code tests the letter)
    ("Long, straight legs.", "giraffe, which has long, straight legs"),  # a capital and a full stop, as LLMs write
    ("LED lights", "giraffe, which has LED lights"),
    ("It has the form of a circle.", "giraffe, which has the form of a circle"),  # the class as the subject
    ("It makes a sound like rain.", "giraffe, which makes a sound like rain"),
    ("Giraffes have long necks.", "giraffe, which have long necks"),
    ("A giraffe is tall.", "giraffe, which is tall"),
])
def test_descriptor_sentence_rule(raw, sentence):
    assert corpus_stage.descriptor_sentence("giraffe", raw) == sentence


def test_every_descriptor_names_its_class_and_the_fallback_is_the_class_prompt(made_run, tmp_path):
    corpus = json.loads((made_run / "corpus.json").read_text())
    for name, descs in zip(corpus["classnames"], corpus["descriptors"]):
        assert descs and all(d.startswith(f"{name}, which ") for d in descs), (name, descs)
    # one class with no descriptor: stage 02 gives it its class-name prompt feature, wrapped once
    corpus["descriptors"][2] = corpus["descriptors_raw"][2] = []
    path = tmp_path / "corpus.json"  # written in the test's own folder
    path.write_text(json.dumps(corpus))
    world = Path(corpus["meta"]["args"]["data_root"])
    load_stage("02_cache_descriptors.py").main(["--corpus", str(path), "--out", str(path.with_name("tf.pt")),
                                                "--model", f"{world}/tiny-clip.json", "--pretrained", "none"])
    text = torch.load(path.with_name("tf.pt"), weights_only=True)
    assert text["desc_mask"][2].tolist() == [True] + [False] * (text["desc_mask"].shape[1] - 1)
    assert torch.equal(text["descriptors"][2, 0], text["classname"][2]) and text["meta"]["descriptor_fallback"] == [2]
    assert text["descriptor_texts"][2] == ["(no descriptor: the class-name prompt ensemble of 'blue square')"]


def test_raw_descriptor_text_flag(tiny_world, tmp_path):
    out = tmp_path / "corpus.json"
    corpus_stage.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--descriptors",
                       str(tiny_world / "descriptors.json"), "--descriptor-text", "raw", "--out", str(out)])
    corpus = json.loads(out.read_text())
    assert corpus["descriptors"][0][0] == "a red colour" and corpus["meta"]["descriptor_text"] == "raw"


# ---- the public descriptor files (../shared/data) onto the right class indices ----

def imagenet_names():
    import open_clip
    return list(open_clip.IMAGENET_CLASSNAMES)


def shared(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is not here (the public files sit beside the checkout, in ../shared/data)")
    return path


def test_vcd_imagenet_file_maps_onto_all_1000_classes():
    path = shared("descriptors_imagenet.json")
    data = {k: [s.strip() for s in v if s.strip()] for k, v in json.loads(path.read_text()).items()}
    aliases = common.DATASETS["imagenet_lt"]["name_aliases"]
    per_class, report = corpus_stage.read_named_json(path, imagenet_names(), aliases)
    assert report["classes_matched"] == 1000 and report["classes_without_entry"] == 0 and not report["shared_keys"]
    # open_clip names 657 and 744 'missile', 836 and 837 'sunglasses': VCD's file tells them apart by name
    assert per_class[657] == data["missile"] and per_class[744] == data["projectile"]
    assert per_class[836] == data["sunglass"] and per_class[837] == data["sunglasses"]
    assert per_class[27] == data["eft"] and per_class[638] == data["maillot"]
    assert per_class[0] == data["tench"]


def test_vcd_imagenet_file_serves_a_subset_of_imagenet():
    # ImageNet-100 style: every tenth class; the file's other 900 names are left out, each class gets its own list
    path = shared("descriptors_imagenet.json")
    data = json.loads(path.read_text())
    names = imagenet_names()[::10]
    per_class, report = corpus_stage.read_named_json(path, names, {})
    assert report["classes_matched"] == 100 and len(report["keys_left_out"]) == 900
    assert per_class[0] == [s.strip() for s in data["tench"] if s.strip()]
    with pytest.raises(SystemExit, match=r"class 0 'tench fish': nearest names in the file \['tench'"):
        corpus_stage.read_named_json(path, ["tench fish"] + names[1:], {})


def test_cupl_imagenet_file_maps_onto_all_1000_classes():
    path = shared("imagenet_prompts_base.json")
    data = {k: [s.strip() for s in v if s.strip()] for k, v in json.loads(path.read_text()).items()}
    per_class, report = corpus_stage.read_named_json(path, imagenet_names(), common.DATASETS["imagenet_lt"]["name_aliases"])
    assert report["keys"] == 998 and report["classes_matched"] == 1000
    # CuPL asked once for each repeated name: its one list fills both classes, as in CuPL's own code, and is reported
    assert report["shared_keys"] == {"missile": [657, 744], "sunglasses": [836, 837]}
    assert per_class[657] == per_class[744] == data["missile"] and per_class[836] == per_class[837] == data["sunglasses"]
    assert per_class[27] == data["newt"] and per_class[638] == data["tights"]


@pytest.mark.parametrize("dataset, name, split, per_class", [("imagenet_lt", "ImageNet_LT_val.txt", "val", 20),
                                                            ("imagenet_lt", "ImageNet_LT_test.txt", "test", 50),
                                                            ("inat2018", "iNaturalist18_val.txt", "val", 3)])
def test_the_public_split_lists_read_as_their_benchmarks_define_them(tmp_path, dataset, name, split, per_class):
    """OLTR's lists and the LT codebases' iNaturalist list, in a data root as users lay it out: every class has its
    benchmark's balanced share, a line is named by file and number, and ImageNet-LT's labels follow the sorted WordNet
    ids, the order of open_clip's class names that the kit indexes by label."""
    (tmp_path / name).symlink_to(shared(name))
    classes = common.dataset_info(dataset)["num_classes"]
    samples = common.read_split(tmp_path, dataset, split, classes, check_files=False)
    counts = np.bincount([label for _, label, _ in samples], minlength=classes)
    assert counts.min() == counts.max() == per_class and samples[1][2] == f"{tmp_path / name}:2"
    if dataset == "imagenet_lt":  # train/<wnid>/<wnid>_<n>.JPEG (val) and val/<wnid>/ILSVRC2012_val_<n>.JPEG (test)
        wnids = {label: Path(path).parent.name for path, label, _ in samples}
        assert len(set(wnids.values())) == 1000 and [wnids[c] for c in range(1000)] == sorted(wnids.values())
        assert wnids[0] == "n01440764" and imagenet_names()[0] == "tench"
    else:  # train_val2018/<kingdom>/<label>/<file>.jpg
        assert all(Path(path).parent.name == str(label) for path, label, _ in samples)


def test_imagenet_s_own_flat_val_folder_serves_oltr_s_test_list(tmp_path):
    """ImageNet's val/ holds its 50,000 images in one folder, where ImageNet_LT_test.txt names val/<wnid>/<file>: the
    list is read one folder up, and what is missing is counted there."""
    (tmp_path / "ImageNet_LT_test.txt").symlink_to(shared("ImageNet_LT_test.txt"))
    first = tmp_path / "val" / "ILSVRC2012_val_00029930.JPEG"  # the list's first line, one folder up
    first.parent.mkdir()
    first.write_bytes(b"\xff\xd8 not decoded here")
    with pytest.raises(FileNotFoundError) as e:
        common.read_split(tmp_path, "imagenet_lt", "test", 1000)
    second = tmp_path / "val" / "ILSVRC2012_val_00017700.JPEG"
    assert f"ImageNet_LT_test.txt:2: image not found: {second}" in str(e.value)
    assert "(images missing from ImageNet_LT_test.txt: 49999 of 50000)" in str(e.value)


def test_places365_name_forms():
    classnames = [common.readable_name(n) for n in ("/a/airfield", "/a/apartment_building/outdoor", "/a/arcade",
                                                     "/b/bazaar/indoor", "/b/bazaar/outdoor", "/l/lock_chamber")]
    keys = {"/a/airfield": ["runways"], "apartment_building-outdoor": ["windows"], "arcade (passageway)": ["arches"],
            "bazaar/indoor": ["stalls"], "bazaar-outdoor": ["awnings"], "lock_chamber (canal)": ["gates"]}
    mapping, report = corpus_stage.map_names_to_labels(list(keys), classnames, {}, "places.json")
    assert [mapping[k] for k in keys] == [[0], [1], [2], [3], [4], [5]] and report["classes_matched"] == 6


def test_names_that_fit_no_class_are_refused_and_an_alias_may_name_an_index(tmp_path):
    classnames = ["missile", "missile", "cat"]
    with pytest.raises(SystemExit, match="1 names match no class name:\n  'projectile'"):
        corpus_stage.map_names_to_labels(["missile", "projectile", "cat"], classnames, {}, "x.json")
    mapping, report = corpus_stage.map_names_to_labels(["missile", "projectile", "cat"], classnames,
                                                       {"projectile": 1}, "x.json")
    assert mapping == {"missile": [0], "projectile": [1], "cat": [2]} and not report["shared_keys"]
    with pytest.raises(SystemExit, match="class index 7 is outside"):
        corpus_stage.map_names_to_labels(["cat"], classnames, {"cat": 7}, "x.json")


@pytest.mark.parametrize("value, shown", [(None, "None (NoneType)"), (3, "3 (int)"), ({"a": 1}, "{'a': 1} (dict)")])
def test_descriptor_values_that_are_not_sentences_are_refused(tmp_path, value, shown):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"cat": ["whiskers", value]}))
    with pytest.raises(SystemExit, match=re.escape(f"the list of 'cat' holds {shown}, not a sentence")):
        corpus_stage.read_named_json(path, ["cat"], {})
    path.write_text(json.dumps({"cat": "whiskers"}))
    with pytest.raises(SystemExit, match="the value of 'cat' is str, not a list"):
        corpus_stage.read_named_json(path, ["cat"], {})


def test_paper_cells_name_their_source_and_illegible_cells_stay_empty():
    tables = load_stage("make_tables.py")
    rows = {"1": {"overall": 1.0, "many": 1.0, "medium": 1.0, "few": 1.0}}
    k_rows = [(k, rows["1"], k) for k in ("1", "3", "5", "7", "9", "11", "all (no classifier)", tables.NA_ROW)]
    text = tables.render("t", k_rows, tables.PAPER[6]["places_lt"])
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()[4:]}
    for k in ("1", "3", "5", "7"):  # our copy of Table 6 runs these rows together: not read, not filled
        assert [c.strip() for c in lines[k].split("|")][6:11] == ["-", "-", "-", "-", ""], lines[k]
    assert "49.50 | HLC Table 6 |" in lines["9"] and "44.50 | HLC Table 6 N/A" in lines[tables.NA_ROW]
    assert [c.strip() for c in lines["all (no classifier)"].split("|")][6:11] == ["-", "-", "-", "-", ""]
    for table in (1, 2, 3, 4, 7):
        for numbers, source, _ in (entry for by_dataset in tables.PAPER[table].values() for entry in by_dataset.values()):
            assert source and len(numbers) == 4, (table, source)


def test_a_sentence_of_exactly_75_tokens_is_not_taken_for_truncated():
    import open_clip
    tokenizer = open_clip.get_tokenizer("ViT-B-16")  # 77 slots: start, 75 tokens, end
    texts = [" ".join(["a"] * 75), " ".join(["a"] * 76), "a photo of a dog."]
    assert [len(tokenizer.encode(t)) for t in texts] == [75, 76, 6]  # "." is a token of its own
    tokens = tokenizer(texts)
    assert int((tokens[:, -1] != 0).sum()) == 2  # the last slot is filled for both long ones: not the test
    stage = load_stage("02_cache_descriptors.py")
    assert stage.truncated(tokenizer, texts, tokens, 77).tolist() == [False, True, False]
