"""Per-sample gradients and block factors of the client's Fisher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.fisher import (
    FisherError,
    block_factors,
    factors_from_gradients,
    fit_rows,
    layer_factors,
    per_sample_gradients,
    reconstruction_factors,
    shifted_copies,
    with_shifted_copies,
)
from zkunlearn.client.group_obs import apply_group_obs

LOSS = nn.functional.cross_entropy


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        return out


class _Seq(nn.Module):
    """Sequence-shaped outputs (N, T, C), like a language model's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x).unsqueeze(1).expand(-1, 4, -1)
        return out


def _setup(n: int = 12) -> tuple[_Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net().double()
    return model, torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    model.eval()
    param = dict(model.named_parameters())[name]
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        LOSS(model(x[i : i + 1]), y[i : i + 1]).backward()  # type: ignore[no-untyped-call]
        assert param.grad is not None
        out.append(param.grad.detach().clone())
    return torch.stack(out)


def test_vmap_gradients_equal_per_sample_backward() -> None:
    model, x, y = _setup()
    model.train()  # per_sample_gradients must evaluate in eval mode and restore the flag
    got = per_sample_gradients(model, ["fc1.weight", "fc2.bias"], x, y, LOSS, chunk_size=5)
    assert model.training
    for name in ("fc1.weight", "fc2.bias"):
        ref = _loop_gradients(model, x, y, name)
        assert got[name].shape == ref.shape
        assert torch.allclose(got[name], ref, atol=1e-12, rtol=0)


def test_block_factors_layout_normalisation_and_exclusion() -> None:
    model, x, y = _setup(n=16)
    B = 16  # fc1.weight has 60 weights: 4 blocks, the last one 12 long
    exclude = torch.zeros(16, dtype=torch.bool)
    exclude[[1, 4, 9]] = True
    bf = block_factors(model, "fc1.weight", x, y, LOSS, B, exclude=exclude)
    assert bf.factors.shape == (4, 13, 16)
    assert bf.factors.dtype == np.float64
    assert bf.shape == (10, 6)
    assert np.all(bf.factors[3][:, 12:] == 0)  # padding past numel carries no gradient
    raw = _loop_gradients(model, x[~exclude], y[~exclude], "fc1.weight").reshape(13, -1).numpy()
    # The factors are the kept samples' gradients, normalised: mean diag of G^T G / m is 1 ...
    diag = np.concatenate([(bf.factors[k] ** 2).sum(0) / bf.m for k in range(4)])[:60]
    assert diag.mean() == pytest.approx(1.0, rel=1e-12)
    # ... and `scale` is that mean diagonal before normalising.
    assert bf.scale == pytest.approx(float(np.mean((raw**2).sum(0) / 13)), rel=1e-12)
    flat = bf.factors.transpose(1, 0, 2).reshape(13, -1)[:, :60]
    assert np.allclose(flat * np.sqrt(bf.scale), raw, atol=1e-12)
    # A numpy exclusion mask means the same.
    same = block_factors(model, "fc1.weight", x, y, LOSS, B, exclude=exclude.numpy())
    assert np.array_equal(same.factors, bf.factors)
    # Excluded samples really are left out: including them changes the factors.
    full = block_factors(model, "fc1.weight", x, y, LOSS, B)
    assert full.m == 16
    assert bf.fisher(0, 0.1).shape == (16, 16)
    assert not np.allclose(full.fisher(0, 0.1), bf.fisher(0, 0.1))


def test_float32_model_gives_float64_factors_close_to_float64_model() -> None:
    model, x, y = _setup(n=6)
    f64 = block_factors(model, "fc2.weight", x, y, LOSS, 8)
    f32 = block_factors(model.float(), "fc2.weight", x.float(), y, LOSS, 8)
    assert f32.factors.dtype == np.float64
    assert np.allclose(f32.factors, f64.factors, atol=1e-5)
    assert f32.scale == pytest.approx(f64.scale, rel=1e-5)


@pytest.mark.parametrize("block", [7, 16, 64])
def test_more_rows_than_block_are_compressed_to_the_same_fisher(block: int) -> None:
    """Past B rows the factor is B x B from the Gram matrix; F, and so the OBS update, are unchanged."""
    model, x, y = _setup(n=300)  # 300 rows > B: compressed, across three 128-sample chunks
    compressed = block_factors(model, "fc1.weight", x, y, LOSS, block)
    flat = per_sample_gradients(model, ["fc1.weight"], x, y, LOSS)["fc1.weight"].reshape(300, -1).numpy()
    rows = factors_from_gradients("fc1.weight", flat, block)
    assert compressed.factors.shape == (rows.n_blocks, block, block)
    assert compressed.scale == pytest.approx(rows.scale, rel=1e-12)
    for k in range(rows.n_blocks):
        assert np.allclose(compressed.fisher(k, 0.05), rows.fisher(k, 0.05), atol=1e-12, rtol=0)
    tail = 60 - (rows.n_blocks - 1) * block
    assert np.all(compressed.factors[-1][:, tail:] == 0)
    mask = LayerMask.from_dense("fc1.weight", np.random.default_rng(0).random((10, 6)) < 0.3, block)
    weight = dict(model.named_parameters())["fc1.weight"].detach()
    a, _ = apply_group_obs(weight, compressed, mask, 0.05)
    b, _ = apply_group_obs(weight, rows, mask, 0.05)
    assert np.allclose(a, b, atol=1e-10, rtol=0)


def test_ggn_factors_equal_the_gauss_newton_matrix() -> None:
    """``J^T (diag p - p p^T) J`` per sample from autograd Jacobians, against the C-rows-per-sample factor."""
    model, x, y = _setup(n=40)
    model.eval()
    weight = dict(model.named_parameters())["fc1.weight"].detach()
    ggn = np.zeros((60, 60))
    for i in range(40):

        def logits(w: torch.Tensor, i: int = i) -> torch.Tensor:
            out: torch.Tensor = torch.func.functional_call(model, {"fc1.weight": w}, (x[i : i + 1],))[0]
            return out

        J = torch.autograd.functional.jacobian(logits, weight).reshape(3, -1).numpy()
        p = torch.softmax(model(x[i : i + 1]), -1)[0].detach().numpy()
        ggn += J.T @ (np.diag(p) - np.outer(p, p)) @ J
    ggn /= 40 * 3  # the factor's rows are (sample, class) pairs
    zeros = torch.zeros(40, dtype=torch.long)
    for block in (64, 256):  # 120 rows: gram path for B = 64, plain rows for B = 256
        bf = block_factors(model, "fc1.weight", x, zeros, LOSS, block, curvature="ggn")
        got = bf.factors[0].T @ bf.factors[0] / bf.m * bf.scale
        assert np.allclose(got[:60, :60], ggn, atol=1e-12, rtol=0)
    # Labels play no part in the GGN, and it differs from the empirical Fisher.
    with_labels = block_factors(model, "fc1.weight", x, y, LOSS, 256, curvature="ggn")
    assert np.array_equal(with_labels.factors, bf.factors)
    empirical = block_factors(model, "fc1.weight", x, y, LOSS, 256)
    assert not np.allclose(empirical.fisher(0, 0.1), bf.fisher(0, 0.1))


def test_ggn_refusals() -> None:
    model, x, y = _setup()
    with pytest.raises(FisherError, match="unknown curvature"):
        block_factors(model, "fc1.weight", x, y, LOSS, 16, curvature="hessian")  # type: ignore[arg-type]

    seq = _Seq().double()
    with pytest.raises(FisherError, match=r"\(N, C\) logits"):
        block_factors(seq, "fc.weight", x, y, LOSS, 16, curvature="ggn")


def test_refusals() -> None:
    model, x, y = _setup()
    with pytest.raises(FisherError, match="no parameters"):
        per_sample_gradients(model, ["nope.weight"], x, y, LOSS)
    with pytest.raises(FisherError, match="targets"):
        per_sample_gradients(model, ["fc1.weight"], x, y[:-1], LOSS)
    with pytest.raises(FisherError, match="no samples"):
        block_factors(model, "fc1.weight", x, y, LOSS, 16, exclude=torch.ones(12, dtype=torch.bool))
    with pytest.raises(FisherError, match="entries"):
        block_factors(model, "fc1.weight", x, y, LOSS, 16, exclude=torch.ones(5, dtype=torch.bool))
    with pytest.raises(FisherError, match="block size"):
        block_factors(model, "fc1.weight", x, y, LOSS, 0)
    with pytest.raises(FisherError, match="all zero"):
        factors_from_gradients("w", np.zeros((4, 8)), 4)
    bad = np.ones((4, 8))
    bad[0, 0] = np.nan
    with pytest.raises(FisherError, match="NaN"):
        factors_from_gradients("w", bad, 4)


@pytest.mark.parametrize("curvature", ["empirical", "ggn"])
def test_one_pass_over_several_layers_equals_one_layer_at_a_time(curvature: str) -> None:
    model, x, y = _setup(n=150)
    together = layer_factors(model, ["fc1.weight", "fc2.weight"], x, y, LOSS, 8, curvature=curvature)  # type: ignore[arg-type]
    for name in ("fc1.weight", "fc2.weight"):
        alone = block_factors(model, name, x, y, LOSS, 8, curvature=curvature)  # type: ignore[arg-type]
        assert together[name].shape == alone.shape
        assert np.allclose(together[name].factors, alone.factors, atol=1e-12, rtol=0)


def test_sampled_label_fisher_is_reproducible_and_estimates_the_ggn() -> None:
    """Labels drawn from the model: seeded draws repeat, and their average approaches the exact GGN."""
    model, x, y = _setup(n=4)
    many = x.repeat(1500, 1)  # 6,000 draws over 4 inputs
    labels = torch.zeros(many.shape[0], dtype=torch.long)
    sampled = block_factors(model, "fc1.weight", many, labels, LOSS, 64, curvature="fisher")
    exact = block_factors(model, "fc1.weight", x, y, LOSS, 64, curvature="ggn")
    f_s, f_e = (f.factors[0].T @ f.factors[0] * f.scale / f.m for f in (sampled, exact))
    f_e *= 3  # the exact factor averages over (sample, class) rows, the sampled one over samples
    assert np.linalg.norm(f_s - f_e) / np.linalg.norm(f_e) < 0.1
    again = block_factors(model, "fc1.weight", many, labels, LOSS, 64, curvature="fisher")
    assert np.array_equal(again.factors, sampled.factors)
    other = layer_factors(model, ["fc1.weight"], many, labels, LOSS, 64, curvature="fisher", seed=1)
    assert not np.array_equal(other["fc1.weight"].factors, sampled.factors)


def test_sampled_label_fisher_handles_sequence_outputs() -> None:
    """Where the exact GGN is refused (a row per position and class), the sampled Fisher works."""

    torch.manual_seed(0)
    seq = _Seq().double()
    x = torch.randn(30, 6, dtype=torch.float64)
    bf = block_factors(seq, "fc.weight", x, torch.zeros(30, 4, dtype=torch.long), LOSS, 6, curvature="fisher")
    assert bf.factors.shape == (3, 6, 6)
    assert np.isfinite(bf.factors).all()
    assert bf.scale > 0


class _Tokens(nn.Module):
    """A linear layer applied to every token of (N, T, d) inputs, like a transformer's fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.relu(self.fc(x)))
        return out


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _dense_reconstruction(inputs: torch.Tensor, n_out: int) -> np.ndarray:
    """``I_out (x) E[x x^T]`` over every token, as the dense (numel x numel) row-major matrix."""
    rows = inputs.reshape(-1, inputs.shape[-1]).numpy()
    return np.kron(np.eye(n_out), rows.T @ rows / rows.shape[0])


@pytest.mark.parametrize("block", [5, 7, 12, 35])  # one row, across rows, partial last block, whole layer
@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_reconstruction_term_is_the_input_covariance_added_at_its_weight(block: int, curvature: str) -> None:
    """Each block's matrix is the normalised curvature plus ``w`` times the normalised ``I (x) E[x x^T]``
    restricted to the block (token rows of a sequence model), and the pair is renormalised."""
    torch.manual_seed(1)
    model = _Tokens().double()
    x = torch.randn(20, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20, 4))
    exclude = torch.zeros(20, dtype=torch.bool)
    exclude[[2, 11]] = True
    weight = 0.3
    kw = {"curvature": curvature, "exclude": exclude}
    plain = layer_factors(model, ["fc.weight"], x, y, _seq_loss, block, **kw)["fc.weight"]  # type: ignore[arg-type]
    both = layer_factors(model, ["fc.weight"], x, y, _seq_loss, block, reconstruction_weight=weight, **kw)[  # type: ignore[arg-type]
        "fc.weight"
    ]
    numel = 35
    recon = _dense_reconstruction(x[~exclude], 7)
    recon /= np.mean(np.diag(recon))
    for k in range(plain.n_blocks):
        lo, hi = k * block, min((k + 1) * block, numel)
        curv = plain.fisher(k, 0.0)[: hi - lo, : hi - lo]
        expected = curv + weight * recon[lo:hi, lo:hi]
        expected /= 1.0 + weight  # both terms had unit mean diagonal over the layer
        got = both.fisher(k, 0.0)
        assert np.allclose(got[: hi - lo, : hi - lo], expected, atol=1e-10, rtol=0)
        assert np.allclose(got[hi - lo :], 0.0)  # padding
        assert np.allclose(got[:, hi - lo :], 0.0)
    assert both.scale == pytest.approx(plain.scale * (1.0 + weight), rel=1e-10)


def test_reconstruction_weight_zero_is_the_plain_curvature_and_bad_weights_are_refused() -> None:
    model, x, y = _setup(n=40)
    plain = block_factors(model, "fc1.weight", x, y, LOSS, 16)
    zero = layer_factors(model, ["fc1.weight"], x, y, LOSS, 16, reconstruction_weight=0.0)["fc1.weight"]
    assert np.array_equal(plain.factors, zero.factors)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(FisherError, match="reconstruction weight"):
            layer_factors(model, ["fc1.weight"], x, y, LOSS, 16, reconstruction_weight=bad)
    with pytest.raises(FisherError, match=r"nn.Linear; 'fc1.bias'"):
        layer_factors(model, ["fc1.bias"], x, y, LOSS, 4, reconstruction_weight=0.1)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    images = torch.randn(9, 1, 6).double()
    with pytest.raises(FisherError, match="Conv1d"):
        layer_factors(conv, ["0.weight"], images, y[:9], LOSS, 6, reconstruction_weight=1.0)


def test_group_obs_with_a_dominant_reconstruction_term_is_the_least_squares_reconstruction() -> None:
    """With the reconstruction term dominating, Group-OBS becomes OBC/SparseGPT's layer-wise optimum:
    each row's unmasked weights are the least-squares fit of the row's original pre-activations on
    the client's inputs (every token), given the masked weights are zero."""
    torch.manual_seed(3)
    model = _Tokens().double()
    x = torch.randn(200, 4, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)  # correlated
    y = torch.randint(0, 3, (200, 4))
    weight = model.fc.weight.detach().numpy().copy()
    mask = LayerMask("fc.weight", (7, 5), 5, {k: (0, 2) for k in range(7)})  # 2 of each row's 5 inputs
    factors = layer_factors(model, ["fc.weight"], x, y, _seq_loss, 5, reconstruction_weight=1e8)["fc.weight"]
    new, _ = apply_group_obs(torch.from_numpy(weight), factors, mask, 1e-12)
    new = np.asarray(new).reshape(7, 5)
    rows = x.reshape(-1, 5).numpy()
    keep = [1, 3, 4]
    for r in range(7):
        fit, *_ = np.linalg.lstsq(rows[:, keep], rows @ weight[r], rcond=None)
        assert np.allclose(new[r, keep], fit, rtol=1e-5, atol=1e-7)
        assert np.all(new[r, [0, 2]] == 0.0)


def test_reconstruction_factors_alone_and_their_refusals() -> None:
    torch.manual_seed(2)
    model = _Tokens().double()
    x = torch.randn(10, 3, 5, dtype=torch.float64)
    exclude = torch.zeros(10, dtype=torch.bool)
    exclude[0] = True
    got = reconstruction_factors(model, ["fc.weight", "out.weight"], x, 7, exclude)
    recon = _dense_reconstruction(x[1:], 7)
    recon /= np.mean(np.diag(recon))
    assert np.allclose(got["fc.weight"].fisher(0, 0.0), recon[:7, :7], atol=1e-12)
    assert got["out.weight"].shape == (3, 7)
    with pytest.raises(FisherError, match="all zero"):
        reconstruction_factors(model, ["fc.weight"], torch.zeros(4, 3, 5, dtype=torch.float64), 5)
    with pytest.raises(FisherError, match="no samples"):
        reconstruction_factors(model, ["fc.weight"], x, 5, torch.ones(10, dtype=torch.bool))
    with pytest.raises(FisherError, match="no submodule"):
        reconstruction_factors(model, ["nope.weight"], x, 5)


@pytest.mark.parametrize("block_size", [4, 6])
def test_reconstruction_factors_of_a_float32_model_couple_only_weights_of_one_row(block_size: int) -> None:
    """Blocks inside one row get E[x x^T] on their columns; weights of different rows do not couple."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    inputs = torch.randn(50, 4)
    factors = reconstruction_factors(model, ["0.weight"], inputs, block_size)["0.weight"]
    x = inputs.double().numpy()
    cov = x.T @ x / x.shape[0]
    expected = np.kron(np.eye(3), cov) / np.trace(cov) * 4  # I_out (x) E[x x^T], unit mean diagonal
    for k in range(factors.n_blocks):
        lo, hi = k * block_size, min((k + 1) * block_size, 12)
        np.testing.assert_allclose(
            factors.fisher(k, 0.0)[: hi - lo, : hi - lo], expected[lo:hi, lo:hi], rtol=1e-6, atol=1e-9
        )
    with pytest.raises(FisherError, match=r"nn.Linear; '1.weight' is 'weight' of a ReLU"):
        reconstruction_factors(model, ["1.weight"], inputs, block_size)


def test_shifted_copies_move_every_pixel_by_the_shift_with_zero_fill() -> None:
    images = torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    out = shifted_copies(images, 2)
    assert out.shape == (15, 2, 5, 6)
    assert torch.equal(out[:3], images)
    for k, (dy, dx) in enumerate(((2, 0), (-2, 0), (0, 2), (0, -2)), start=1):
        copy = out[3 * k : 3 * (k + 1)]
        for i in range(5):
            for j in range(6):
                src_i, src_j = i - dy, j - dx
                inside = 0 <= src_i < 5 and 0 <= src_j < 6
                want = images[..., src_i, src_j] if inside else torch.zeros(3, 2)
                assert torch.equal(copy[..., i, j], want), (dy, dx, i, j)


def test_with_shifted_copies_keeps_targets_and_exclusions_with_their_images() -> None:
    images = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 1])
    exclude = torch.tensor([False, True, False, False])
    x, y, out = with_shifted_copies(images, targets, exclude, 1)
    assert x.shape[0] == y.shape[0] == out.shape[0] == 20
    assert torch.equal(y, targets.repeat(5))
    assert torch.equal(out, exclude.repeat(5))
    # Every copy of the excluded image is excluded: the forgotten kind stays out of the curvature.
    moved_excluded = x[out][1:]
    assert all(torch.equal(m, shifted_copies(images[1:2], 1)[k]) for k, m in enumerate(moved_excluded, 1))
    same = with_shifted_copies(images, targets, None, 0)
    assert same[0] is images
    assert same[1] is targets
    assert same[2] is None
    assert with_shifted_copies(images, targets, None, 1)[2] is None


def test_shifted_copies_refuse_what_is_not_an_image_batch_or_a_shift_that_empties_it() -> None:
    with pytest.raises(FisherError, match=r"\(N, C, H, W\)"):
        shifted_copies(torch.zeros(4, 8), 1)
    for bad in (0, -1, 6):
        with pytest.raises(FisherError, match=r"shift must be 1\.\.5"):
            shifted_copies(torch.zeros(2, 1, 6, 7), bad)


def test_curvature_on_shifted_copies_is_the_curvature_of_the_stacked_batch() -> None:
    """What enrollment with ``fisher_shift`` commits: the factor of the images and their copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.GELU(), nn.Linear(6, 3))
    images = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(3))
    exclude = targets == 2
    x, y, out = with_shifted_copies(images, targets, exclude, 1)
    plain = layer_factors(model, ["1.weight"], images, targets, LOSS, 8, exclude, curvature="ggn")["1.weight"]
    moved = layer_factors(model, ["1.weight"], x, y, LOSS, 8, out, curvature="ggn")["1.weight"]
    kept = torch.cat([images[~exclude], *(c[~exclude] for c in shifted_copies(images, 1).chunk(5)[1:])])
    direct = layer_factors(model, ["1.weight"], kept, targets[: kept.shape[0]], LOSS, 8, curvature="ggn")
    for block in range(moved.n_blocks):
        assert np.allclose(moved.fisher(block, 0.0), direct["1.weight"].fisher(block, 0.0), atol=1e-10)
    assert not np.allclose(moved.fisher(0, 0.0), plain.fisher(0, 0.0), atol=1e-3)


def test_fit_rows_keeps_the_top_curvature_and_spreads_its_magnitude() -> None:
    """The committed rows must carry the top-m curvature exactly (all the relation sees is G^T G), and
    mixed rows keep one heavily curved direction from lying in a single row, which the circuit's range
    and the published g_bound would have to hold."""
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(4, 40, 32))
    factors[:, :, 7] *= 25.0  # one coordinate dominates every block's curvature
    m = 8
    fitted = fit_rows(factors, m)
    _u, sigma, vt = np.linalg.svd(factors, full_matrices=False)
    top = sigma[:, :m, None] * vt[:, :m, :]
    top /= np.sqrt(np.mean(np.sum(top * top, axis=1)) / m)
    gram = np.einsum("nib,nic->nbc", fitted, fitted)
    assert np.abs(gram - np.einsum("nib,nic->nbc", top, top)).max() < 1e-9 * np.abs(gram).max()
    assert np.mean(np.einsum("nib,nib->nb", fitted, fitted)) / m == pytest.approx(1.0)
    assert np.abs(fitted).max() < 0.5 * np.abs(top).max()
    few = rng.normal(size=(2, 3, 32))  # fewer samples than rows: padded, then mixed, Gram unchanged
    padded = fit_rows(few, m)
    scale = np.mean(np.einsum("nib,nib->nb", few, few)) / m
    assert np.allclose(np.einsum("nib,nic->nbc", padded, padded), np.einsum("nib,nic->nbc", few, few) / scale)
