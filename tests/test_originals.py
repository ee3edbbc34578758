"""The compared systems train as their code trains them (issue 30): VL-LTR's LGR optimizer groups and mixing,
Imbalance-VLM's clipping and sampler, BALLAD's zero-lr epochs; and HLC's own recipe per benchmark."""
import argparse
import importlib.util
import math

import numpy as np
import torch

import common
from conftest import ROOT
from systems import ballad, frame, imbalance_vlm as ivlm, vl_ltr


def load_stage(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").replace("0", "s0", 1), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_system_args(made_run, tiny_world, out):
    return ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--out", str(out)]


def test_lgr_attention_sits_in_the_text_group_and_barely_moves(made_run, tiny_world, tmp_path):
    vl_ltr.main(tiny_system_args(made_run, tiny_world, tmp_path / "v") + ["--epochs", "2", "--lr-lgr", "0.05"])
    state = torch.load(tmp_path / "v" / "lgr.pt", weights_only=True)["modules"]["lgr"]
    eye = torch.eye(state["w_q.weight"].shape[0])
    moved = lambda k, start: float((state[k] - start).abs().max())
    assert moved("w_q.weight", eye) < 1e-4 and moved("w_k.weight", eye) < 1e-4  # text_lr 1e-6 (optim_factory.py)
    assert moved("norm_q.weight", torch.ones_like(state["norm_q.weight"])) < 1e-4
    head = vl_ltr.LGR(torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool), 3, 10.0)
    first = head.mlp[0].requires_grad_(False)
    assert float(first.weight.std()) < 0.03 and float(first.bias.abs().max()) == 0  # trunc-normal(0.02)
    assert moved("mlp.2.weight", torch.zeros_like(state["mlp.2.weight"])) > 1e-3  # the image branch trains


def test_lgr_mixes_images_as_mainpy():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()  # image i is all i; it meets image 3 - i
    labels = torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(30):
        mixed, target = vl_ltr.mix_images(images, labels, 4, gen, smoothing=0.1)
        assert torch.allclose(target.sum(1), torch.ones(4)) and float(target.min()) >= 0.1 / 4 - 1e-6
        lam = (float(target[0, 0]) - 0.025) / 0.9  # image 0's own share, smoothing taken out
        assert abs(float(mixed[0].mean()) / 3 - (1 - lam)) < 1e-5  # mixup's blend or cutmix's pasted area
        kinds.add("cutmix" if set(mixed[0].unique().tolist()) <= {0.0, 3.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}  # switched half and half, as main.py's defaults
    no_mix, target = vl_ltr.mix_images(images, labels, 4, gen, mixup=0, cutmix=0, smoothing=0.1)
    assert torch.equal(no_mix, images) and abs(float(target[0, 0]) - 0.925) < 1e-6


def test_imbalance_vlm_clips_no_gradient_unless_asked(made_run, tiny_world, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    args = tiny_system_args(made_run, tiny_world, tmp_path / "i") + ["--iterations", "4", "--evals", "2",
                                                                     "--stage2", "marc"]
    ivlm.main(args)
    assert calls == []  # the code's trainer reads clip_grad, default 0
    common.release_run_locks()
    ivlm.main(args + ["--out", str(tmp_path / "j"), "--clip-grad", "1.0"])
    assert len(calls) == 8  # 4 steps of stage 1, 4 of MARC


def test_imbalance_vlm_sampler_draws_permutations_and_normalises_as_its_code(tiny_world):
    labels = torch.tensor([0] * 20 + [1] * 2)
    batches = frame.weighted_batches(labels, [1 / 20, 1 / 2], 11, 22, torch.Generator().manual_seed(0),
                                     replacement=False)
    assert sorted(torch.cat(batches).tolist()) == list(range(22))  # each image once per permutation
    with_replacement = frame.weighted_batches(labels, [1 / 20, 1 / 2], 11, 22, torch.Generator().manual_seed(0))
    assert len(set(torch.cat(with_replacement).tolist())) < 22
    _, _, preprocess, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    norm = frame.eval_transform(preprocess, "imagenet").transforms[-1]
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and frame.eval_transform(preprocess, "clip") is preprocess
    train = frame.train_transform(preprocess, interpolation="bilinear", normalize="inat")
    assert tuple(train.transforms[-1].mean) == (0.466, 0.471, 0.380)
    assert ivlm.RECIPES["inat2018"]["normalize"] == "inat" and ivlm.RECIPES["default"]["normalize"] == "imagenet"


def test_ballads_zero_lr_epochs_are_the_originals_share():
    recipe = {**ballad.RECIPES["default"], **ballad.RECIPES["toy"]}
    for epochs, share in ((recipe["epochs_a"], 1 / 50), (recipe["epochs_b"], 1 / 10)):
        lrs = [ballad.epoch_cosine(1.0, step // recipe["epoch_steps"], epochs)
               for step in range(epochs * recipe["epoch_steps"])]
        assert abs(sum(lr < 1e-12 for lr in lrs) / len(lrs) - share) < 1e-9
    trained = (recipe["epochs_a"] - 1 + recipe["epochs_b"] - 1) * recipe["epoch_steps"]
    assert abs(trained - 1000) <= 20  # the toy budget, counting the steps that train


def test_hlc_runs_the_papers_recipe_per_benchmark():
    stage = load_stage("03_train_coarse.py")
    for dataset, finetune in (("places_lt", "prompts"), ("imagenet_lt", "prompts"), ("inat2018", "full")):
        args = argparse.Namespace(dataset=dataset, **{k: None for k in ("epochs", "lr", "batch_size", "prompt_tokens",
                                                                        "lr_scale", "finetune", "backbone_lr")})
        common.apply_recipe(args, stage.RECIPES)
        assert (args.finetune, args.epochs, args.lr, args.prompt_tokens) == (finetune, 30, 5e-4, 20), dataset


def test_ties_are_broken_alike_on_the_page_and_in_the_numbers():
    evaluate = load_stage("04_eval_hlc.py")
    w = np.eye(3, dtype=np.float32)
    v = np.array([[0.6, 0.6, 0.529]], dtype=np.float32)  # classes 0 and 1 tie on the classifier
    arrays = dict(labels=np.array([1]), hlc_features=v, plain_features=v, w_cls=w, scale=np.float64(25.0),
                  desc_proto=np.ones((3, 3), np.float32), desc_proto_unweighted=w, classname_features=w,
                  logit_scale=np.float64(100.0), class_prior=np.full(3, 1 / 3), k=np.int64(1), tau=np.float64(1.0))
    preds = evaluate.predict(arrays, k=1, tau=1.0)
    assert preds["k1"].tolist() == [0] and preds["kall"].tolist() == [0]  # equal scores: the better-ranked, class 0
    adjusted = torch.tensor([[15.0, 15.0, 13.2]], dtype=torch.float64)
    assert common.top_candidates(adjusted, 2).tolist() == [[0, 1]]
    assert math.isclose(float(common.logit_adjust(torch.tensor([1.0]), torch.tensor([0.5]))), 1 + math.log(2),
                        rel_tol=1e-6)
