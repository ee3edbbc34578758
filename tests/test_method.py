"""The method's arithmetic against values computed by hand."""
import math

import numpy as np
import pytest
import torch

import common


def test_logit_adjust_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.5]])
    prior = torch.tensor([0.7, 0.2, 0.1])
    expected = [2.0 - math.log(0.7), 1.0 - math.log(0.2), 0.5 - math.log(0.1)]  # 2.357, 2.609, 2.803
    assert torch.allclose(common.logit_adjust(z, prior, 1.0), torch.tensor([expected]))
    half = common.logit_adjust(z.numpy(), prior.numpy(), 0.5)
    assert np.allclose(half, [[2.0 - 0.5 * math.log(0.7), 1.0 - 0.5 * math.log(0.2), 0.5 - 0.5 * math.log(0.1)]])
    # the head class wins before adjustment, the tail class after
    assert int(z.argmax()) == 0 and int(common.logit_adjust(z, prior).argmax()) == 2


def test_class_prior_counts_empty_class_as_one():
    prior = common.class_prior([3, 1, 0])
    assert prior.dtype == np.float64 and np.array_equal(prior, np.array([3, 1, 1]) / 5)


def test_descriptor_scores_by_hand():
    # two classes, M = 3; class 1 has only two descriptors (third slot masked)
    d = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                      [[-1.0, 0.0], [0.0, -1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 50.0]])  # class 0: softmax = 1/4, 1/2, 1/4
    v = torch.tensor([[3.0, 4.0]])  # normalised to (0.6, 0.8)
    # class 0: 1/4 * 0.6 + 1/2 * 0.8 + 1/4 * (0.36 + 0.64) = 0.15 + 0.4 + 0.25 = 0.8
    # class 1: 1/2 * (-0.6) + 1/2 * (-0.8) = -0.7 (the masked slot's weight 50 and feature are ignored)
    got = common.descriptor_scores(v, d, mask, w)
    assert torch.allclose(got, torch.tensor([[0.8, -0.7]]), atol=1e-6)
    # unweighted: plain average over the valid descriptors
    # class 0: (0.6 + 0.8 + 1.0) / 3 = 0.8; class 1: -0.7
    assert torch.allclose(common.descriptor_scores(v, d, mask), torch.tensor([[0.8, -0.7]]), atol=1e-6)
    w2 = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # class 0 almost all on descriptor 0
    assert abs(float(common.descriptor_scores(v, d, mask, w2)[0, 0]) - 0.6) < 1e-3


def test_descriptor_weights_are_softmax_over_valid_slots():
    w = common.descriptor_weights(torch.zeros(2, 4), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool))
    assert torch.allclose(w, torch.tensor([[0.25] * 4, [1.0, 0, 0, 0]]))


def test_mixup_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.eye(3)
    perm = torch.tensor([2, 0, 1])
    mf, my = common.mixup(f, y, 0.75, perm)
    assert torch.allclose(mf, torch.tensor([[0.75 + 0.5, 0.5], [0.25, 0.75], [1.5, 1.75]]))
    assert torch.allclose(my, torch.tensor([[0.75, 0, 0.25], [0.25, 0.75, 0], [0, 0.25, 0.75]]))
    assert torch.allclose(my.sum(1), torch.ones(3))


def test_soft_cross_entropy_matches_hard_on_one_hot():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    y = torch.tensor([1, 2])
    assert torch.allclose(common.soft_cross_entropy(logits, torch.eye(3)[y]),
                          torch.nn.functional.cross_entropy(logits, y))


def test_shot_groups_both_rules():
    counts = np.array([101, 100, 20, 19, 500, 21, 5])
    assert common.shot_groups(counts, "lift").tolist() == [0, 1, 1, 2, 0, 1, 2]
    assert common.shot_groups(counts, "vl-ltr").tolist() == [0, 0, 2, 2, 0, 1, 2]
    assert common.shot_counts(counts, "lift") == {"many": 2, "medium": 3, "few": 2}


def test_accuracy_report_by_hand():
    counts = np.array([200, 50, 5])  # many, medium, few
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 0])
    r = common.accuracy_report(preds, labels, counts)
    assert r == {"overall": round(100 * 4 / 7, 2), "many": 75.0, "medium": 50.0, "few": 0.0}
    assert common.groups_line(r) == "many 75.00 / med 50.00 / few 0.00"  # the stages' summary line
    # no class of 100 images or more: the many group is empty (stage 04 printed "many None / med 100.0")
    r = common.accuracy_report(preds, labels, np.array([60, 50, 5]))
    assert r["many"] is None and common.groups_line(r) == "many - / med 62.50 / few 0.00"


def test_ties_in_top_k_go_to_the_lower_class_index():
    # classes 1, 3 and 4 tie for first place: the candidates run 1, 3, 4 (then 0), as numpy's stable argsort
    adjusted = torch.tensor([[0.5, 2.0, 0.1, 2.0, 2.0]], dtype=torch.float64)
    assert common.top_candidates(adjusted, 4).tolist() == [[1, 3, 4, 0]]
    assert np.argsort(-adjusted.numpy(), axis=1, kind="stable")[:, :4].tolist() == [[1, 3, 4, 0]]
    scores = torch.tensor([[0.0, 0.7, 0.0, 0.9, 0.9]], dtype=torch.float64)  # 3 and 4 tie again: 3 ranks first
    assert common.rerank(adjusted, scores, 3).tolist() == [3]


def test_a_recipe_fills_what_no_flag_gave():
    import argparse
    recipes = {"default": dict(lr=5e-4, epochs=30), "toy": dict(epochs=5)}
    args = argparse.Namespace(dataset="toy", lr=None, epochs=None)
    assert common.apply_recipe(args, recipes) == "toy" and (args.lr, args.epochs) == (5e-4, 5)
    args = argparse.Namespace(dataset="places_lt", lr=1e-3, epochs=None)  # a flag wins; no recipe: the default
    assert common.apply_recipe(args, recipes) == "default" and (args.lr, args.epochs) == (1e-3, 30)
    with pytest.raises(ValueError, match="recipe 'toy' sets 'lr', which is no flag of this script"):
        common.apply_recipe(argparse.Namespace(dataset="toy", epochs=None), recipes)


def test_a_batch_larger_than_the_training_set_is_capped(capsys):
    assert common.cap_batch(256, 255) == 255 and "256 is larger than the training set (255 images)" in \
        capsys.readouterr().out
    assert common.cap_batch(128, 255, multiple=4) == 128
    assert common.cap_batch(256, 255, multiple=4) == 252  # a multiple of processes x micro-batches


def test_classifier_start_text_or_random_unit_rows():
    from conftest import load_stage
    train = load_stage("03_train_coarse.py")
    feats = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert torch.equal(train.classifier_start(feats, "text", 0), feats)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, b = train.classifier_start(feats, "random", 0), train.classifier_start(feats, "random", 0)
    assert torch.equal(torch.rand(1), before)  # its own generator: the prompts' start does not move
    assert torch.equal(a, b) and not torch.equal(a, train.classifier_start(feats, "random", 1))
    assert a.shape == feats.shape and torch.allclose(a.norm(dim=-1), torch.ones(6))
    assert (a * feats).sum(-1).abs().max() < 0.99  # not the text rows
