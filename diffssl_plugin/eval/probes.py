"""Frozen-feature protocols: linear probe (sklearn) and weighted cosine kNN (lightly's ``knn_predict``).

Both choose nothing on the test split: the probe's regularisation is picked on the validation split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..runtime import similarity_dtype

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class ProbeResult:
    """A probe's validation and test accuracy and its settings (``params``, written into records). A linear
    probe also returns its chosen classifier: ``weights`` (W of shape (D, classes), b) on the features
    standardised with ``standardisation`` (the train features' mean and std, each (D,)), so that another
    protocol (fine-tuning's LP-FT start) can begin from exactly this classifier instead of fitting it again.
    ``path`` holds the solution at every C of the grid, ``basis_vectors`` the full-rank (D, D) eigenbasis it
    was solved in (None when D > N): what a later probe on mostly the same images starts from (``start=``)."""

    val_acc: float
    test_acc: float | None
    params: dict
    weights: tuple[torch.Tensor, torch.Tensor] | None = None
    standardisation: tuple[torch.Tensor, torch.Tensor] | None = None
    path: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None
    basis_vectors: torch.Tensor | None = None


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """The features standardised with the train features' mean and std (floored at 1e-6: constant features),
    and that (mean, std), each (D,)."""
    for t in (train, *others):  # a NaN row would otherwise surface as an L-BFGS overflow far from its cause
        bad = int((~torch.isfinite(t)).flatten(1).any(1).sum())
        if bad:
            raise FloatingPointError(
                f"{bad} of {len(t)} feature rows hold NaN or inf; the backbone's features are broken"
            )
    train = train.float()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t.float() - mean) / std for t in (train, *others)], (mean, std)


#: train-feature Gram matrices up to this size get the eigenbasis preconditioner (its ``eigh`` takes ~2 s at
#: 3,072 on 2 CPU cores); larger ones are solved in the features' own coordinates
MAX_PRECONDITIONED_DIM = 4096


@dataclass(frozen=True)
class Eigenbasis:
    """Orthonormal directions ``vectors`` (D, R) of a probe's standardised train features ``x`` (N, D),
    ``values`` (R,) = ‖x·v‖² along each, and ``coordinates`` = x·vectors (N, R), computed once and shared by
    every C of the probe's path: the eigendecomposition of ``xᵀx`` (all R = D directions when D ≤ N, else an
    orthonormal basis of x's row space, R = N, where the solution lies: the gradient never leaves it)."""

    vectors: torch.Tensor
    values: torch.Tensor
    coordinates: torch.Tensor


def eigenbasis(x: torch.Tensor, vectors: torch.Tensor | None = None) -> Eigenbasis | None:
    """The :class:`Eigenbasis` of ``x`` (float), or None when its Gram matrix is larger than
    :data:`MAX_PRECONDITIONED_DIM` or the device has no eigensolver (MPS).

    ``vectors``: an orthonormal (D, D) basis to use instead of decomposing ``xᵀx`` (the basis of a probe on mostly
    the same images: a preconditioner nearly as good, without the O(D³) ``eigh``); the values are ``x``'s own.
    Only a full basis can be shared: a row-space basis (D > N) of other images need not hold ``x``'s solution."""
    n, d = x.shape
    if vectors is not None:
        if vectors.shape != (d, d):
            raise ValueError(f"a shared eigenbasis must be a full ({d}, {d}) basis, got {tuple(vectors.shape)}")
        vectors = vectors.to(x.device, x.dtype)
        coordinates = x @ vectors
        return Eigenbasis(vectors, coordinates.pow(2).sum(0), coordinates)
    if min(n, d) > MAX_PRECONDITIONED_DIM:
        return None
    try:
        if d <= n:
            values, vectors = torch.linalg.eigh(x.t() @ x)
        else:  # the row space, through the smaller (N, N) Gram matrix
            values, u = torch.linalg.eigh(x @ x.t())
            values, u = values.flip(0), u.flip(1)  # strongest first: QR makes the weak directions orthogonal to them
            # all N directions: in float32 the weak ones' eigenvalues are rounding noise, but dropping them
            # (e.g. below N·eps of the largest: 2,955 of 3,000 for the MAE's 3,072-d features) left the probe in
            # a 45-d subspace, validation accuracy 77.6% instead of 80.9%
            vectors = torch.linalg.qr(x.t() @ u)[0]
    except (RuntimeError, NotImplementedError):  # LinAlgError is a RuntimeError
        return None
    return Eigenbasis(vectors, values.clamp_min(0), x @ vectors)


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    num_classes: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
    basis: Eigenbasis | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with sklearn's objective ``C·Σ CE + ½‖W‖²`` (bias unpenalised),
    solved by full-batch L-BFGS in torch; returns (W (D, classes), b).

    We solve it in torch rather than with ``sklearn.linear_model.LogisticRegression``: on this project's
    2-core machines sklearn's lbfgs took 5–20 s per fit on 2,000×256 features (numpy's BLAS settings here),
    torch takes a fraction of a second, and the same code runs on a GPU. It stops as sklearn's lbfgs does by
    default: when the largest gradient component is at most ``tol = 1e-4`` (sklearn's default tolerance, on the
    same per-sample-mean objective), or after ``max_iter`` iterations.

    ``basis`` (:func:`eigenbasis` of ``x``, whose ``coordinates`` stand in for ``x``): solve the same objective in
    preconditioned coordinates
    ``W = V·diag(s)·z``, with ``s = (¼·‖xv‖²/N + 2λ)^-½`` per direction v (a curvature scale: ¼ is the binary
    logistic loss's largest curvature, 2λ the penalty's), and map the solution back. Network features are
    strongly correlated (a 2.5-minute MAE's 3,072-d readout: one direction holds 65% of the variance), and in
    their own coordinates L-BFGS stopped at ``max_iter`` far from the minimum (objective 0.237 at C = 1 after
    200 iterations, 0.2157 after 1,000); preconditioned it meets ``tol`` (here on z's gradient) within 80–120
    evaluations at 0.2163.
    """
    n = x.shape[0]
    lam = 1.0 / (2.0 * c * n)  # the objective divided by C·N: same minimiser
    if basis is None:
        feats, penalty, to_w = x, lam, None
    else:
        scale = (0.25 * basis.values / n + 2.0 * lam).rsqrt()  # (R,)
        to_w = basis.vectors * scale  # (D, R): W = to_w·z; ‖W‖² = Σ scale²·z² (orthonormal directions)
        feats, penalty = basis.coordinates * scale, lam * scale.pow(2)  # x·to_w without a (N, D)·(D, R) product
    # solved for the class-major weights Wᵀ (C, D): the GEMMs are then (C, D)·(D, N) and (C, N)·(N, D), 3–4× faster
    # on the CPU than the (N, D)·(D, C) and (D, N)·(N, C) of the (D, C) layout (C ≈ 10 output columns)
    if init is None:
        w_t = torch.zeros(num_classes, feats.shape[1], device=x.device, dtype=x.dtype)
        b = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    else:
        w_t, b = init[0].t().contiguous(), init[1].clone()
        if to_w is not None:
            w_t = (w_t @ basis.vectors) / scale
    opt = torch.optim.LBFGS(
        [w_t, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    closure = logistic_loss_closure(feats, y, w_t, b, penalty)
    opt.step(closure)
    w_t = w_t.detach() if to_w is None else w_t.detach() @ to_w.t()
    return w_t.t().contiguous(), b.detach()


def logistic_loss_closure(
    x: torch.Tensor, y: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor, lam: float | torch.Tensor
):
    """An L-BFGS closure for ``cross_entropy(x @ w_tᵀ + b, y) + Σ lam·w_t²`` (``w_t``: the (C, D) class-major
    weights; ``lam`` a number or one per feature, (D,)) that writes the exact gradient into ``w_t.grad``/``b.grad``
    by hand (``(softmax − onehot)ᵀX/N + 2λWᵀ``): the same objective and gradient as autograd, at about half the
    cost per evaluation (no graph; this closure runs a few hundred times per fit). Logits are held
    class-major, (C, N)."""
    n = x.shape[0]
    x_t = x.t().contiguous()
    onehot_t = torch.nn.functional.one_hot(y.long(), w_t.shape[0]).t().to(x.dtype)

    def closure() -> torch.Tensor:
        logits = torch.addmm(b[:, None], w_t, x_t)  # (C, N)
        lse = logits.logsumexp(0, keepdim=True)
        loss = (lse - (logits * onehot_t).sum(0, keepdim=True)).mean() + (lam * w_t.pow(2)).sum()
        residual = (logits - lse).exp_().sub_(onehot_t).div_(n)  # softmax − onehot, over N
        w_t.grad = torch.addmm(w_t * (2.0 * lam), residual, x)
        b.grad = residual.sum(1)
        return loss

    return closure


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((x @ w + b).argmax(1) == y.to(x.device)).float().mean())


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    test_x: torch.Tensor | None = None,
    test_y: torch.Tensor | None = None,
    cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    start: ProbeResult | None = None,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features (statistics from the train split); the
    inverse regularisation ``C`` is chosen by validation accuracy (the path is warm-started from the
    strongest regularisation), and the chosen model is scored once on the test split. Runs on ``device``
    (the features are moved there); the chosen classifier and the standardisation come back on the CPU.
    ``num_classes``: the classifier's outputs (default: one past the largest label seen).

    ``start``: an earlier probe on the same features of mostly the same images (the sweep's at the chosen
    readout, the linear column's for a label fraction): each C's fit starts from its solution at that C
    (re-expressed for this standardisation: the same logits) and is preconditioned in its eigenbasis when that
    is full-rank. Only where L-BFGS starts changes, not the objective: it still stops at the same tolerance."""
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    xs, (mean, std) = _standardise(*(t.to(device) for t in (train_x, val_x, *([test_x] if test_x is not None else []))))
    train_y = train_y.to(device)
    starts = _start_path(start, (mean, std), num_classes, len(xs[0]))
    # a shared basis replaces the (D, D) eigh only where this probe would decompose xᵀx too (D ≤ N); for D > N
    # its own row-space basis comes from the small (N, N) Gram matrix
    shared = start.basis_vectors if start is not None and starts and xs[0].shape[1] <= xs[0].shape[0] else None
    basis = eigenbasis(xs[0], shared)
    best, params, path = None, None, {}
    for c in sorted(cs):
        init = starts.get(c, params)
        params = fit_logistic_regression(xs[0], train_y, c, num_classes, init, max_iter, basis=basis)
        path[c] = (params[0].cpu(), params[1].cpu())
        acc = _accuracy(xs[1], val_y, *params)
        if best is None or acc > best[0]:
            best = (acc, c, params)
    val_acc, c, params = best
    test_acc = _accuracy(xs[2], test_y, *params) if test_x is not None else None
    full_rank = basis is not None and basis.vectors.shape[0] == basis.vectors.shape[1]
    return ProbeResult(
        val_acc,
        test_acc,
        {
            "probe": "logistic_regression",
            "solver": "torch_lbfgs",
            "C": c,
            "C_grid": sorted(cs),
            "standardise": True,
            "max_iter": max_iter,
            "train_images": len(xs[0]),
            "preconditioner": _preconditioner_name(basis, shared),
            "warm_start": "earlier probe's path" if starts else "previous C",
        },
        weights=(params[0].cpu(), params[1].cpu()),
        standardisation=(mean.cpu(), std.cpu()),
        path=path,
        basis_vectors=basis.vectors.cpu() if full_rank else None,
    )


def _preconditioner_name(basis: Eigenbasis | None, shared: torch.Tensor | None) -> str:
    if basis is None:
        return "none"
    return "shared eigenbasis" if shared is not None else "train-feature eigenbasis"


def _start_path(
    start: ProbeResult | None, standardisation: tuple[torch.Tensor, torch.Tensor], num_classes: int, images: int
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """``start``'s solutions by C, re-expressed for features standardised with ``standardisation`` (the same
    logits for every input: W' = diag(σ₁/σ₀)·W, b' = b + ((μ₁ − μ₀)/σ₀)·W); empty when there is nothing usable:
    no start, another feature size or class count, or a train set of another scale (``images`` outside half to
    twice the start's: C weighs the data term by the image count, so at the same C the solution on 540 of the
    start's 6,000 images is far from the start's, and starting there took longer than the cold path)."""
    if start is None or not start.path or start.standardisation is None:
        return {}
    start_images = start.params.get("train_images")
    if start_images is None or not 0.5 * start_images <= images <= 2 * start_images:
        return {}
    mean, std = standardisation
    mean0, std0 = (t.to(mean.device, mean.dtype) for t in start.standardisation)
    if mean0.shape != mean.shape:
        return {}
    out = {}
    for c, (w, b) in start.path.items():
        w, b = w.to(mean.device, mean.dtype), b.to(mean.device, mean.dtype)
        if w.shape != (mean.shape[0], num_classes):
            return {}
        out[c] = (w * (std / std0)[:, None], b + ((mean - mean0) / std0) @ w)
    return out


@torch.no_grad()
def knn_accuracy(
    bank_x: torch.Tensor,
    bank_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> float:
    """Top-1 accuracy of weighted cosine kNN (InstDisc), via ``lightly.utils.benchmarking.knn_predict``.

    Cosine similarities are computed in float64 (float32 on MPS, which has no float64): features that share one
    large direction differ in their cosines below float32's resolution. MDSM's energy features are such (every
    row at cosine 1.0000 with the mean row): in float32 their cosines rounded alike and the kNN-20 of a
    10-minute MDSM was 16.6% (chance: 10%), 65.8% in float64 (``benchmarks/feature_geometry.py``). The bank
    then takes twice the memory of float32. ``dtype`` overrides it (``benchmarks/feature_geometry.py`` compares
    float32)."""
    from lightly.utils.benchmarking import knn_predict

    num_classes = num_classes or int(bank_y.max()) + 1
    device = torch.device(device)
    dtype = dtype or similarity_dtype(device)
    bank = torch.nn.functional.normalize(bank_x.to(device, dtype), dim=1).t().contiguous()
    bank_y, query_y = bank_y.to(device), query_y.to(device)
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: one sync at the end
    for start in range(0, len(query_x), batch_size):
        q = torch.nn.functional.normalize(query_x[start : start + batch_size].to(device, dtype), dim=1)
        pred = knn_predict(q, bank, bank_y, num_classes, knn_k=min(k, bank.shape[1]), knn_t=t)[:, 0]
        correct += (pred == query_y[start : start + batch_size]).sum()
    return int(correct) / len(query_x)


def knn_probe(
    train_x,
    train_y,
    val_x,
    val_y,
    test_x=None,
    test_y=None,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """kNN with the training features as the bank, scored on validation and (once) on test, on ``device``."""
    val = knn_accuracy(train_x, train_y, val_x, val_y, k, t, num_classes, device=device)
    test = (
        knn_accuracy(train_x, train_y, test_x, test_y, k, t, num_classes, device=device) if test_x is not None else None
    )
    return ProbeResult(val, test, {"probe": "knn", "k": k, "T": t, "metric": "cosine", "weighted": True})
