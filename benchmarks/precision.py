"""Numeric precision on CUDA: bf16 autocast (``train.bf16: true``, the default) vs fp32 vs TF32, side by side.

Full training steps of one preset at several batch sizes; for each, the three settings run one after the other in
the same process, twice, and the ratios are against bf16. "fp32" turns TF32 off for matmuls and cuDNN convolutions;
"tf32" turns it on for both (PyTorch's own default is TF32 convolutions, fp32 matmuls):

    python benchmarks/precision.py                      # paper preset, batch 128 and 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drcapsnet.config import model_preset  # noqa: E402
from drcapsnet.losses import capsnet_loss  # noqa: E402
from drcapsnet.model import CapsNet  # noqa: E402

SETTINGS = {"bf16": (True, False), "fp32": (False, False), "tf32": (False, True)}   # (autocast, allow TF32)


def measure(preset: str, batch: int, bf16: bool, tf32: bool, steps: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = model_preset(preset)
    torch.manual_seed(0)
    model = CapsNet(cfg).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device="cuda")
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, y)
        loss = capsnet_loss(out.lengths.float(), out.reconstruction, x, y, cfg.reconstruction_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(15):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("precision: needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.preset} preset, {args.steps} steps")
    print(f"  {'batch':>5s} {'run':>3s} " + " ".join(f"{k + ' img/s':>11s}" for k in SETTINGS)
          + " " + " ".join(f"{k + ' vs bf16':>13s}" for k in list(SETTINGS)[1:]))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for rep in range(args.repeats):
            r = {k: measure(args.preset, batch, *v, args.steps) for k, v in SETTINGS.items()}
            print(f"  {batch:5d} {rep + 1:3d} " + " ".join(f"{v:11.0f}" for v in r.values()) + " "
                  + " ".join(f"{r[k] / r['bf16']:12.2f}x" for k in list(SETTINGS)[1:]), flush=True)


if __name__ == "__main__":
    main()
