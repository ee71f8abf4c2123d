"""BatchNorm, InstanceNorm or GroupNorm? The usual claims, measured through tritonnorm.

    python examples/bn_vs_in.py            # full study: ~15 min on a 2-core CPU, far less on a GPU
    python examples/bn_vs_in.py --quick    # every experiment at tiny sizes (CI)
    python examples/bn_vs_in.py --out DIR  # where results.json, results.md and the plots go

Every model is built from tritonnorm's modules and trained with a plain PyTorch loop on data the
script generates (seeded, no downloads). Norms: BN, IN, GN (once ``tn.GroupNorm`` exists) and no
normalisation as the control. Experiments:

1. scope: does sample 0's output change when the rest of its batch changes? BN's train/eval gap.
2. small batches: held-out accuracy of a small CNN trained on the same samples at batch sizes
   1 to 128 (BN evaluated with its running statistics); online learning at batch size 1.
3. regularisation: train vs held-out accuracy on a small training set.
4. learning rates: a deeper CNN's loss after a fixed budget of SGD steps, across learning rates.
5. generative use: does a generator's sample depend on the other noise vectors of its batch; is
   an image-to-image network invariant to each input's contrast and brightness?
6. where IN hurts: a task whose label is the images' global brightness and contrast.

Backend: on CUDA the Triton kernels run. On CPU, tritonnorm runs its Triton kernels only under
Triton's interpreter (``TRITON_INTERPRET=1``, very slow) and otherwise falls back to torch's own
ops. The full run on CPU therefore measures the torch fallback; ``--quick`` without CUDA sets
``TRITON_INTERPRET=1`` before importing tritonnorm, so it runs the real kernels on tiny sizes.
``results.json`` records which backend ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor, nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# --quick without CUDA runs the Triton kernels through Triton's interpreter, which must be switched
# on before tritonnorm (and its kernels) are imported.
if "--quick" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import tritonnorm as tn
from tritonnorm.functional import runs_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GN_MISSING = "not available yet (this tritonnorm has no tn.GroupNorm)"


# --------------------------------------------------------------------------------------------
# The norms: one entry each, so an experiment loops over a table instead of repeating itself.


@dataclass(frozen=True)
class Norm:
    key: str  # results.json key
    label: str
    color: str
    layer: Callable[[int], nn.Module] | None  # channels -> module for (N, C, H, W); None: missing


def group_norm(channels: int) -> nn.Module:
    """GroupNorm with the most groups (up to 8) of at least two channels each."""
    groups = max(g for g in range(1, 9) if channels % g == 0 and channels // g >= 2)
    return tn.GroupNorm(groups, channels)


NORMS = (
    Norm("batch_norm", "BN", "tab:blue", tn.BatchNorm2d),
    Norm("instance_norm", "IN", "tab:orange", lambda c: tn.InstanceNorm2d(c, affine=True)),
    Norm("group_norm", "GN", "tab:green", group_norm if hasattr(tn, "GroupNorm") else None),
    Norm("none", "no norm", "tab:gray", lambda c: nn.Identity()),
)
AVAILABLE = tuple(norm for norm in NORMS if norm.layer is not None)


# --------------------------------------------------------------------------------------------
# Sizes of a full and a quick run.


@dataclass(frozen=True)
class Sizes:
    seeds: int
    image: int  # images are image x image, one channel
    width: int  # channels of the first conv layer
    blocks: int  # conv blocks of the classifier (each but the last halves the resolution)
    test: int  # held-out samples
    dependence_shape: tuple[int, int, int, int]
    gap_batches: tuple[int, ...]  # batch sizes of BN's train/eval gap
    gap_warmup: int  # batches that set BN's running statistics
    batch_sizes: tuple[int, ...]
    samples: int  # training samples at every batch size
    small_train: int  # the regularisation experiment's training set ...
    small_epochs: int  # ... and its epochs
    batch: int  # batch size of experiments 3, 4 and 6
    lrs: tuple[float, ...]
    lr_steps: int
    intensity_samples: int
    generator_batch: int


FULL = Sizes(
    seeds=4,
    image=16,
    width=12,
    blocks=3,
    test=2000,
    dependence_shape=(16, 32, 16, 16),
    gap_batches=(2, 8, 32, 128),
    gap_warmup=50,
    batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128),
    samples=6144,
    small_train=256,
    small_epochs=40,
    batch=32,
    lrs=(0.01, 0.03, 0.1, 0.3, 1.0),
    lr_steps=100,
    intensity_samples=3072,
    generator_batch=16,
)
QUICK_SIZES = Sizes(
    seeds=1,
    image=8,
    width=4,
    blocks=2,
    test=8,
    dependence_shape=(4, 4, 4, 4),
    gap_batches=(2, 8),
    gap_warmup=1,
    batch_sizes=(1, 2),
    samples=2,
    small_train=4,
    small_epochs=1,
    batch=4,
    lrs=(0.1, 1.0),
    lr_steps=1,
    intensity_samples=4,
    generator_batch=4,
)
ADAM_LR = 2e-3  # at batch size 8; scaled by sqrt(batch / 8) (clipped) in the batch-size sweep
REFERENCE_LR = 0.1  # the learning rate whose loss curves are plotted
CLASSES = 4


# --------------------------------------------------------------------------------------------
# Generated data: textured shapes.


def shapes(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n one-channel images of a striped disk, square, ring or cross (the label) at a random
    place and size on a smooth noise background, plus pixel noise."""

    def uniform(low: float, high: float) -> Tensor:
        return torch.empty(n, 1, 1).uniform_(low, high, generator=gen)

    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    dx, dy = xx - uniform(0.35 * size, 0.65 * size), yy - uniform(0.35 * size, 0.65 * size)
    r, dist = uniform(0.28 * size, 0.4 * size), (dx**2 + dy**2).sqrt()
    masks = torch.stack(
        [
            dist < r,
            torch.maximum(dx.abs(), dy.abs()) < 0.8 * r,
            (dist < r) & (dist > 0.55 * r),
            ((dx.abs() < 0.35 * r) & (dy.abs() < r)) | ((dy.abs() < 0.35 * r) & (dx.abs() < r)),
        ],
        dim=1,
    ).float()[torch.arange(n), labels]
    theta, phase = uniform(0, math.pi), uniform(0, 2 * math.pi)
    stripes = torch.sin(uniform(0.8, 1.6) * (xx * theta.cos() + yy * theta.sin()) + phase)
    background = F.avg_pool2d(torch.randn(n, 1, size, size, generator=gen), 3, 1, 1)[:, 0] * 0.5
    noise = 0.1 * torch.randn(n, size, size, generator=gen)
    images = masks * (1 + 0.5 * stripes) + (1 - masks) * background + noise
    return images.unsqueeze(1), labels


def jitter(images: Tensor, gen: torch.Generator, log_contrast: float, brightness: float) -> Tensor:
    """Each image times its own exp(U(-log_contrast, log_contrast)) plus U(-brightness, brightness)."""
    n = images.shape[0]
    a = torch.empty(n, 1, 1, 1).uniform_(-log_contrast, log_contrast, generator=gen).exp()
    b = torch.empty(n, 1, 1, 1).uniform_(-brightness, brightness, generator=gen)
    return images * a.to(images.device) + b.to(images.device)


def shape_task(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """The classification task: which shape, under a mild per-image contrast/brightness jitter."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = shapes(n, size, gen)
    return jitter(images, gen, 0.3, 0.5).to(DEVICE), labels.to(DEVICE)


def intensity_task(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Same images, but the label is (bright or dark) x (high or low contrast): 4 classes that
    per-image normalisation erases. The shape is irrelevant."""
    gen = torch.Generator().manual_seed(seed)
    images, _ = shapes(n, size, gen)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    contrast = torch.where(labels % 2 == 1, 2.0, 0.5).view(n, 1, 1, 1)
    brightness = torch.where(labels // 2 == 1, 1.0, -1.0).view(n, 1, 1, 1)
    return jitter(images * contrast + brightness, gen, 0.15, 0.3).to(DEVICE), labels.to(DEVICE)


def test_seed(seed: int) -> int:
    return 1_000_003 + seed


# --------------------------------------------------------------------------------------------
# Models, built from the norm table.


def conv_norm_relu(norm: Norm, c_in: int, c_out: int, **conv: object) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, **conv), norm.layer(c_out), nn.ReLU()]


def classifier(
    norm: Norm, sizes: Sizes, convs_per_block: int = 1, padding: str = "zeros"
) -> nn.Module:
    """Conv blocks (width, 2 width, 2 width, ...) with max pooling between them, global average
    pooling and a linear head; ``padding`` is the convolutions' padding_mode."""
    layers: list[nn.Module] = []
    c_in = 1
    for block in range(sizes.blocks):
        c_out = sizes.width * min(2**block, 2)
        for _ in range(convs_per_block):
            layers += conv_norm_relu(norm, c_in, c_out, padding_mode=padding)
            c_in = c_out
        if block < sizes.blocks - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES)]
    return nn.Sequential(*layers).to(DEVICE)


def generator(norm: Norm, sizes: Sizes, z_dim: int = 16) -> nn.Module:
    """A DCGAN-style generator: noise -> (2w, s/4, s/4) -> upsample, conv -> ... -> one image."""
    w, s = sizes.width, sizes.image // 4
    return nn.Sequential(
        nn.Linear(z_dim, 2 * w * s * s),
        nn.Unflatten(1, (2 * w, s, s)),
        norm.layer(2 * w),
        nn.ReLU(),
        nn.Upsample(scale_factor=2),
        *conv_norm_relu(norm, 2 * w, w),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(w, 1, 3, padding=1),
        nn.Tanh(),
    ).to(DEVICE)


def image_to_image(norm: Norm, sizes: Sizes) -> nn.Module:
    """A style-transfer-like network; reflection padding, as such networks use, so that a
    convolution maps a*x + b to a*conv(x) + (per-channel constant)."""
    w = sizes.width
    return nn.Sequential(
        *conv_norm_relu(norm, 1, w, padding_mode="reflect"),
        *conv_norm_relu(norm, w, w, padding_mode="reflect"),
        nn.Conv2d(w, 1, 3, padding=1, padding_mode="reflect"),
    ).to(DEVICE)


# --------------------------------------------------------------------------------------------
# Training and evaluation.


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> list[float]:
    """Plain loop; returns the loss of every step (stops at the first non-finite loss)."""
    model.train()
    losses = []
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return losses


def minibatches(
    images: Tensor, labels: Tensor, batch: int, epochs: int = 1, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen).to(labels.device)
        out += [(images[i], labels[i]) for i in order.split(batch)]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Eval-mode accuracy (BN uses its running statistics)."""
    model.eval()
    correct = sum(
        (model(x).argmax(1) == y).sum().item()
        for x, y in zip(images.split(batch), labels.split(batch), strict=True)
    )
    return correct / len(labels)


def train_classifier(
    norm: Norm, sizes: Sizes, data: tuple[Tensor, Tensor], batch: int, lr: float,
    seed: int, epochs: int = 1, padding: str = "zeros",
) -> nn.Module:  # fmt: skip
    torch.manual_seed(seed)
    model = classifier(norm, sizes, padding=padding)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_steps(model, optimizer, minibatches(*data, batch, epochs, seed))
    return model


def adam_lr(batch: int) -> float:
    return min(1e-2, max(5e-4, ADAM_LR * math.sqrt(batch / 8)))


# --------------------------------------------------------------------------------------------
# Progress and statistics.


class Progress:
    """One line per run on stderr: experiment, run i/n and its parameters, elapsed time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def runs(self, experiment: str, names: tuple[str, ...], items: Sequence[tuple]) -> Iterator:
        for i, item in enumerate(items, 1):
            params = " ".join(
                f"{name}={value.label if isinstance(value, Norm) else value}"
                for name, value in zip(names, item, strict=True)
            )
            print(
                f"[{self.elapsed():6.0f}s] {experiment}: run {i}/{len(items)} ({params})",
                file=sys.stderr,
                flush=True,
            )
            yield item


def grid(*axes: Sequence) -> list[tuple]:
    return list(itertools.product(*axes))


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": mean(values), "min": min(values), "max": max(values)}


def fmt(stat: dict[str, float], digits: int = 2, percent: bool = False) -> str:
    """'mean [min–max]', as percentages if asked."""
    scale, unit = (100, "%") if percent else (1, "")
    m, lo, hi = (scale * stat[k] for k in ("mean", "min", "max"))
    if lo == hi:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} [{lo:.{digits}f}–{hi:.{digits}f}]"


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# 1. Scope: batch dependence and BN's train/eval gap.


@torch.no_grad()
def batch_dependence(norm: Norm, shape: tuple[int, ...], seed: int) -> float:
    """Largest change of sample 0's training-mode output when every other sample changes."""
    torch.manual_seed(seed)
    layer = norm.layer(shape[1]).to(DEVICE).train()
    x = torch.randn(shape, device=DEVICE)
    other = x.clone()
    other[1:] = 3 * torch.randn_like(x[1:]) + 1
    return max_abs(layer(x)[0], layer(other)[0])


@torch.no_grad()
def train_eval_gap(sizes: Sizes, batch: int, seed: int) -> float:
    """Mean |train-mode - eval-mode| output of a BN layer on conv features of the shape task,
    after ``gap_warmup`` training batches set its running statistics (output std is ~1)."""
    torch.manual_seed(seed)
    features = nn.Conv2d(1, sizes.width, 3, padding=1).to(DEVICE)
    layer = tn.BatchNorm2d(sizes.width).to(DEVICE)
    images, _ = shape_task(batch * (sizes.gap_warmup + 1), sizes.image, seed)
    for x in features(images).split(batch):
        train_out = layer.train()(x)
    return (train_out - layer.eval()(x)).abs().mean().item()


def scope(sizes: Sizes, progress: Progress) -> dict:
    dependence: dict[str, list[float]] = {norm.key: [] for norm in AVAILABLE}
    runs = grid(AVAILABLE, range(sizes.seeds))
    for norm, seed in progress.runs("1 scope", ("norm", "seed"), runs):
        dependence[norm.key].append(batch_dependence(norm, sizes.dependence_shape, seed))
    gaps: dict[str, list[float]] = {str(batch): [] for batch in sizes.gap_batches}
    runs = grid(sizes.gap_batches, range(sizes.seeds))
    for batch, seed in progress.runs("1 scope, BN train/eval gap", ("batch", "seed"), runs):
        gaps[str(batch)].append(train_eval_gap(sizes, batch, seed))
    return {
        "batch_dependence": {
            norm.key: max(dependence[norm.key]) if norm.layer else None for norm in NORMS
        },
        "input_shape": list(sizes.dependence_shape),
        "bn_train_eval_gap": {batch: spread(values) for batch, values in gaps.items()},
    }


# --------------------------------------------------------------------------------------------
# 2. Small batches and online learning.


def one_training_step(layer: nn.Module, shape: tuple[int, ...]) -> str:
    """'trains', or the error a training step at this input shape raises."""
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    try:
        layer.to(DEVICE).train()(x).sum().backward()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "trains"


def online_checks(sizes: Sizes) -> dict[str, dict[str, str]]:
    c, s = sizes.width, sizes.image
    cases = {
        f"(1, {c}, {s}, {s}) feature map": (1, c, s, s),
        f"(1, {c}, 1, 1) pooled": (1, c, 1, 1),
    }
    checks = {
        norm.key: {case: one_training_step(norm.layer(c), shape) for case, shape in cases.items()}
        for norm in AVAILABLE
    }
    checks["batch_norm"][f"tn.BatchNorm1d on (1, {c})"] = one_training_step(
        tn.BatchNorm1d(c), (1, c)
    )
    return checks


def small_batches(sizes: Sizes, progress: Progress) -> dict:
    accuracy_by = {norm.key: {str(b): [] for b in sizes.batch_sizes} for norm in AVAILABLE}
    runs = grid(range(sizes.seeds), sizes.batch_sizes, AVAILABLE)
    for seed, batch, norm in progress.runs("2 small batches", ("seed", "batch", "norm"), runs):
        train = shape_task(sizes.samples, sizes.image, seed)
        model = train_classifier(norm, sizes, train, batch, adam_lr(batch), seed)
        test = shape_task(sizes.test, sizes.image, test_seed(seed))
        accuracy_by[norm.key][str(batch)].append(accuracy(model, *test))
    return {
        "train_samples": sizes.samples,
        "adam_lr": {str(b): adam_lr(b) for b in sizes.batch_sizes},
        "accuracy": {
            key: {batch: spread(values) | {"values": values} for batch, values in per.items()}
            for key, per in accuracy_by.items()
        },
        "online_batch_size_1": online_checks(sizes),
    }


# --------------------------------------------------------------------------------------------
# 3. Regularisation: generalisation gap on a small training set.


def regularisation(sizes: Sizes, progress: Progress) -> dict:
    found: dict[str, dict[str, list[float]]] = {
        norm.key: {"train": [], "test": [], "gap": []} for norm in AVAILABLE
    }
    runs = grid(range(sizes.seeds), AVAILABLE)
    for seed, norm in progress.runs("3 regularisation", ("seed", "norm"), runs):
        train = shape_task(sizes.small_train, sizes.image, seed)
        model = train_classifier(norm, sizes, train, sizes.batch, ADAM_LR, seed, sizes.small_epochs)
        train_acc = accuracy(model, *train)
        test_acc = accuracy(model, *shape_task(sizes.test, sizes.image, test_seed(seed)))
        for name, value in (
            ("train", train_acc),
            ("test", test_acc),
            ("gap", train_acc - test_acc),
        ):
            found[norm.key][name].append(value)
    return {
        "train_samples": sizes.small_train,
        "epochs": sizes.small_epochs,
        "accuracy": {
            key: {name: spread(values) for name, values in per.items()}
            for key, per in found.items()
        },
    }


# --------------------------------------------------------------------------------------------
# 4. Learning rates: loss after a fixed budget of SGD steps.


def final_loss(losses: list[float], steps: int) -> float | None:
    """Mean loss of the last tenth of the steps (each on fresh samples); None if it diverged."""
    if len(losses) < steps or not all(math.isfinite(v) for v in losses):
        return None
    return mean(losses[-max(1, steps // 10) :])


def learning_rates(sizes: Sizes, progress: Progress) -> dict:
    finals = {norm.key: {str(lr): [] for lr in sizes.lrs} for norm in AVAILABLE}
    curves: dict[str, list[list[float]]] = {norm.key: [] for norm in AVAILABLE}
    runs = grid(range(sizes.seeds), sizes.lrs, AVAILABLE)
    for seed, lr, norm in progress.runs("4 learning rates", ("seed", "lr", "norm"), runs):
        data = shape_task(sizes.lr_steps * sizes.batch, sizes.image, seed)
        torch.manual_seed(seed)
        model = classifier(norm, sizes, convs_per_block=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        losses = train_steps(model, optimizer, minibatches(*data, sizes.batch, seed=seed))
        finals[norm.key][str(lr)].append(final_loss(losses, sizes.lr_steps))
        if lr == REFERENCE_LR:
            curves[norm.key].append([round(v, 4) for v in losses])
    return {
        "steps": sizes.lr_steps,
        "batch": sizes.batch,
        "optimizer": "SGD, momentum 0.9",
        "final_loss": {
            key: {lr: summarise_losses(values) for lr, values in per.items()}
            for key, per in finals.items()
        },
        "reference_lr": REFERENCE_LR,
        "loss_curves": curves,
    }


def summarise_losses(values: list[float | None]) -> dict:
    finite = [v for v in values if v is not None]
    summary = spread(finite) if finite else {}
    return summary | {"diverged": len(values) - len(finite), "values": values}


# --------------------------------------------------------------------------------------------
# 5. Generative use: coupling through the batch, and contrast/brightness invariance.


@torch.no_grad()
def generator_dependence(norm: Norm, sizes: Sizes, seed: int) -> tuple[float, Tensor, Tensor]:
    """Sample 0 of a training-mode generator, for two batches that share only its noise vector."""
    torch.manual_seed(seed)
    net = generator(norm, sizes).train()
    z = torch.randn(sizes.generator_batch, 16, device=DEVICE)
    other = torch.cat([z[:1], torch.randn_like(z[1:])])
    first, second = net(z)[0, 0], net(other)[0, 0]
    return max_abs(first, second), first.cpu(), second.cpu()


@torch.no_grad()
def contrast_invariance(
    norm: Norm, sizes: Sizes, seed: int, training: bool, eps: float | None = None
) -> float:
    """max |f(a x + b) - f(x)| / max |f(x)|, each image of the batch with its own contrast
    a in [1/2, 2] and brightness b in [-1, 1]; BN's running statistics are set beforehand.
    ``eps`` replaces the norm layers' eps (default 1e-5)."""
    torch.manual_seed(seed)
    net = image_to_image(norm, sizes).train()
    for layer in net.modules():
        if eps is not None and hasattr(layer, "eps"):
            layer.eps = eps
    batch = sizes.generator_batch
    images, _ = shape_task(batch * (sizes.gap_warmup + 1), sizes.image, seed)
    *warmup, x = images.split(batch)
    for w in warmup:
        net(w)
    net.train(training)
    changed = jitter(x, torch.Generator().manual_seed(seed), math.log(2), 1.0)
    y = net(x)
    return max_abs(net(changed), y) / y.abs().max().item()


def generative(sizes: Sizes, progress: Progress) -> dict:
    dependence: dict[str, list[float]] = {norm.key: [] for norm in AVAILABLE}
    modes = {"train": (True, None), "eval": (False, None), "train, eps=1e-9": (True, 1e-9)}
    invariance = {norm.key: {mode: [] for mode in modes} for norm in AVAILABLE}
    examples: dict[str, dict[str, list]] = {}
    runs = grid(range(sizes.seeds), AVAILABLE)
    for seed, norm in progress.runs("5 generative", ("seed", "norm"), runs):
        value, first, second = generator_dependence(norm, sizes, seed)
        dependence[norm.key].append(value)
        examples.setdefault(norm.key, {"batch_a": rounded(first), "batch_b": rounded(second)})
        for mode, (training, eps) in modes.items():
            invariance[norm.key][mode].append(contrast_invariance(norm, sizes, seed, training, eps))
    return {
        "generator_batch": sizes.generator_batch,
        "sample_dependence_on_batch": {key: spread(v) for key, v in dependence.items()},
        "contrast_brightness_change": {
            key: {mode: spread(v) for mode, v in per.items()} for key, per in invariance.items()
        },
        "sample_0_seed_0": examples,
    }


def rounded(image: Tensor) -> list:
    return [[round(v, 5) for v in row] for row in image.tolist()]


# --------------------------------------------------------------------------------------------
# 6. Where IN hurts: labels carried by global intensity and contrast.


PADDINGS = ("zeros", "reflect")


def intensity(sizes: Sizes, progress: Progress) -> dict:
    """Zero padding (the default) lets a convolution see where the image ends, so brightness and
    contrast survive IN at the borders; reflection padding removes that route."""
    found = {padding: {norm.key: [] for norm in AVAILABLE} for padding in PADDINGS}
    runs = grid(range(sizes.seeds), PADDINGS, AVAILABLE)
    for seed, padding, norm in progress.runs("6 intensity task", ("seed", "padding", "norm"), runs):
        train = intensity_task(sizes.intensity_samples, sizes.image, seed)
        model = train_classifier(norm, sizes, train, sizes.batch, ADAM_LR, seed, padding=padding)
        test = intensity_task(sizes.test, sizes.image, test_seed(seed))
        found[padding][norm.key].append(accuracy(model, *test))
    return {
        "train_samples": sizes.intensity_samples,
        "chance": 1 / CLASSES,
        "accuracy": {
            padding: {key: spread(values) for key, values in per.items()}
            for padding, per in found.items()
        },
    }


EXPERIMENTS = (
    ("scope", scope),
    ("small_batches", small_batches),
    ("regularisation", regularisation),
    ("learning_rates", learning_rates),
    ("generative", generative),
    ("intensity_task", intensity),
)


# --------------------------------------------------------------------------------------------
# Plots: every one is drawn from results.json's content and labelled with the backend.


def measured(results: dict, table: dict) -> list[Norm]:
    """The norms present in one experiment's table, in the table order of NORMS."""
    return [norm for norm in NORMS if norm.key in table]


def figure(results: dict, **kwargs: object) -> plt.Figure:
    """A figure whose top line names the backend, the run and the seeds."""
    fig = plt.figure(layout="constrained", **kwargs)
    fig.suptitle(
        f"backend: {results['backend']} · {results['mode']} run · {results['seeds']} seed(s);"
        " bands and whiskers span min–max over seeds",
        fontsize=8,
        color="dimgray",
    )
    return fig


def save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(ax: plt.Axes, x: Sequence[float], stats: list[dict], norms: list[Norm], **kw) -> None:
    """Bars at the seeds' means with min–max whiskers, one colour per norm."""
    low = [s["mean"] - s["min"] for s in stats]
    high = [s["max"] - s["mean"] for s in stats]
    ax.bar(x, [s["mean"] for s in stats], color=[n.color for n in norms], yerr=[low, high],
           capsize=3, **kw)  # fmt: skip


def label_bars(ax: plt.Axes, x: Sequence[float], values: list[float]) -> None:
    for xi, value in zip(x, values, strict=True):
        text = "0 (bitwise)" if value == 0 else f"{value:.2g}"
        ax.annotate(text, (xi, value), ha="center", va="bottom", fontsize=6)


def plot_accuracy_vs_batch(results: dict, path: Path) -> None:
    table = results["small_batches"]["accuracy"]
    fig = figure(results, figsize=(6.4, 4.2))
    ax = fig.subplots()
    lowest = 1.0
    for norm in measured(results, table):
        batches = sorted(int(b) for b in table[norm.key])
        stats = [table[norm.key][str(b)] for b in batches]
        ax.plot(batches, [s["mean"] for s in stats], "o-", color=norm.color, label=norm.label)
        low, high = [s["min"] for s in stats], [s["max"] for s in stats]
        ax.fill_between(batches, low, high, color=norm.color, alpha=0.2)
        lowest = min(lowest, *low)
    ax.axhline(1 / CLASSES, ls=":", color="black", lw=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(
        xlabel=f"batch size ({results['small_batches']['train_samples']} training samples each)",
        ylabel="held-out accuracy (BN: running statistics)",
        title="Small batches: shape classifier",
        ylim=(min(0.2, lowest - 0.05), 1.02),
    )
    ax.legend(loc="lower center", ncols=5, fontsize=8)
    save(fig, path)


def smooth(values: list[float], window: int) -> list[float]:
    return [mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_losses(results: dict, path: Path) -> None:
    exp = results["learning_rates"]
    fig = figure(results, figsize=(11, 4.2))
    curves, sweep = fig.subplots(1, 2)
    for norm in measured(results, exp["loss_curves"]):
        for i, losses in enumerate(exp["loss_curves"][norm.key]):
            label = norm.label if i == 0 else None
            curves.plot(smooth(losses, 10), color=norm.color, alpha=0.8, lw=1, label=label)
        per_lr = exp["final_loss"][norm.key]
        trained = [(float(lr), s) for lr, s in per_lr.items() if "mean" in s]
        sweep.errorbar(
            [lr for lr, _ in trained],
            [s["mean"] for _, s in trained],
            yerr=[[s["mean"] - s["min"] for _, s in trained], [s["max"] - s["mean"] for _, s in trained]],
            fmt="o-", color=norm.color, capsize=3, label=norm.label,
        )  # fmt: skip
        for lr, s in per_lr.items():
            if s["diverged"]:
                sweep.annotate(f"{s['diverged']} diverged", (float(lr), math.log(CLASSES)),
                               color=norm.color, fontsize=7, rotation=90, va="bottom")  # fmt: skip
    curves.set(
        xlabel="SGD step",
        ylabel="training loss (fresh samples, 10-step mean)",
        title=f"Loss curves at lr = {exp['reference_lr']}",
    )
    curves.legend(fontsize=8)
    sweep.axhline(math.log(CLASSES), ls=":", color="black", lw=0.8, label="chance (ln 4)")
    sweep.set_xscale("log")
    sweep.set(
        xlabel="learning rate",
        ylabel=f"loss after {exp['steps']} steps",
        title="Loss after a fixed budget vs learning rate",
    )
    sweep.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, path)


def plot_generative(results: dict, path: Path) -> None:
    exp = results["generative"]
    dependence, change = exp["sample_dependence_on_batch"], exp["contrast_brightness_change"]
    norms = measured(results, dependence)
    fig = figure(results, figsize=(12, 6))
    left, right = fig.subfigures(1, 2, width_ratios=[1.2, 1])
    top, bottom = left.subplots(2, 1)
    x = list(range(len(norms)))
    values = [dependence[n.key]["max"] for n in norms]
    top.bar(x, values, color=[n.color for n in norms])
    label_bars(top, x, values)
    top.set_xticks(x, [n.label for n in norms])
    top.set_title(
        "Generator in training mode: max |change| of sample 0\n"
        f"when the other {exp['generator_batch'] - 1} noise vectors of its batch change",
        fontsize=9,
    )
    modes = list(change[norms[0].key])
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in x]
        values = [change[n.key][mode]["max"] for n in norms]
        alpha = 1.0 - 0.3 * k
        bottom.bar(xs, values, width, color=[n.color for n in norms], alpha=alpha, label=mode)
        label_bars(bottom, xs, values)
    bottom.set_yscale("log")
    bottom.set_xticks(x, [n.label for n in norms])
    bottom.set_title(
        "Image-to-image net: max |f(a·x + b) − f(x)| / max |f(x)|,\n"
        "each image with its own contrast a and brightness b",
        fontsize=9,
    )
    bottom.legend(fontsize=7, loc="lower right")
    draw_samples(right, exp["sample_0_seed_0"], norms)
    save(fig, path)


def draw_samples(fig: plt.Figure, samples: dict, norms: list[Norm]) -> None:
    """Sample 0 generated in two batches, and the difference (its colour scale: the largest)."""
    pairs = {
        n.key: (torch.tensor(samples[n.key]["batch_a"]), torch.tensor(samples[n.key]["batch_b"]))
        for n in norms
    }
    top = max((a - b).abs().max().item() for a, b in pairs.values()) or 1.0
    axes = fig.subplots(len(norms), 3, squeeze=False)
    for row, norm in zip(axes, norms, strict=True):
        a, b = pairs[norm.key]
        row[0].imshow(a, cmap="gray", vmin=-1, vmax=1)
        row[1].imshow(b, cmap="gray", vmin=-1, vmax=1)
        row[2].imshow((a - b).abs(), cmap="magma", vmin=0, vmax=top)
        row[0].set_ylabel(norm.label)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ("batch A", "batch B", f"|A − B| (0 to {top:.2g})"), strict=True):
        ax.set_title(title, fontsize=8)
    fig.suptitle("Sample 0, generated in two batches", fontsize=9)


def plot_regularisation_and_intensity(results: dict, path: Path) -> None:
    reg, task = results["regularisation"], results["intensity_task"]
    norms = measured(results, reg["accuracy"])
    fig = figure(results, figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    x = list(range(len(norms)))
    for offset, split, alpha in ((-0.2, "train", 1.0), (0.2, "test", 0.5)):
        stats = [reg["accuracy"][n.key][split] for n in norms]
        label = "train" if split == "train" else "held-out"
        bars(left, [i + offset for i in x], stats, norms, width=0.4, alpha=alpha, label=label)
    left.set_xticks(x, [n.label for n in norms])
    left.set(
        ylabel="accuracy",
        title=f"Regularisation: {reg['train_samples']} training samples, {reg['epochs']} epochs",
    )
    left.legend(fontsize=8, loc="lower left")
    for offset, (padding, alpha) in zip(
        (-0.2, 0.2), (("zeros", 1.0), ("reflect", 0.5)), strict=True
    ):
        stats = [task["accuracy"][padding][n.key] for n in norms]
        xs = [i + offset for i in x]
        bars(right, xs, stats, norms, width=0.4, alpha=alpha, label=f"{padding} padding")
    right.axhline(task["chance"], ls=":", color="black", lw=0.8, label="chance")
    right.set_xticks(x, [n.label for n in norms])
    right.set(ylabel="held-out accuracy", title="Where IN hurts: label = brightness × contrast")
    right.legend(fontsize=8, loc="lower left")
    save(fig, path)


PLOTS = {
    "accuracy_vs_batch_size.png": plot_accuracy_vs_batch,
    "loss_curves.png": plot_losses,
    "generative_dependence.png": plot_generative,
    "regularisation_and_intensity.png": plot_regularisation_and_intensity,
}


# --------------------------------------------------------------------------------------------
# results.md: each claim beside what was measured, and a verdict computed from the numbers.


def exact(value: float) -> str:
    return "0 (bitwise)" if value == 0 else f"{value:.3g}"


def pct(stat: dict) -> str:
    return fmt(stat, 1, percent=True).replace("%", "") + "%"


def listing(norms: Sequence[Norm], text: Callable[[Norm], str]) -> str:
    return "; ".join(f"{norm.label} {text(norm)}" for norm in norms)


def clearly_below(a: dict, b: dict) -> bool:
    """a's range over seeds lies entirely below b's."""
    return a["max"] < b["min"]


def compare(a: dict, b: dict, names: tuple[str, str]) -> str:
    """How a's seeds relate to b's: entirely below, entirely above, or overlapping."""
    if clearly_below(a, b):
        return f"{names[0]} < {names[1]} in every seed"
    if clearly_below(b, a):
        return f"{names[0]} > {names[1]} in every seed"
    return f"{names[0]} ≈ {names[1]} (within the seeds' spread)"


def row_batch_dependence(r: dict) -> tuple[str, str, str]:
    dep = r["batch_dependence"]
    norms = [n for n in NORMS if dep.get(n.key) is not None]
    independent = all(dep[n.key] == 0 for n in norms if n.key != "batch_norm")
    verdict = "confirmed" if dep["batch_norm"] > 0 and independent else "**not confirmed**"
    shape = "×".join(map(str, r["scope"]["input_shape"]))
    return (
        "A sample's output depends on the rest of the batch with BN, not with IN (or GN)",
        f"max \\|Δ sample 0\\| (training mode, input {shape}) when the other samples change: "
        + listing(norms, lambda n: exact(dep[n.key])),
        verdict,
    )


def row_train_eval_gap(r: dict) -> tuple[str, str, str]:
    gap = r["scope"]["bn_train_eval_gap"]
    means = [gap[b]["mean"] for b in gap]
    shrinks = all(x > y for x, y in itertools.pairwise(means))
    return (
        "BN normalises differently in training (batch statistics) and eval (running averages)",
        "mean \\|train − eval output\\| of a BN layer (unit-variance output): "
        + ", ".join(f"batch {b}: {fmt(s, 3)}" for b, s in gap.items()),
        "confirmed; the gap shrinks as the batch grows" if shrinks else "confirmed (gap > 0)",
    )


def accuracy_at(r: dict, batch: int) -> dict[str, dict]:
    table = r["small_batches"]["accuracy"]
    return {key: per[str(batch)] for key, per in table.items()}


def row_small_batches(r: dict) -> tuple[str, str, str]:
    batches = sorted(int(b) for b in r["small_batches"]["accuracy"]["batch_norm"])
    norms = measured(r, r["small_batches"]["accuracy"])
    smallest = accuracy_at(r, batches[0])
    rivals = [n for n in norms if n.key in ("instance_norm", "group_norm")]
    below = [n.label for n in rivals if clearly_below(smallest["batch_norm"], smallest[n.key])]
    if rivals and len(below) == len(rivals):
        verdict = (
            f"confirmed: at batch {batches[0]} BN is below {' and '.join(below)} in every seed"
        )
    elif below:
        verdict = f"partly: at batch {batches[0]} BN is below {' and '.join(below)} in every seed"
    else:
        verdict = f"**not confirmed** at batch {batches[0]} (BN not below IN/GN in every seed)"
    return (
        "BN degrades at small batches; IN and GN do not",
        "held-out accuracy, "
        + " vs ".join(
            f"batch {b}: " + listing(norms, lambda n, b=b: pct(accuracy_at(r, b)[n.key]))
            for b in (batches[0], batches[-1])
        ),
        verdict,
    )


def row_healthy_batches(r: dict) -> tuple[str, str, str]:
    batches = [int(b) for b in r["small_batches"]["accuracy"]["batch_norm"]]
    healthy = [b for b in batches if b >= 16] or batches[-1:]
    norms = measured(r, r["small_batches"]["accuracy"])
    best = {n.key: max(accuracy_at(r, b)[n.key]["mean"] for b in healthy) for n in norms}
    winner = max(norms, key=lambda n: best[n.key])
    return (
        "BN is the norm of choice for CNN classifiers at healthy batch sizes (≥ 16)",
        f"best mean held-out accuracy over batch sizes {healthy}: "
        + listing(norms, lambda n: f"{100 * best[n.key]:.1f}%"),
        "confirmed" if winner.key == "batch_norm" else f"**not confirmed**: {winner.label} is best",
    )


def row_online(r: dict) -> tuple[str, str, str]:
    checks = r["small_batches"]["online_batch_size_1"]
    norms = [n for n in NORMS if n.key in checks]
    table = r["small_batches"]["accuracy"]
    at_1 = {key: per["1"] for key, per in table.items() if "1" in per}

    def outcome(norm: Norm) -> str:
        parts = [
            f"{case}: {'trains' if result == 'trains' else result.split(':')[0]}"
            for case, result in checks[norm.key].items()
        ]
        return "(" + ", ".join(parts) + ")"

    raise_ = [n.label for n in norms if any(v != "trains" for v in checks[n.key].values())]
    trained = (
        "held-out accuracy after training at batch 1: "
        + listing(norms, lambda n: pct(at_1[n.key]))
        + "; "
        if at_1
        else ""
    )
    return (
        "Online learning (batch size 1) works with IN, not with BN",
        trained + listing(norms, outcome),
        "partly: all train on (1, C, H, W) maps, but BN's running statistics of single samples"
        " fail at evaluation (accuracy above); "
        + (f"{', '.join(raise_)} raise" if raise_ else "none raises")
        + " where one value per channel (BN) or per instance (IN) remains",
    )


def row_regularisation(r: dict) -> tuple[str, str, str]:
    acc = r["regularisation"]["accuracy"]
    norms = measured(r, acc)
    bn_gap = acc["batch_norm"]["gap"]
    others = [n for n in norms if n.key != "batch_norm"]
    smaller = [n.label for n in others if bn_gap["mean"] < acc[n.key]["gap"]["mean"]]
    clear = [n.label for n in others if clearly_below(bn_gap, acc[n.key]["gap"])]
    if len(clear) == len(others):
        verdict = "confirmed: BN's gap is the smallest in every seed"
    elif len(smaller) == len(others):
        verdict = "weakly: BN's gap is the smallest on average, within the seeds' spread"
    else:
        verdict = f"**not confirmed**: BN's gap is smaller only than {', '.join(smaller) or 'none'}"
    return (
        "BN regularises more (smaller train − held-out gap)",
        f"gap on {r['regularisation']['train_samples']} samples: "
        + listing(
            norms, lambda n: f"{pct(acc[n.key]['gap'])} (held-out {pct(acc[n.key]['test'])})"
        ),
        verdict,
    )


def usable_lrs(per_lr: dict) -> list[float]:
    """Learning rates at which no seed diverged and the loss fell below 80% of chance."""
    return [
        float(lr) for lr, s in per_lr.items()
        if not s["diverged"] and s["mean"] < 0.8 * math.log(CLASSES)
    ]  # fmt: skip


def row_learning_rates(r: dict) -> tuple[str, str, str]:
    exp = r["learning_rates"]
    norms = measured(r, exp["final_loss"])

    def best(norm: Norm) -> tuple[float, str]:
        per = exp["final_loss"][norm.key]
        lr = min((lr for lr in per if "mean" in per[lr]), key=lambda lr: per[lr]["mean"])
        return per[lr]["mean"], lr

    def summary(norm: Norm) -> str:
        usable = usable_lrs(exp["final_loss"][norm.key])
        loss, lr = best(norm)
        span = f"{min(usable):g}–{max(usable):g}" if usable else "none"
        return f"best {loss:.3f} at lr {lr}, lr that train: {span}"

    lowest = min(norms, key=lambda n: best(n)[0])
    top_lr = {n.label: max(usable_lrs(exp["final_loss"][n.key]), default=0.0) for n in norms}
    widest = [label for label, lr in top_lr.items() if lr == max(top_lr.values()) and lr > 0]
    verdict = f"lowest loss: {lowest.label}; largest lr that trains: {', '.join(widest) or 'none'}"
    confirmed = lowest.key == "batch_norm" and "BN" in widest
    return (
        "BN trains faster and tolerates larger learning rates",
        f"loss after {exp['steps']} SGD steps ({2 * r['sizes']['blocks']} conv layers): "
        + listing(norms, summary),
        ("confirmed: " if confirmed else "**not confirmed**: ") + verdict,
    )


def row_generator(r: dict) -> tuple[str, str, str]:
    dep = r["generative"]["sample_dependence_on_batch"]
    norms = measured(r, dep)
    coupled = dep["batch_norm"]["min"] > 0 and dep["instance_norm"]["max"] == 0
    return (
        "In a generator, BN couples the samples of a batch; IN does not",
        "max \\|Δ sample 0\\| when the batch's other noise vectors change (training mode): "
        + listing(norms, lambda n: exact(dep[n.key]["max"])),
        "confirmed" if coupled else "**not confirmed**",
    )


def row_invariance(r: dict) -> tuple[str, str, str]:
    change = r["generative"]["contrast_brightness_change"]
    norms = measured(r, change)
    tiny_eps = "train, eps=1e-9"
    up_to_eps = change["instance_norm"][tiny_eps]["max"] < 1e-4
    bn_varies = min(change["batch_norm"][m]["min"] for m in ("train", "eval")) > 1e-2
    return (
        "IN's output is invariant to each input's contrast and brightness (style transfer); BN's is not",
        "max relative change of the output, training / eval mode / training with eps = 1e-9: "
        + listing(norms, lambda n: " / ".join(f"{s['max']:.2g}" for s in change[n.key].values())),
        "confirmed: IN invariant up to its eps" if up_to_eps and bn_varies else "**not confirmed**",
    )


def row_intensity(r: dict) -> tuple[str, str, str]:
    acc = r["intensity_task"]["accuracy"]
    norms = measured(r, acc["zeros"])
    chance = r["intensity_task"]["chance"]

    def verdict(padding: str) -> str:
        return compare(acc[padding]["instance_norm"], acc[padding]["batch_norm"], ("IN", "BN"))

    def near_chance(padding: str) -> bool:
        return acc[padding]["instance_norm"]["max"] < chance + 0.1

    if near_chance("zeros"):
        conclusion = "confirmed: IN near chance"
    elif near_chance("reflect"):
        conclusion = (
            "partly: with zero padding the image border leaks intensity past IN; with"
            " reflection padding IN is near chance"
        )
    else:
        conclusion = "**not confirmed**: IN learns the task with either padding"
    return (
        "IN hurts when the label lies in global intensity or contrast",
        f"held-out accuracy (chance {100 * chance:.0f}%), zero padding: "
        + listing(norms, lambda n: pct(acc["zeros"][n.key]))
        + "; reflection padding: "
        + listing(norms, lambda n: pct(acc["reflect"][n.key])),
        f"{conclusion} (zero padding: {verdict('zeros')}; reflection: {verdict('reflect')})",
    )


ROWS = (
    row_batch_dependence,
    row_train_eval_gap,
    row_small_batches,
    row_healthy_batches,
    row_online,
    row_regularisation,
    row_learning_rates,
    row_generator,
    row_invariance,
    row_intensity,
)


def claims_table(results: dict) -> str:
    lines = ["| claim | measured | verdict |", "|---|---|---|"]
    lines += ["| " + " | ".join(row(results)) + " |" for row in ROWS]
    return "\n".join(lines)


def batch_size_table(results: dict) -> str:
    table = results["small_batches"]["accuracy"]
    norms = measured(results, table)
    batches = list(table["batch_norm"])
    lines = ["| batch size | " + " | ".join(n.label for n in norms) + " |"]
    lines.append("|---" * (len(norms) + 1) + "|")
    lines += [f"| {b} | " + " | ".join(pct(table[n.key][b]) for n in norms) + " |" for b in batches]
    return "\n".join(lines)


def learning_rate_table(results: dict) -> str:
    table = results["learning_rates"]["final_loss"]
    norms = measured(results, table)

    def cell(s: dict) -> str:
        text = fmt(s, 3) if "mean" in s else "—"
        return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")

    lines = ["| lr | " + " | ".join(n.label for n in norms) + " |"]
    lines.append("|---" * (len(norms) + 1) + "|")
    lines += [
        f"| {lr} | " + " | ".join(cell(table[n.key][lr]) for n in norms) + " |"
        for lr in table["batch_norm"]
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    gn = "included" if results["norms"]["group_norm"] != GN_MISSING else GN_MISSING
    return f"""# BatchNorm vs InstanceNorm (vs GroupNorm), measured

Produced by `python examples/bn_vs_in.py{" --quick" if results["mode"] == "quick" else ""}`
({results["mode"]} run, {results["elapsed_s"]:.0f} s).
Backend: **{results["backend"]}** (torch {results["torch"]}, {results["device"]}).
Seeds: {results["seeds"]}; values are "mean [min–max]" over seeds, or the maximum over seeds for
the batch-dependence figures. GroupNorm: {gn}.
{"**Quick run: sizes far too small for conclusions; it only exercises the code.**" if results["mode"] == "quick" else ""}

{claims_table(results)}

## Held-out accuracy by batch size

Shape classifier ({results["sizes"]["blocks"]} conv blocks), {results["small_batches"]["train_samples"]} training samples
at every batch size, Adam with lr 2e-3·sqrt(batch/8) clipped to [5e-4, 1e-2].

{batch_size_table(results)}

![accuracy vs batch size](accuracy_vs_batch_size.png)

## Loss after a fixed budget, by learning rate

{learning_rate_table(results)}

![loss curves](loss_curves.png)

## Generative use, regularisation, intensity task

![generative dependence](generative_dependence.png)

![regularisation and intensity](regularisation_and_intensity.png)
"""


# --------------------------------------------------------------------------------------------
# Main.


def backend() -> str:
    sample = torch.zeros(2, 2, 2, 2, device=DEVICE)
    if sample.is_cuda:
        return "Triton kernels on CUDA"
    return "Triton interpreter on CPU" if runs_triton(sample) else "torch fallback on CPU"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes and one seed; without CUDA through the Triton interpreter",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--replot", action="store_true",
        help="only redraw the plots and results.md from OUT/results.json",
    )  # fmt: skip
    return parser.parse_args()


def run_study(sizes: Sizes, progress: Progress, quick: bool) -> dict:
    results = {
        "backend": backend(),
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "mode": "quick" if quick else "full",
        "seeds": sizes.seeds,
        "norms": {n.key: n.label if n.layer else GN_MISSING for n in NORMS},
        "sizes": asdict(sizes),
    }
    for name, experiment in EXPERIMENTS:
        results[name] = experiment(sizes, progress)
    results["batch_dependence"] = results["scope"]["batch_dependence"]
    results["elapsed_s"] = round(progress.elapsed(), 1)
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    progress = Progress()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if args.replot:
        results = json.loads(path.read_text())
    else:
        results = run_study(QUICK_SIZES if args.quick else FULL, progress, args.quick)
        path.write_text(json.dumps(results, indent=1) + "\n")
    for name, plot in PLOTS.items():
        plot(results, args.out / name)
    (args.out / "results.md").write_text(markdown(results))
    print(f"[{progress.elapsed():6.0f}s] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
