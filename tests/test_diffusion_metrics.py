"""torchbook.diffusion.metrics: FID/KID の性質、val/test の分け方、本物どうしの参照レベル。"""

import pytest
import torch
from diffusion_fixtures import fashion_root

from torchbook.diffusion import metrics
from torchbook.diffusion.data import load_tensors
from torchbook.diffusion.fashion_classifier import FEATURE_DIM, FashionClassifier, load_classifier

# ---------------------------------------------------------------- FID


def _gaussian(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, len(mean), generator=g, dtype=torch.float64)


def _diag_formula(mu_a, var_a, mu_b, var_b) -> float:
    """対角共分散どうしの FID の閉じた式: |Δμ|² + Σ (√var_a - √var_b)²。"""
    return ((mu_a - mu_b) ** 2).sum().item() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum().item()


def test_fid_of_identical_features_is_zero():
    f = _gaussian(500, torch.zeros(8), torch.ones(8), seed=0)
    assert metrics.fid(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_diagonal_closed_form():
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = _diag_formula(mu_a, var_a, mu_b, var_b)  # 1 + 6.25 + 4 + 1 + 0 = 12.25
    got = metrics.frechet_distance(
        mu_a.double(), torch.diag(var_a).double(), mu_b.double(), torch.diag(var_b).double()
    )
    assert expected == pytest.approx(12.25)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_rotation_invariant_for_non_diagonal_covariances():
    # 同じ回転 Q を両方にかけても距離は変わらない (対角でない共分散を試す)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]).double(), torch.tensor([1.0, 1.0, 0.5]).double()
    cov_a = torch.diag(torch.tensor([1.0, 4.0, 0.25])).double()
    cov_b = torch.diag(torch.tensor([9.0, 1.0, 0.25])).double()
    got = metrics.frechet_distance(q @ mu_a, q @ cov_a @ q.T, q @ mu_b, q @ cov_b @ q.T)
    assert got == pytest.approx(12.25, rel=1e-9)


def test_fid_of_samples_approaches_the_closed_form():
    mu_a, var_a = torch.zeros(4), torch.tensor([1.0, 2.0, 0.5, 1.0])
    mu_b, var_b = torch.tensor([0.5, 0.0, 0.0, -0.5]), torch.tensor([1.0, 1.0, 2.0, 1.0])
    a = _gaussian(40_000, mu_a.double(), var_a.sqrt().double(), seed=1)
    b = _gaussian(40_000, mu_b.double(), var_b.sqrt().double(), seed=2)
    assert metrics.fid(a, b) == pytest.approx(_diag_formula(mu_a, var_a, mu_b, var_b), abs=0.03)


def test_fid_is_symmetric_and_grows_with_a_mean_shift():
    a = _gaussian(2000, torch.zeros(6), torch.ones(6), seed=3)
    b = _gaussian(2000, torch.zeros(6), torch.ones(6), seed=4)
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-9)
    values = [metrics.fid(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 10 * values[0]


def test_fid_rejects_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid(torch.zeros(1, 4), torch.zeros(5, 4))


# ---------------------------------------------------------------- KID


def test_kid_is_near_zero_for_the_same_distribution_and_positive_for_a_shift():
    a = _gaussian(2000, torch.zeros(16), torch.ones(16), seed=5)
    b = _gaussian(2000, torch.zeros(16), torch.ones(16), seed=6)
    same_mean, same_std = metrics.kid(a, b, n_subsets=20, subset_size=500)
    shift_mean, shift_std = metrics.kid(a, b + 0.5, n_subsets=20, subset_size=500)
    assert shift_mean > 0.1 and shift_mean > 5 * shift_std
    assert abs(same_mean) < 0.02 * shift_mean
    assert same_std > 0  # 不偏推定量は部分集合ごとに揺れる


def test_kid_unbiased_estimate_can_be_negative_and_is_seeded():
    a = _gaussian(300, torch.zeros(4), torch.ones(4), seed=7)
    b = _gaussian(300, torch.zeros(4), torch.ones(4), seed=8)
    values = [metrics.mmd2_unbiased(a[i : i + 30], b[i : i + 30]) for i in range(0, 300, 30)]
    assert min(values) < 0 < max(values)  # 偏りのない推定なので 0 の両側に出る
    assert metrics.kid(a, b, n_subsets=5, seed=1) == metrics.kid(a, b, n_subsets=5, seed=1)
    assert metrics.kid(a, b, n_subsets=5, seed=1) != metrics.kid(a, b, n_subsets=5, seed=2)


def test_polynomial_kernel_formula():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    assert metrics.polynomial_kernel(x, y).tolist() == [[(1 / 2 + 1) ** 3, 1.0]]


# ---------------------------------------------------------------- val / test の分け方

LABELS = torch.arange(10).repeat_interleave(40)[torch.randperm(400, generator=torch.Generator()
                                                               .manual_seed(0))]


def test_split_halves_are_disjoint_class_balanced_and_fixed():
    val = metrics.split_matrix(LABELS, "val")
    test = metrics.split_matrix(LABELS, "test")
    assert val.shape == test.shape == (10, 20)
    assert not set(val.flatten().tolist()) & set(test.flatten().tolist())
    assert len(set(val.flatten().tolist()) | set(test.flatten().tolist())) == 400
    for c in range(10):
        assert (LABELS[val[c]] == c).all() and (LABELS[test[c]] == c).all()
    assert torch.equal(val, metrics.split_matrix(LABELS, "val"))  # シード固定
    assert not torch.equal(val, metrics.split_matrix(LABELS, "val", seed=1))
    with pytest.raises(ValueError, match="split"):
        metrics.split_matrix(LABELS, "train")


def test_balanced_blocks_are_disjoint_and_balanced():
    blocks = metrics.balanced_blocks(LABELS, "val", 40)
    assert len(blocks) == 5
    seen = set()
    for b in blocks:
        assert len(b) == 40 and torch.bincount(LABELS[b], minlength=10).tolist() == [4] * 10
        assert not seen & set(b.tolist())
        seen |= set(b.tolist())
    assert seen == set(metrics.split_matrix(LABELS, "val").flatten().tolist())
    with pytest.raises(ValueError, match="倍数"):
        metrics.balanced_blocks(LABELS, "val", 45)
    with pytest.raises(ValueError, match="2 つ"):
        metrics.balanced_blocks(LABELS, "val", 200)


class _Identity(torch.nn.Module):
    """画像の画素をそのまま特徴にする「分類器」(テスト用)。"""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x.flatten(1)


def test_real_reference_reports_the_spread_over_blocks():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(400, 1, 2, 2, generator=g) + LABELS.view(-1, 1, 1, 1) * 0.1
    res = metrics.real_reference(_Identity(), images, LABELS, "val", 40)
    assert res["split"] == "val" and len(res["fid_blocks"]) == 4
    assert res["fid"] == res["fid_blocks"][0]
    assert res["fid_min"] <= res["fid_mean"] <= res["fid_max"]
    assert res["fid_min"] < res["fid_max"]  # 本物どうしでも組によって揺れる
    assert res["n_a"] == res["n_b"] == 40


# ---------------------------------------------------------------- 同梱の分類器


@pytest.fixture(scope="module")
def test_images():
    x, y = load_tensors(fashion_root(), train=False)
    return x, y


def test_shapes_of_logits_and_features():
    model = FashionClassifier().eval()
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    assert model(x).shape == (7, 10)
    feats = metrics.extract_features(model, x, batch_size=3)
    assert feats.shape == (7, FEATURE_DIM) and feats.dtype == torch.float64
    assert not feats.requires_grad


@pytest.mark.slow
def test_shipped_classifier_is_accurate_on_test_images(test_images):
    x, y = test_images[0][:1000], test_images[1][:1000]
    model = load_classifier()
    assert not model.training
    assert metrics.classifier_accuracy(model, x, y) >= 0.90
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert metrics.classifier_accuracy(model, x, shuffled) < 0.3  # ラベルが違えば低い


@pytest.mark.slow
def test_shipped_classifier_separates_real_from_noise(test_images):
    x, y = test_images
    model = load_classifier()
    ref = metrics.real_reference(model, x, y, "val", 500)
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = metrics.score_samples(model, noise, x[metrics.balanced_blocks(y, "val", 500)[0]])
    assert scores["fid"] > 20 * ref["fid_max"]
    assert scores["kid_mean"] > 20 * max(ref["kid_mean"], ref["kid_std"])


# ---------------------------------------------------------------- 来歴 JSON (同梱)


@pytest.mark.parametrize("name", ["ddpm_fashion.json", "flow_fashion.json"])
def test_shipped_provenance_records_the_split_of_every_number(name):
    import json

    from diffusion_fixtures import WEIGHTS

    info = json.loads((WEIGHTS / name).read_text("utf-8"))
    ev, sel = info["eval"], info["selection"]
    assert all(key.split("/")[0] == v["split"] in metrics.SPLITS for key, v in ev.items())
    n = sel["n"]
    assert sel["split"] == "val" and sel["chosen"] in sel["candidates"]
    assert all(ev[f"val/{task}@{n}"]["fid"] == fid for task, fid in sel["candidates"].items())
    assert sel["chosen_fid"] == min(sel["candidates"].values())
    tests = [v for v in ev.values() if v["split"] == "test" and v["task"] != "reference"]
    # test で測ったのは、val で先に測った (val が決めた) タスクだけ。選んだものは必ずある
    assert all(f"val/{v['task']}@{v['n']}" in ev for v in tests)
    assert sel["chosen"] in [v["task"] for v in tests]
    for split in metrics.SPLITS:
        ref = ev[f"{split}/reference@{n}"]
        assert ref["fid_min"] <= ref["fid"] <= ref["fid_max"] and len(ref["fid_blocks"]) >= 2
    if name == "ddpm_fashion.json":
        assert "LEGACY" in info["eval_legacy_note"]
    clf = json.loads((WEIGHTS / "fashion_classifier.json").read_text("utf-8"))
    assert set(clf["real_reference"]) == {f"{s}@1000" for s in metrics.SPLITS}
    assert "real_floor" not in clf


def test_the_classifier_network_lives_beside_its_loader():
    """特徴を作る分類器のネットワークは読み込み関数と同じモジュールにあり、metrics は指標だけ。"""
    from torch import nn

    from torchbook.diffusion import fashion_classifier

    assert FashionClassifier.__module__ == load_classifier.__module__ == fashion_classifier.__name__
    assert not [name for name, v in vars(metrics).items()
                if isinstance(v, type) and issubclass(v, nn.Module)]
