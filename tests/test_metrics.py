"""torchbook.diffusion.metrics と classifier: FID/KID の性質、分類器の読み込みと学習 CLI。"""

import json
import math

import pytest
import torch
from torch import nn

from booktools.data import data_root
from torchbook.diffusion import classifier, metrics
from torchbook.diffusion.data import load_tensors

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


def test_real_split_is_disjoint_and_checks_the_size():
    images = torch.arange(10.0).reshape(10, 1, 1, 1)
    ref, other = metrics.real_split(images, 4)
    assert ref.flatten().tolist() == [0, 1, 2, 3] and other.flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="2 つ"):
        metrics.real_split(images, 6)


# ---------------------------------------------------------------- 分類器


@pytest.fixture(scope="module")
def test_images():
    try:
        x, y = load_tensors(data_root(), train=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST がありません (python -m booktools.data で用意します)")
    return x[:1000], y[:1000]


def test_shapes_of_logits_and_features():
    model = classifier.FashionClassifier().eval()
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    assert model(x).shape == (7, 10)
    feats = metrics.extract_features(model, x, batch_size=3)
    assert feats.shape == (7, classifier.FEATURE_DIM) and feats.dtype == torch.float64
    assert not feats.requires_grad


def test_augment_keeps_shape_and_background():
    x = torch.full((5, 1, 32, 32), -1.0)
    x[:, :, 10:20, 10:20] = 1.0
    out = classifier.augment(x)
    assert out.shape == x.shape
    assert out.sum() == x.sum()  # 物体は縁から 2 画素以上離れているので、ずらしても画素は残る


def test_shipped_classifier_is_accurate_on_test_images(test_images):
    x, y = test_images
    model = classifier.load_classifier()
    assert not model.training
    assert metrics.classifier_accuracy(model, x, y) >= 0.90
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert metrics.classifier_accuracy(model, x, shuffled) < 0.3  # ラベルが違えば低い


def test_shipped_classifier_separates_real_from_noise(test_images):
    x, _ = test_images
    model = classifier.load_classifier()
    floor = metrics.real_floor(model, x, 500)
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = metrics.score_samples(model, noise, x[:500])
    assert scores["fid"] > 20 * floor["fid"]
    assert scores["kid_mean"] > 20 * max(floor["kid_mean"], floor["kid_std"])


def test_shipped_provenance_json():
    info = json.loads(classifier.DEFAULT_WEIGHTS.with_suffix(".json").read_text("utf-8"))
    assert info["test_images"] == 10_000 and info["test_accuracy"] >= 0.91
    assert not info["dry_run"] and info["command"].startswith("python -m torchbook")
    for n in ("1000", "5000"):
        assert math.isfinite(info["real_floor"][n]["fid"])


def test_load_classifier_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m torchbook.diffusion.classifier"):
        classifier.load_classifier(tmp_path / "none.pt")


def test_load_classifier_rejects_another_architecture(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ValueError, match="構造が違います"):
        classifier.load_classifier(path)


def test_train_cli_dry_run(tmp_path, test_images):
    save = tmp_path / "clf.pt"
    info = classifier.main([
        "--data-root", str(data_root()), "--dry-run", "--save", str(save), "--batch-size", "64",
    ])
    assert info["dry_run"] and info["epochs"] == 1 and info["test_images"] == 1000
    written = json.loads(save.with_suffix(".json").read_text("utf-8"))
    assert written["command"].endswith(f"--save {save} --batch-size 64")
    model = classifier.load_classifier(save)
    assert isinstance(model, classifier.FashionClassifier)
    # --evaluate-only は学習の記録を残したまま、測定値と評価コマンドを書き足す
    classifier.main(["--data-root", str(data_root()), "--evaluate-only", "--save", str(save),
                     "--floor", "50"])
    updated = json.loads(save.with_suffix(".json").read_text("utf-8"))
    assert updated["train_loss"] == written["train_loss"] and updated["test_images"] == 10_000
    assert set(updated["real_floor"]) == {"50"}
    assert "--evaluate-only" in updated["evaluation"]["command"]


def test_train_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        classifier.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        classifier.parse_args(["--floor", "6000"])
