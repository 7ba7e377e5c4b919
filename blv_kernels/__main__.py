"""``python -m blv_kernels`` / ``blv-kernels``: a short demo of the BLV loss and its gradient."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import __version__, class_weights
from .loss import BACKENDS, blv_cross_entropy

# GTA5 pixel counts of the 19 Cityscapes classes (BLV_SPEC.md section 7), a long-tailed prior.
DEMO_COUNTS = (
    16099193283, 4155428633, 8478285320, 925367586, 317481282, 531401266, 67288808, 40463971, 3810296251,
    1074861777, 6784666433, 181828023, 15321782, 1259269812, 564950248, 184638969, 32522117, 15799033, 2718199,
)  # fmt: skip


def demo(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    n, c, h, w = args.batch, len(DEMO_COUNTS), args.height, args.width
    logits = torch.randn(n, c, h, w, device=device, requires_grad=True)
    target = torch.randint(0, c, (n, h, w), device=device, dtype=torch.uint8)
    target[:, : h // 8] = 255  # a band of ignored pixels, as in Cityscapes' void label

    start = time.perf_counter()
    loss = blv_cross_entropy(logits, target, DEMO_COUNTS, sigma=args.sigma, ignore_index=255, backend=args.backend)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    plain = F.cross_entropy(logits.detach(), target.long(), ignore_index=255)
    w = class_weights(DEMO_COUNTS)

    print(f"blv_kernels {__version__} on {device} (torch {torch.__version__})")
    print(f"logits {tuple(logits.shape)} float32, uint8 labels with {(target == 255).float().mean():.1%} ignored")
    print(f"class weights w_c from GTA5 counts: min {w.min():.3f} (road), max {w.max():.3f} (bicycle)")
    print(f"BLV loss (sigma={args.sigma}, backend={args.backend}): {loss.item():.5f}; plain cross-entropy: {plain:.5f}")
    print(
        f"gradient: shape {tuple(logits.grad.shape)}, norm {logits.grad.norm():.5f}; forward+backward {elapsed * 1e3:.1f} ms"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="blv-kernels", description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--sigma", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    demo(parser.parse_args(argv))


if __name__ == "__main__":
    main()
