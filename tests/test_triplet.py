"""Triplet probe: multi-label mining rule, batch-hard / semi-hard on hand-made batches, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl4ecg.data.synthetic import SyntheticSource
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Encoder, EvalContext
from ssl4ecg.registry import get_registry
from ssl4ecg_triplet import (
    TripletProbe,
    batch_hard,
    jaccard,
    label_set_batches,
    pair_masks,
    pairwise_distances,
    semi_hard,
    triplet_loss,
)


class RandomConv(Encoder):
    """A fixed random convolutional encoder (32-d embedding)."""

    def __init__(self, spec, dim: int = 32) -> None:
        super().__init__()
        self.spec, self.embed_dim = spec, dim
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(spec.n_leads, dim, 7, stride=5, padding=3), nn.GELU(),
                                 nn.Conv1d(dim, dim, 5, stride=4, padding=2))
        for p in self.net.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def tokens(self, x, leads=None):
        return self.net(x).transpose(1, 2)


# a hand-made batch on a line: classes A = [1, 0], B = [0, 1], AB = [1, 1]
Z = torch.tensor([[0.0], [1.0], [3.0], [2.5], [6.0], [10.0], [1.5]])
Y = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=torch.float32)


def test_jaccard_rule_for_multi_label_sets():
    j = jaccard(Y)
    assert j[0, 1] == 1.0 and j[0, 3] == 0.0 and j[0, 6] == pytest.approx(0.5)
    assert jaccard(torch.zeros(2, 3))[0, 1] == 1.0  # two empty label sets are identical
    pos, neg = pair_masks(Y)  # defaults: identical sets / disjoint sets
    assert pos[0, 1] and pos[0, 2] and not pos[0, 0]
    assert neg[0, 3] and neg[0, 4] and neg[0, 5]
    assert not pos[0, 6] and not neg[0, 6]  # partly shared: neither
    assert not pos[6].any()  # [1, 1] has no identical partner here
    pos_loose, _ = pair_masks(Y, pos_jaccard=0.5)
    assert pos_loose[0, 6] and pos_loose[3, 6]
    with pytest.raises(ValueError):
        pair_masks(Y, pos_jaccard=0.5, neg_jaccard=0.5)


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    dist = pairwise_distances(Z)
    pos, neg = pair_masks(Y)
    t = batch_hard(dist, pos, neg)
    got = {int(a): (int(p), int(n)) for a, p, n in zip(t.anchor, t.positive, t.negative)}
    assert 6 not in got  # no positive for the mixed record
    assert got[0] == (2, 3)  # farthest A from 0.0 is 3.0; nearest B is 2.5
    assert got[1] == (2, 3)
    assert got[2] == (0, 3)
    assert got[3] == (5, 2)  # farthest B from 2.5 is 10.0; nearest A is 3.0
    assert got[5] == (3, 2)


def test_semi_hard_negative_lies_beyond_the_positive():
    dist = pairwise_distances(Z)
    pos, neg = pair_masks(Y)
    t = semi_hard(dist, pos, neg, margin=0.5)
    pairs = {(int(a), int(p)): int(n) for a, p, n in zip(t.anchor, t.positive, t.negative)}
    # anchor 0 (0.0), positive 1 (1.0): negatives at 2.5, 6, 10 -> nearest beyond 1.0 is 2.5
    assert pairs[(0, 1)] == 3
    # anchor 1 (1.0), positive 2 (3.0, d = 2): negatives at d 1.5, 5, 9 -> nearest beyond 2 is 6.0
    assert pairs[(1, 2)] == 4
    # anchor 2 (3.0), positive 0 (0.0, d = 3): negatives at d 0.5, 3, 7 -> strictly beyond 3: 10.0
    assert pairs[(2, 0)] == 5
    # anchor 3 (2.5), positive 5 (10.0, d = 7.5): no negative beyond -> the farthest one (0.0)
    assert pairs[(3, 5)] == 0


def test_triplet_loss_value_and_gradient():
    z = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.5]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, logs = triplet_loss(z, y, margin=1.0)
    # anchors 0 and 1 (2 has no positive): 0: relu(1 - 1.5 + 1) = 0.5; 1: relu(1 - 0.5 + 1) = 1.5
    assert loss.item() == pytest.approx(1.0)
    assert logs == {"triplets": 2.0, "active": 1.0}
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    none, logs = triplet_loss(z, torch.eye(3), margin=1.0)  # all label sets different: no positive
    assert none.item() == 0.0 and logs["triplets"] == 0.0


def test_label_set_batches_hold_positives():
    labels = np.array([[1, 0]] * 10 + [[0, 1]] * 6 + [[1, 1]] * 3 + [[0, 0]] * 1, dtype=np.float32)
    batches = label_set_batches(labels, groups_per_batch=3, per_group=4, generator=torch.Generator().manual_seed(0))
    assert len(batches) == len(labels) // 12
    for idx in batches:
        assert len(idx) == 12
        pos, _ = pair_masks(torch.from_numpy(labels[idx]))
        assert pos.any(dim=1).all()  # every record of the batch has a positive
        assert 19 not in idx  # the lone [0, 0] record cannot be an anchor


@pytest.fixture(scope="module")
def records():
    return SyntheticSource(n_records=300, sampling_rate=100.0, seed=3).load()


def _context():
    return EvalContext(device=torch.device("cpu"), seed=0, out_dir=None, batch_size=64)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_triplet_probe_reports_head_knn_and_clusters(records, mining):
    probe = TripletProbe(epochs=8, bootstrap=0, mining=mining, k_grid=(5, 10))
    out = probe.evaluate(RandomConv(records.spec), records, _context())
    for key in ("auc_macro", "f1_macro", "knn_auc_macro", "knn_f1_macro", "davies_bouldin", "silhouette",
                "calinski_harabasz"):
        assert np.isfinite(out[key]), key
    assert set(out["auc_per_class"]) == set(records.class_names)
    assert out["knn_k"] in (5, 10) and 1 <= out["epoch"] <= 8
    assert set(out["baseline"]) >= {"knn_auc_macro", "davies_bouldin", "silhouette", "calinski_harabasz"}
    hist = out["history"]
    assert hist[-1]["triplet_loss"] < hist[0]["triplet_loss"]  # the head learns the metric
    assert out["protocol"]["mining"] == mining and out["protocol"]["evaluator"] == "triplet_probe"


def test_triplet_training_lowers_the_triplet_loss_of_the_whole_train_set(records):
    """Batch-hard loss over all train records (not just the mined batches) falls clearly."""
    from ssl4ecg.eval.common import prepare_task
    from ssl4ecg.eval.features import extract_features

    task = prepare_task(records, True, "triplet_probe")
    enc = RandomConv(records.spec)
    raw = {s: extract_features(enc, records.subset(task.index[s]), _context()) for s in task.index}
    mean, std = raw["train"].mean(0), raw["train"].std(0) + 1e-8
    x = {s: ((v - mean) / std).astype(np.float32) for s, v in raw.items()}
    y = torch.from_numpy(task.targets["train"])
    head, record = TripletProbe(epochs=20, lr=1e-2, bootstrap=0).fit(x, task.targets, seed=0)
    with torch.no_grad():
        after = head.embed(torch.from_numpy(x["train"]))
    before = torch.nn.functional.normalize(torch.from_numpy(x["train"]), dim=1)  # same scale as z
    loss_before = triplet_loss(before, y, margin=0.2)[0].item()
    loss_after = triplet_loss(after, y, margin=0.2)[0].item()
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert record["epoch"] >= 1


def test_options_are_checked_and_registered():
    with pytest.raises(ConfigError, match="neg_jaccard"):
        TripletProbe(pos_jaccard=0.5, neg_jaccard=0.5)
    with pytest.raises(ConfigError, match="mining"):
        TripletProbe(mining="hardest")
    reg = get_registry()
    probe = reg.build("evaluator", "triplet_probe", {"epochs": 2, "margin": 0.3}, "eval")
    assert isinstance(probe, TripletProbe) and probe.margin == 0.3
