"""Accuracy and per-trial throughput of one real training run (``drcapsnet.train.train``) on an IDX folder.

What one search trial does, without Ray or MLflow: load the data onto the device, train, validate every epoch, test
once at the end. Prints every epoch's validation accuracy and training images/s (the data path included, unlike
``train_throughput.py``), then the held-out test accuracy. With only ``t10k-*`` files in the folder (the real MNIST
test set), ``drcapsnet.data`` splits it 7,000 train / 1,000 validation / 2,000 test, seeded and stratified:

    python benchmarks/mnist_accuracy.py --data-dir ../shared/data/mnist-test --preset paper --epochs 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drcapsnet.config import DataConfig, TrainConfig, model_preset  # noqa: E402
from drcapsnet.data import load_datasets  # noqa: E402
from drcapsnet.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a folder of train-*/t10k-* IDX files")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1.0e-3)
    parser.add_argument("--lr-decay", type=float, default=0.96, help="per epoch (the paper's Adam schedule)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data_cfg = DataConfig(dataset="idx", data_dir=args.data_dir, batch_size=args.batch_size)
    train_cfg = TrainConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, lr_decay=args.lr_decay,
                            momentum=args.momentum, device=args.device, seed=args.seed)
    data = load_datasets(data_cfg)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}; {args.preset} preset, {args.optimizer} lr {args.lr:g} decay "
          f"{args.lr_decay:g}, batch {args.batch_size}; train/val/test = {len(data.train.labels)}/"
          f"{len(data.val.labels)}/{len(data.test.labels)}")

    def report(m: dict[str, float]) -> None:
        val = m.get("val_acc", float("nan"))
        print(f"  epoch {int(m['epoch']):3d}  train_acc {m['train_acc']:.4f}  val_acc {val:.4f}"
              f"  {m['images_per_s']:8.0f} img/s  {m['epoch_s']:6.2f} s", flush=True)

    t0 = time.perf_counter()
    final = train(model_preset(args.preset), data_cfg, train_cfg, report, datasets=data)
    print(f"test_acc {final['test_acc']:.4f} (error {100 * (1 - final['test_acc']):.2f}%), best val_acc "
          f"{final['best_val_acc']:.4f}, {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
