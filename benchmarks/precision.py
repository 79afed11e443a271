"""Numeric precision on CUDA: bf16 autocast (``train.bf16: true``, the default) vs fp32 vs TF32, side by side.

Full training steps of one preset at several batch sizes; for each, the three settings run one after the other in
the same process, twice, and the ratios are against bf16. "fp32" turns TF32 off for matmuls and cuDNN convolutions;
"tf32" turns it on for both (PyTorch's own default is TF32 convolutions, fp32 matmuls):

    python benchmarks/precision.py                      # paper preset, batch 128 and 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.steps import images_per_s, require_cuda, training_step  # noqa: E402
from drcapsnet.config import model_preset  # noqa: E402

SETTINGS = {"bf16": (True, False), "fp32": (False, False), "tf32": (False, True)}   # (autocast, allow TF32)


def measure(preset: str, batch: int, bf16: bool, tf32: bool, steps: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    device = torch.device("cuda")
    return images_per_s(training_step(model_preset(preset), device, batch, bf16), device, batch, steps, warmup=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    require_cuda("precision")
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
