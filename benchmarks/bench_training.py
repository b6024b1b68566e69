"""Training throughput of each deep model: fp32 (NCHW) against the fast path (channels_last + bf16 autocast).

For each model it times full training steps (forward, loss, backward, AdamW step) on random data,
estimates the step's FLOPs as 3x the forward FLOPs counted by ``torch.utils.flop_counter``, and sets the achieved rate beside the
matrix-multiply rate measured in the same run (fp32 and bf16 GEMM, the practical peak of this CPU).

    python benchmarks/bench_training.py                       # resnet18, efficientnet_lite0, cnn_two_conv at 128 px
    python benchmarks/bench_training.py --models resnet18 --size 64 --out bench.json

Timings on a shared machine are noisy: run it when the machine is otherwise idle and repeat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medpipe.models.factory import build_classifier

MODES = {"fp32": (False, False), "bf16+channels_last": (True, True)}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def train_step_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """3x the counted forward FLOPs (forward + backward for inputs and weights).

    Counting the backward pass directly overcounts grouped (depthwise) convolutions in torch's
    ``FlopCounterMode``, which made EfficientNet appear to exceed the machine's peak.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops()


def bench_model(arch: str, size: int, batch: int, steps: int, classes: int = 3) -> dict:
    spec = {"arch": arch, "num_classes": classes, "input_size": size, "weights": "none"}
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    flops = train_step_flops(build_classifier(spec, pretrained=False).eval(), x) / batch
    out = {"model": arch, "size": size, "batch": batch, "gflop_per_image": flops / 1e9}
    for mode, (bf16, channels_last) in MODES.items():
        torch.manual_seed(0)
        model = build_classifier(spec, pretrained=False).train()
        xb = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up: oneDNN picks its kernels
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        ips = steps * batch / (time.perf_counter() - start)
        out[mode] = {"images_per_second": ips, "gflops": ips * flops / 1e9}
    out["speedup"] = out["bf16+channels_last"]["images_per_second"] / out["fp32"]["images_per_second"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_lite0", "cnn_two_conv"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; matmul 2048^2: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    results = []
    header = f"{'model':20} {'px':>4} {'GFLOP/img':>9} {'fp32 img/s':>10} {'fast img/s':>10} {'speedup':>7} " \
             f"{'fast GFLOP/s':>12} {'% bf16 peak':>11}"
    print(header)
    for arch in args.models:
        r = bench_model(arch, args.size, args.batch_size, args.steps)
        r["share_of_bf16_matmul"] = r["bf16+channels_last"]["gflops"] / peak["bf16"]
        results.append(r)
        print(f"{arch:20} {args.size:>4} {r['gflop_per_image']:>9.2f} {r['fp32']['images_per_second']:>10.1f} "
              f"{r['bf16+channels_last']['images_per_second']:>10.1f} {r['speedup']:>6.2f}x "
              f"{r['bf16+channels_last']['gflops']:>12.1f} {100 * r['share_of_bf16_matmul']:>10.1f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"matmul_gflops": peak, "threads": torch.get_num_threads(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
