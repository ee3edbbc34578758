"""Bad input gets a clear error naming the file and line or value."""
import json
import re
import shutil

import pytest
import torch

import common
from conftest import load_stage

corpus_stage = load_stage("01_build_corpus.py")


def copy_world(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_split_file_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        common.read_split(tmp_path, "places_lt", "train", 365)
    msg = str(e.value)
    assert "Places_LT_train.txt" in msg and "Places_LT_test.txt" in msg and "OLTR" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="train2018.json"):
        common.read_split(tmp_path, "inat2018", "train", 8142)
    with pytest.raises(FileNotFoundError, match="test.txt.*classnames.txt"):
        common.read_split(tmp_path, "mydata", "test", 3)


def test_bad_label_names_file_and_line(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    lines = (root / "train.txt").read_text().splitlines()
    lines[6] = lines[6].rsplit(maxsplit=1)[0] + " seven"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.txt:7: label 'seven' is not a plain integer"):
        common.read_split(root, "tiny", "train", 5)
    lines[6] = lines[6].rsplit(maxsplit=1)[0] + " 5"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.txt:7: label 5 is outside \[0, 5\)"):
        common.read_split(root, "tiny", "train", 5)


def test_missing_and_unreadable_images(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    first = (root / "test.txt").read_text().splitlines()[2].split()[0]
    (root / first).unlink()
    with pytest.raises(FileNotFoundError, match=rf"test.txt:3: image not found: .*{first} \(images missing from "
                                                rf"test.txt: 1 of \d+\)"):
        common.read_split(root, "tiny", "test", 5)
    (root / first).write_bytes(b"this is not a png")
    samples = common.read_split(root, "tiny", "test", 5)
    with pytest.raises(ValueError, match=rf"test.txt:3: cannot read image .*{first}"):
        common.ImageList(samples, lambda im: im)[2]


def test_a_split_none_of_whose_images_is_found_asks_about_the_root(tiny_world, tmp_path):
    # the usual cause: DATA_ROOT one folder off, or images laid out otherwise than the split file's paths say
    root = copy_world(tiny_world, tmp_path / "w")
    listed = (root / "test.txt").read_text().splitlines()
    top = listed[0].split("/")[0]
    (root / top).rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError) as e:
        common.read_split(root, "tiny", "test", 5)
    msg = str(e.value)
    assert f"none of the {len(listed)} images" in msg and f"test.txt:1 names {listed[0].rsplit(maxsplit=1)[0]}" in msg
    assert "is " + str(root) + " the folder they start from?" in msg


def test_wrong_line_count_for_known_dataset(tmp_path):
    (tmp_path / "Places_LT_train.txt").write_text("a/b.jpg 0\n")
    with pytest.raises(ValueError, match=r"Places_LT_train.txt: 1 entries, but places_lt 'train' has 62500"):
        common.read_split(tmp_path, "places_lt", "train", 365, check_files=False)


def test_inat_json_pairs_images_and_annotations_by_id(tmp_path):
    images = [{"id": 10, "file_name": "train_val2018/A/1/x.jpg"}, {"id": 3, "file_name": "train_val2018/B/2/y.jpg"}]
    annotations = [{"image_id": 3, "category_id": 2}, {"image_id": 10, "category_id": 1}]
    (tmp_path / "train2018.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    info = common.DATASETS["inat2018"]
    old = info["lines"]["train"]
    info["lines"]["train"] = 2
    try:
        samples = common.read_split(tmp_path, "inat2018", "train", 8142, check_files=False)
    finally:
        info["lines"]["train"] = old
    assert [(s[0].split("/")[-1], s[1]) for s in samples] == [("y.jpg", 2), ("x.jpg", 1)]


def test_name_normalisation():
    assert corpus_stage.normalise_name("Swimming_Pool/Indoor") == "swimming pool indoor"
    assert corpus_stage.normalise_name("crane (bird)") == "crane (bird)"
    assert corpus_stage.normalise_name("crane (bird)", drop_suffix=True) == "crane"
    assert corpus_stage.normalise_name("/s/swimming_pool/indoor") == "swimming pool indoor"
    assert corpus_stage.normalise_name("  bakery-shop ") == "bakery shop"


def test_descriptor_names_are_matched_by_name_and_aliases(tmp_path):
    classnames = ["airfield", "bakery shop", "corn field", "swimming pool indoor", "hockey arena"]
    data = {"swimming_pool/indoor": ["blue water"], "Airfield (place)": ["runways", "a control tower"],
            "bakery-shop": ["bread on shelves"], "corn_field": [], "ice hockey rink": ["a rink with ice"]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        corpus_stage.read_named_json(path, classnames, {})
    msg = str(e.value)
    assert "1 names match no class name" in msg and "'ice hockey rink'" in msg and "hockey arena" in msg
    assert "--aliases" in msg
    per_class, report = corpus_stage.read_named_json(path, classnames, {"ice hockey rink": "hockey arena"})
    assert per_class == [["runways", "a control tower"], ["bread on shelves"], [], ["blue water"],
                         ["a rink with ice"]]
    assert report["classes_matched"] == 5 and report["keys"] == 5


def test_a_file_for_more_classes_is_read_only_when_every_class_has_its_own_entry(tmp_path, capsys):
    # a descriptor file written for a larger label set (VCD's ImageNet file for an ImageNet subset)
    data = {"airfield": ["runways"], "bakery": ["bread"], "canal": ["water"], "dam": ["a wall"], "pier": ["posts"]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    per_class, report = corpus_stage.read_named_json(path, ["bakery", "airfield"], {})
    assert per_class == [["bread"], ["runways"]] and report["keys_left_out"] == ["canal", "dam", "pier"]
    out = capsys.readouterr().out
    assert "3 of its 5 names are no class of this dataset and are left out ('canal', 'dam', 'pier')" in out
    # a class of the dataset without an entry: the extra names may hold its misspelt one, so the run stops, naming it
    with pytest.raises(SystemExit) as e:
        corpus_stage.read_named_json(path, ["bakery", "airfield (civil)", "damm"], {})
    msg = str(e.value)
    assert "no entry for 1 of the 3 classes (3 names match no class)" in msg
    assert "class 2 'damm': nearest names in the file ['dam']" in msg and "--aliases" in msg
    # a shared name that fills two classes may be what a leftover name was for: refused as before
    with pytest.raises(SystemExit, match="1 names match no class name:\n  'projectile'"):
        corpus_stage.map_names_to_labels(["missile", "projectile"], ["missile", "missile"], {}, "x.json")


def test_a_descriptor_file_that_is_missing_a_folder_or_not_json_says_which_and_what(tiny_world, tmp_path):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--out", str(tmp_path / "run" / "corpus.json")]
    (tmp_path / "bad.json").write_text('{"cat": ["whiskers"],\n}')
    cases = (("--descriptors", tmp_path / "typo.json", FileNotFoundError,
              ": descriptor file (--descriptors, DESCRIPTORS=) not found"),
             ("--cupl", tmp_path, IsADirectoryError, " is a folder, not a CuPL file (--cupl, CUPL=)"),
             ("--descriptors", tmp_path / "bad.json", SystemExit, ":2:1: not valid JSON, in the descriptor file"))
    for option, given, error, says in cases:
        with pytest.raises(error, match=re.escape(f"{given}{says}")):
            corpus_stage.main(args + [option, str(given)])


def test_a_path_with_a_typo_names_the_missing_folder_and_the_close_names_beside_it(tmp_path):
    """DESCRIPTORS=.../descriptor_places365.json or DATA_ROOT=/data/plces365/: the message says which folder is not
    there and what is, close to the name typed; a path with nothing close says only that it is missing."""
    (tmp_path / "places365").mkdir()
    (tmp_path / "descriptors_places365.json").write_text("{}")
    close = tmp_path / "descriptors_places365.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"(did you mean {close}?)")):
        common.read_json(tmp_path / "descriptor_places365.json", "descriptor file")
    with pytest.raises(SystemExit, match=re.escape(f"DATA_ROOT={tmp_path / 'plces365' / 'x'}: no such folder (there is "
                                                   f"no folder {tmp_path / 'plces365'}; did you mean "
                                                   f"{tmp_path / 'places365'}?)")):
        common.check_dataset(tmp_path / "plces365" / "x", "places_lt")
    with pytest.raises(SystemExit, match=re.escape(f"DATA_ROOT={tmp_path / 'inat'}: no such folder. iNaturalist")):
        common.check_dataset(tmp_path / "inat", "inat2018")


def test_a_file_where_a_folder_is_meant_is_named_as_a_file_before_the_work(tmp_path):
    """DATA_ROOT, WIKI, MODEL or FEATURE_CACHE naming a file (or a path through one): the message says which file
    is in the way, not "did you mean" the same path, and a feature cache is checked before the training, not when
    stage 04 first writes there."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine\n")
    with pytest.raises(SystemExit, match=re.escape(f"DATA_ROOT={mine}: no such folder ({mine} is a file).")) as e:
        common.check_dataset(mine, "places_lt")
    assert "did you mean" not in str(e.value)
    with pytest.raises(SystemExit, match=re.escape(f"no such folder ({mine} is a file, not a folder).")):
        common.check_dataset(mine / "places_lt", "places_lt")
    with pytest.raises(ValueError, match=re.escape(f"MODEL={tmp_path} is neither an open_clip model name nor a "
                                                   f"model-config .json file ({tmp_path} is a folder)")):
        common.resolve_model_name(str(tmp_path))
    stages = load_stage("03_train_coarse.py"), load_stage("04_eval_hlc.py")
    for stage, more in zip(stages, ([], ["--coarse", "x.pt", "--check-args"])):
        with pytest.raises(SystemExit, match=re.escape(f"{mine / 'cache'}: feature cache folder (--feature-cache, "
                                                       f"FEATURE_CACHE=) cannot be made there, {mine} is a file")):
            stage.main(["--dataset", "x", "--data-root", str(tmp_path / "nowhere"), "--features", "x.pt",
                        "--out", str(tmp_path / "run" / "out"), "--feature-cache", str(mine / "cache"), *more])
    assert mine.read_text() == "mine\n" and not (tmp_path / "run").exists()


def test_descriptor_keys_are_mapped_by_name_not_order(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    data = json.loads((root / "descriptors.json").read_text())
    reordered = {k: [f"This sentence is only for the {k}."] for k in reversed(list(data))}
    (root / "descriptors.json").write_text(json.dumps(reordered))
    corpus_stage.main(["--dataset", "tiny", "--data-root", str(root), "--descriptors", str(root / "descriptors.json"),
                       "--out", str(tmp_path / "corpus.json")])
    corpus = json.loads((tmp_path / "corpus.json").read_text())
    for name, raw, descs in zip(corpus["classnames"], corpus["descriptors_raw"], corpus["descriptors"]):
        assert raw == [f"This sentence is only for the {name}."]
        assert descs == [f"{name}, which has this sentence is only for the {name}"]


def test_descriptors_beyond_m_are_cut_saying_so(tiny_world, tmp_path, capsys):
    """VCD's ImageNet file has 11 phrases for teddy bear: the first M = 10 distinct ones are kept, and the note and
    corpus.json's meta name the classes cut."""
    root = copy_world(tiny_world, tmp_path / "w")
    names = list(json.loads((root / "descriptors.json").read_text()))
    many = {k: [f"part {i} of the {k}" for i in range(12 if j == 0 else 3)] + ["part 0 of the " + k]
            for j, k in enumerate(names)}
    (root / "descriptors.json").write_text(json.dumps(many))
    corpus_stage.main(["--dataset", "tiny", "--data-root", str(root), "--descriptors", str(root / "descriptors.json"),
                       "--out", str(tmp_path / "corpus.json")])
    assert (f"note: 1 classes have more than 10 descriptors, and their first 10 are kept (M = 10, --num-descriptors): "
            f"{names[0]} (12)") in capsys.readouterr().out
    corpus = json.loads((tmp_path / "corpus.json").read_text())
    assert corpus["descriptors_raw"][0] == [f"part {i} of the {names[0]}" for i in range(10)]
    assert corpus["descriptors_raw"][1] == [f"part {i} of the {names[1]}" for i in range(3)]  # a repeat is dropped
    assert corpus["meta"]["classes_cut_to_m_descriptors"] == [names[0]]


def test_stage01_without_descriptor_source_says_how(tiny_world, tmp_path):
    with pytest.raises(SystemExit, match="--descriptors"):
        corpus_stage.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--out", str(tmp_path / "c.json")])


def test_wiki_reader_drops_reference_sections(tmp_path):
    (tmp_path / "desc_0.txt").write_text(
        "== Airfield ==\nAn airfield has runways. It has hangars!\n== External links ==\nSee http://x.\n"
        "== History ==\nBuilt in 1920.\n== References ==\n1. A book.\n", encoding="utf-8")
    (tmp_path / "desc_1.txt").write_bytes("== 机场 ==\n机场有跑道.\n".encode("gbk"))
    assert corpus_stage.read_wiki_file(tmp_path / "desc_0.txt") == \
        ["An airfield has runways.", "It has hangars!", "Built in 1920."]
    assert corpus_stage.read_wiki_file(tmp_path / "desc_1.txt") == ["机场有跑道."]


def test_a_wiki_folder_with_no_class_file_is_refused_and_naming_what_it_holds(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    for path in (root / "wiki").glob("desc_*.txt"):
        path.rename(path.with_name("wiki_" + path.name[len("desc_"):]))
    with pytest.raises(SystemExit, match=r"wiki: no desc_<label>.txt for any of the 5 classes \(the folder holds "
                                         r"wiki_0.txt, wiki_1.txt"):
        corpus_stage.main(["--dataset", "tiny", "--data-root", str(root), "--wiki", str(root / "wiki"),
                           "--descriptors", str(root / "descriptors.json"), "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()


def test_a_benchmark_without_wikipedia_says_it_is_not_the_papers_corpus(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / f"ImageNet_LT_{split}.txt").write_text("train/n01440764/a.JPEG 0\n")
    (tmp_path / "d.json").write_text(json.dumps({"tench": ["a fish"]}))
    args = ["--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--descriptors", str(tmp_path / "d.json")]
    corpus_stage.main(args + ["--out", str(tmp_path / "c.json")])
    assert "note: no Wikipedia text for imagenet_lt" in capsys.readouterr().out
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "desc_0.txt").write_text("A tench is a fish.\n")
    corpus_stage.main(args + ["--wiki", str(tmp_path / "wiki"), "--out", str(tmp_path / "c2.json")])
    out = capsys.readouterr().out
    assert "no Wikipedia text" not in out and "999 classes have no" in out


def test_class_names_for_places_categories_file(tmp_path):
    (tmp_path / "categories_places365.txt").write_text("/b/bakery/shop 1\n/a/airfield 0\n")
    info = dict(common.DATASETS["places_lt"], num_classes=2)
    old = common.DATASETS["places_lt"]
    common.DATASETS["places_lt"] = info
    try:
        assert common.class_names("places_lt", tmp_path) == ["airfield", "bakery shop"]
    finally:
        common.DATASETS["places_lt"] = old


def test_class_names_for_places_from_the_training_list(tmp_path, monkeypatch, capsys):
    """Without categories_places365.txt, the names come from the folders OLTR's list names, by the list's labels (a
    class of two levels, apartment_building/outdoor, included); a list that does not name them says what is needed."""
    monkeypatch.setitem(common.DATASETS, "places_lt", dict(common.DATASETS["places_lt"], num_classes=3))
    lst = tmp_path / "Places_LT_train.txt"
    lst.write_text("data_256/a/apartment_building/outdoor/00000001.jpg 2\ndata_256/a/airfield/00000001.jpg 0\n"
                   "data_256/a/airfield/00000002.jpg 0\ndata_256/b/bakery/shop/00000003.jpg 1\n")
    assert common.class_names("places_lt", tmp_path) == ["airfield", "bakery shop", "apartment building outdoor"]
    assert "read from the class folders that" in capsys.readouterr().err
    lst.write_text("images/1.jpg 0\nimages/2.jpg 1\nimages/3.jpg 2\n")  # one folder for every class
    with pytest.raises(FileNotFoundError, match="categories_places365.txt .*a Places_LT_train.txt whose paths name"):
        common.class_names("places_lt", tmp_path)


def test_weights_the_hub_cannot_give_say_how_to_bring_them(monkeypatch):
    import open_clip

    def offline(*args, **kw):
        raise RuntimeError("Failed to download weights for tag 'openai': Failed to download file (open_clip_pytorch_"
                           "model.bin) for timm/vit_base_patch16_clip_224.openai. Last error: check your connection")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(OSError, match=r"PRETRAINED=openai: the weights of ViT-B-16-quickgelu could not be downloaded "
                                      r"\(Failed to download file .*openai\)\. .*cache.*PRETRAINED=/path/to/"):
        common.load_clip("ViT-B-16-quickgelu", "openai")


def test_a_device_this_machine_lacks_is_named_before_anything_loads(monkeypatch):
    with pytest.raises(ValueError, match=r"--device gpu \(DEVICE=gpu\): not a device name"):
        common.pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda \(DEVICE=cuda\): this machine has no CUDA device"):
        common.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(common, "tiny_kernel", lambda device: None)  # as on a GPU this torch runs on
    with pytest.raises(ValueError, match=r"--device cuda:2 \(DEVICE=cuda:2\): this machine has 2 CUDA device"):
        common.pick_device("cuda:2")
    assert common.pick_device("cuda:1") == torch.device("cuda", 1) and common.pick_device("cpu").type == "cpu"


def test_a_gpu_torch_cannot_use_stops_auto_rather_than_run_on_the_cpu(monkeypatch):
    """A driver too old for the pinned CUDA 13 build: torch says so in a warning and reports no CUDA, and DEVICE=auto
    went on to a CPU run of a whole benchmark."""
    import glob
    import warnings

    def too_old():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040). Please "
                      "update your GPU driver by downloading and installing a new version")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", too_old)
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"] if pattern == "/dev/nvidia[0-9]*" else [])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError) as e:
        common.pick_device("auto")
    assert "an NVIDIA GPU (/dev/nvidia0) that torch" in str(e.value) and "found version 12040)" in str(e.value)
    assert "needs a driver for CUDA 13.0 (580 or newer)" in str(e.value) and "DEVICE=cpu" in str(e.value)
    assert common.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose
    with pytest.warns(UserWarning, match="driver on your system is too old"):  # torch's word is not swallowed
        assert common.pick_device("auto").type == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(glob, "glob", lambda pattern: [])  # no GPU at all: the CPU, as ever
    with pytest.warns(UserWarning, match="too old"):
        assert common.pick_device("auto").type == "cpu"


def test_a_gpu_this_torch_has_no_code_for_stops_naming_its_capability(monkeypatch):
    """A V100 (compute capability 7.0) under the pinned torch, whose code starts at 7.5: CUDA's "no kernel image"
    came at a stage's first layer, after the model had loaded."""
    import torch.distributed as dist

    def no_code(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors "
                           "might be asynchronously reported")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(common, "tiny_kernel", no_code)
    for device in ("auto", "cuda", "cuda:1"):
        with pytest.raises(ValueError) as e:
            common.pick_device(device)
        assert "cannot run on this GPU (Tesla V100-SXM2-32GB, compute capability 7.0): CUDA error: no kernel image " \
               "is available for execution on the device. This build has code for sm_75 sm_80 sm_90" in str(e.value)
    for key, value in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1", RANK="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: pytest.fail("the group was joined"))
    with pytest.raises(ValueError, match=r"DEVICE=cuda:1: torch .* cannot run on this GPU"):
        common.init_distributed("auto")


def test_a_number_out_of_range_is_refused_by_name_before_anything_loads(tmp_path):
    import argparse
    from systems import lift
    args = argparse.Namespace(epochs=0, lr=float("nan"), k=None)
    with pytest.raises(SystemExit, match=r"--epochs must be 1 or more, not 0"):
        common.refuse_out_of_range(args, least=[("--epochs", 1), ("--k", 1), ("--no-such-flag", 1)])
    with pytest.raises(SystemExit, match=r"--lr must be more than 0, not nan"):
        common.refuse_out_of_range(args, above=[("--lr", 0)])
    common.refuse_out_of_range(args, least=[("--k", 1), ("--no-such-flag", 1)])  # unset or absent: nothing to check
    from systems import ballad, vl_ltr
    train = load_stage("03_train_coarse.py")
    out = tmp_path / "out"
    for main, flags, said in (
            (train.main, ["--epochs", "0"], "--epochs must be 1 or more, not 0"),  # was a coarse.pt trained 0 steps
            (train.main, ["--prompt-tokens", "-1"], "--prompt-tokens must be 0 or more, not -1"),  # a RuntimeError
            (train.main, ["--lr", "nan"], "--lr must be more than 0, not nan"),
            (train.main, ["--cls-loss-weight", "0", "--desc-loss-weight", "0"], "leaves no loss to train"),
            (lift.main, ["--lr-scale", "0"], "--lr-scale must be more than 0, not 0.0"),  # the systems: frame.setup
            (lift.main, ["--batch-size", "0"], "--batch-size must be 1 or more, not 0"),
            (lift.main, ["--crop-min", "0"], "--crop-min must be more than 0, not 0.0"),
            (ballad.main, ["--epochs-a", "-1"], "--epochs-a must be 0 or more, not -1"),
            (vl_ltr.main, ["--accum-steps", "0"], "--accum-steps must be 1 or more, not 0")):  # a ZeroDivisionError
        with pytest.raises(SystemExit, match=said):
            main(["--dataset", "toy", "--data-root", str(tmp_path / "nowhere"), "--features", "none.pt",
                  "--out", str(out / "coarse.pt" if main is train.main else out), *flags])
        assert not out.exists()  # refused before the run folder is made or locked


def test_a_corpus_file_made_by_hand_is_checked_against_the_contract(tmp_path):
    # stage 01 swapped for one's own corpus.json: a slip stops stage 02 naming the key and class, before any encoding
    features_stage = load_stage("02_cache_descriptors.py")
    good = {"classnames": ["cat", "dog"], "sentences": [["A cat."], ["A dog."]],
            "descriptors": [["whiskers"], ["a tail"]], "meta": {"dataset": "pets"}}
    cases = [({k: v for k, v in good.items() if k != "meta"}, "no meta. A corpus file holds"),
             (dict(good, sentences=["A cat.", ["A dog."]]),
              "sentences[0] (class 'cat') must be a list of strings, got \"A cat.\""),
             (dict(good, descriptors=[["whiskers"]]), "2 class names but descriptors holds 1 lists"),
             (dict(good, meta={}), "meta must hold the name of the dataset")]
    for corpus, message in cases:
        path = tmp_path / "corpus.json"
        path.write_text(json.dumps(corpus))
        with pytest.raises(SystemExit) as e:
            features_stage.main(["--corpus", str(path), "--out", str(tmp_path / "t.pt"), "--device", "cpu"])
        assert message in str(e.value)
    assert not (tmp_path / "t.pt").exists()


def test_a_text_file_that_is_not_utf8_is_named_with_its_line(tiny_world, tmp_path):
    # a Latin-1 export: before, "'utf-8' codec can't decode byte 0xe9", naming no file
    root = copy_world(tiny_world, tmp_path / "w")
    names = (root / "classnames.txt").read_text().splitlines()
    (root / "classnames.txt").write_bytes("\n".join(names[:2] + ["café"] + names[3:]).encode("latin-1"))
    with pytest.raises(ValueError, match=r"classnames.txt:3: not UTF-8 text \(byte 0xe9\)"):
        common.class_names("tiny", root)
    lines = (root / "train.txt").read_text().splitlines()
    lines[4] = "café/" + lines[4]
    (root / "train.txt").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(ValueError, match=r"train.txt:5: not UTF-8 text"):
        common.read_split(root, "tiny", "train", 5)


def test_more_processes_than_gpus_is_refused_by_count(monkeypatch):
    # GPUS=4 on a 2-GPU machine: before, processes 2 and 3 died in set_device ("invalid device ordinal")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(common.torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for key, value in dict(WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", LOCAL_RANK="0", RANK="0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"GPUS=4 starts 4 processes .* 2 CUDA device\(s\) .*=0,1\); use GPUS=2"):
        common.init_distributed()


def test_a_cuda_device_under_torchrun_is_not_a_silent_cpu_run(monkeypatch):
    # before: --device cuda:0 (or cuda on a machine without CUDA) under torchrun fell through to CPU processes
    import torch.distributed as dist
    for key, value in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1", RANK="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        common.init_distributed("cuda")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(common.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(common, "tiny_kernel", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert common.init_distributed("cuda:0") == (1, 2, torch.device("cuda", 1))


@pytest.mark.parametrize("script", ["00_make_toy.py", "00_pretrain_toy_clip.py", "01_build_corpus.py",
                                    "03_train_coarse.py", "04_eval_hlc.py", "tune_toy.py", "systems/lift.py"])
def test_a_seed_numpy_or_torch_would_refuse_is_refused_by_its_flag(script, capsys):
    """SEED=-1 stopped stage 00 with numpy's bare "expected non-negative integer", and a real dataset's training at its
    first mixup draw: every script's --seed takes 0 to 2**32 - 1 and names the value it refuses."""
    main = load_stage(script).main
    for bad in ("-1", "4294967296", "1e3"):
        with pytest.raises(SystemExit) as e:
            main(["--seed", bad])
        assert e.value.code == 2
        assert f"argument --seed: expected a whole number from 0 to 4294967295, got '{bad}'" in capsys.readouterr().err


def test_a_large_seed_seeds_every_sample():
    """SEED=20250101 (a date) stopped the training at its first batch, "Overflow when unpacking long long": a sample's
    seed is taken modulo 2**64, which leaves a seed under 1.8 million where it was."""
    common.seed_sample(20250101, 3, 12345)
    first = torch.rand(4)
    common.seed_sample(20250101, 3, 12345)
    assert torch.equal(torch.rand(4), first)
    common.seed_sample(20250101, 3, 12346)
    assert not torch.equal(torch.rand(4), first)
    common.seed_sample(1_000_000, 29, 999_999)
    want = torch.rand(4)
    torch.default_generator.manual_seed((1_000_000 * 1_000_003 + 29) * 10_000_019 + 999_999)
    assert torch.equal(torch.rand(4), want)
