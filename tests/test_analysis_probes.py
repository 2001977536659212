"""analysis.linear_probes and LinearProbes against direct solves of the normal equations."""

from __future__ import annotations

import json

import pytest
import torch

from class_space_saliency import analysis, testing
from class_space_saliency.analysis.probes import ridge_from_normal_equations
from class_space_saliency.probing import POOLED, LinearProbes
from class_space_saliency.testing import class_logits, token_states

C = testing.NUM_CLASSES


def split(n_train: int = 24, n_test: int = 9):
    images = testing.tiny_images("plain", batch=n_train + n_test, seed=11)
    labels = torch.arange(n_train + n_test) % C
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def direct_ridge(x: torch.Tensor, labels: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """Solve [X 1]^T [X 1] + diag(alpha, ..., alpha, 0) = [X 1]^T Y for ±1 targets at once."""
    x = x.double()
    targets = -torch.ones(len(labels), C, dtype=torch.float64)
    targets[torch.arange(len(labels)), labels] = 1
    augmented = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    penalty = alpha * torch.eye(x.shape[1] + 1, dtype=torch.float64)
    penalty[-1, -1] = 0  # the intercept is not penalised
    solution = torch.linalg.solve(augmented.T @ augmented + penalty, augmented.T @ targets)
    return solution[:-1].T, solution[-1]


@torch.no_grad()
def states_by_hand(images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    return token_states(testing.tiny_vit("plain"), images)


def test_ridge_probes_match_a_direct_solve_of_the_normal_equations(tiny_vit):
    model = tiny_vit("plain")
    train, test = split()
    result = analysis.linear_probes(model, train, test, alpha=2.0, curve=None, batch_size=5)
    states = states_by_hand(train[0])
    probes = result.probes
    assert probes.positions == (*range(17), POOLED) and probes.num_images == 24
    for component in ("residual", "attention", "mlp"):
        for block in (0, 2):
            tokens = states[component][block]  # (24, 17, 32)
            for position in (0, 5, 16):
                weight, bias = direct_ridge(tokens[:, position], train[1], alpha=2.0)
                got = probes.probe(block, component, position)
                torch.testing.assert_close(got[0], weight.float(), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got[1], bias.float(), rtol=1e-4, atol=1e-5)
            image = tokens[:, 1:].reshape(-1, 32)  # pooled: every image token, label repeated
            weight, bias = direct_ridge(image, train[1].repeat_interleave(16), alpha=2.0)
            got = probes.probe(block, component, POOLED)
            torch.testing.assert_close(got[0], weight.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1], bias.float(), rtol=1e-4, atol=1e-5)


def test_ridge_matches_sklearn_ridge():
    sklearn = pytest.importorskip("sklearn.linear_model")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64) + 3
    labels = torch.arange(40) % C
    targets = -torch.ones(40, C, dtype=torch.float64)
    targets[torch.arange(40), labels] = 1
    augmented = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    weights, biases = ridge_from_normal_equations(
        augmented.T @ augmented, augmented.T @ targets, alpha=1.0
    )
    exact = sklearn.Ridge(alpha=1.0, solver="cholesky").fit(x.numpy(), targets.numpy())
    torch.testing.assert_close(weights, torch.from_numpy(exact.coef_))
    torch.testing.assert_close(biases, torch.from_numpy(exact.intercept_))
    official = sklearn.Ridge(alpha=1.0, solver="lsqr").fit(x.numpy(), targets.numpy())
    assert (x @ weights.T + biases).argmax(1).tolist() == official.predict(x.numpy()).argmax(
        1
    ).tolist()  # the official iterative solver approaches the same minimiser


def test_accuracies_match_hand_computation(tiny_vit):
    model = tiny_vit("plain")
    train, test = split()
    result = analysis.linear_probes(model, train, test, components=["mlp", "residual"], curve=None)
    states = states_by_hand(test[0])
    labels = test[1]
    for component in ("mlp", "residual"):
        for block in range(3):
            tokens = states[component][block]
            projection = class_logits(model, tokens).argmax(-1) == labels[:, None]  # (9, 17)
            torch.testing.assert_close(
                result.projection_top1[component][block], projection.double().mean(0).float() * 100
            )
            for column, position in enumerate(result.positions):
                weight, bias = result.probes.probe(block, component, position)
                chosen = tokens[:, 1:] if position == POOLED else tokens[:, position : position + 1]
                correct = (chosen @ weight.T + bias).argmax(-1) == labels[:, None]
                want = correct.double().mean() * 100
                assert result.probe_top1[component][block, column].item() == pytest.approx(
                    want.item(), abs=1e-4
                )
        image = result.probe_top1[component][:, 1:17].mean(1)
        torch.testing.assert_close(result.image_probe_top1(component), image)
        assert result.cls_top1(component)[0].tolist() == result.probe_top1[component][:, 0].tolist()


def test_data_efficiency_curve_fits_the_first_images_of_each_class(tiny_vit):
    model = tiny_vit("plain")
    train, test = split(n_train=21)  # 3 images per class, in class order 0..6, 0..6, 0..6
    result = analysis.linear_probes(
        model,
        train,
        test,
        components="attention",
        positions="pooled",
        curve=[1, 2, 5],
        batch_size=4,
    )
    assert result.curve_images == [7, 14, 21]
    states, test_states = states_by_hand(train[0]), states_by_hand(test[0])
    for column, first in enumerate((7, 14, 21)):  # the first n per class = the first 7n images
        for block in range(3):
            tokens = states["attention"][block][:first, 1:].reshape(-1, 32)
            weight, bias = direct_ridge(tokens, train[1][:first].repeat_interleave(16), 1.0)
            image = test_states["attention"][block][:, 1:].double()
            correct = (image @ weight.T + bias).argmax(-1) == test[1][:, None]
            want = correct.double().mean().item() * 100
            got = result.curve_top1["attention"][block, column].item()
            assert got == pytest.approx(want, abs=1e-4)
    # all training images: the curve's last point is the pooled probe
    torch.testing.assert_close(
        result.curve_top1["attention"][:, -1], result.pooled_probe_top1("attention")
    )


def test_streaming_and_batch_size_give_the_same_probes(tiny_vit):
    model = tiny_vit("plain")
    train, test = split()
    whole = analysis.linear_probes(model, train, test, curve=[1, 2], batch_size=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=5)
    parts = analysis.linear_probes(model, loader, test, curve=[1, 2], batch_size=3)
    torch.testing.assert_close(parts.probes.weights, whole.probes.weights, rtol=1e-5, atol=1e-6)
    for component in whole.components:
        torch.testing.assert_close(parts.probe_top1[component], whole.probe_top1[component])
        torch.testing.assert_close(parts.curve_top1[component], whole.curve_top1[component])


def test_probes_round_trip_through_save_and_load(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    train, test = split()
    result = analysis.linear_probes(tiny_vit("plain"), train, test, layers=[1, 2], curve=[1])
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == [
        "linear_probes.json",
        "linear_probes.md",
        "linear_probes.png",
        "linear_probes.pt",
    ]
    assert json.loads(paths[0].read_text())["num_train"] == 24
    for loaded in (analysis.LinearProbes.load(tmp_path), LinearProbes.load(paths[3])):
        assert torch.equal(loaded.weights, result.probes.weights)
        assert torch.equal(loaded.biases, result.probes.biases)
        assert (loaded.blocks, loaded.components, loaded.positions) == (
            (1, 2),
            ("residual", "attention", "mlp"),
            result.probes.positions,
        )
        assert (loaded.alpha, loaded.num_images, loaded.num_prefix_tokens) == (1.0, 24, 1)
    tokens = torch.randn(2, 17, 32)
    torch.testing.assert_close(
        LinearProbes.load(tmp_path).logits(tokens, 2, "mlp"), result.probes.logits(tokens, 2, "mlp")
    )
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold LinearProbes"):
        LinearProbes.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        LinearProbes.load(tmp_path / "missing.pt")


def test_probe_logits_per_token_and_pooled():
    generator = torch.Generator().manual_seed(3)
    weights, biases = torch.randn(1, 1, 4, 3, 5, generator=generator), torch.randn(1, 1, 4, 3)
    probes = LinearProbes(weights, biases, [4], ["mlp"], [0, 1, 2, POOLED])
    tokens = torch.randn(2, 2, 5, generator=generator)  # positions 1 and 2
    got = probes.logits(tokens, 4, "mlp", start=1)
    for n, position in enumerate((1, 2)):
        want = tokens[:, n] @ weights[0, 0, position].T + biases[0, 0, position]
        torch.testing.assert_close(got[:, n], want)
    pooled = probes.logits(tokens, 4, "mlp", POOLED)
    torch.testing.assert_close(pooled, tokens @ weights[0, 0, 3].T + biases[0, 0, 3])
    with pytest.raises(ValueError, match="token positions"):
        probes.logits(tokens, 4, "mlp", start=2)
    with pytest.raises(ValueError, match="block 3"):
        probes.logits(tokens, 3, "mlp")
    with pytest.raises(ValueError, match=r"\(B, N, 5\)"):
        probes.logits(tokens[..., :4], 4, "mlp")
    with pytest.raises(ValueError, match="position"):
        probes.logits(tokens, 4, "mlp", "middle")
    with pytest.raises(ValueError, match="weights must have shape"):
        LinearProbes(weights, biases, [4, 5], ["mlp"], [0, 1, 2, POOLED])
    assert "positions=[0, 1, 2] + pooled" in repr(probes)


def test_bad_arguments(tiny_vit):
    model = tiny_vit("plain")
    train, test = split()
    for options, error, match in [
        (dict(alpha=0), ValueError, "alpha"),
        (dict(positions=[-1]), ValueError, ">= 0"),
        (dict(positions=[40]), ValueError, "beyond"),
        (dict(positions=["cls"]), TypeError, "positions"),
        (dict(positions="some"), ValueError, "positions"),
        (dict(curve=[2, 1]), ValueError, "curve"),
        (dict(components="values"), ValueError, "components"),
    ]:
        with pytest.raises(error, match=match):
            analysis.linear_probes(model, train, test, **options)
