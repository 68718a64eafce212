"""A reference for the recipe study: the same backbone as the CPU recipe trained *with labels*
for the same number of steps and images, monitored by the same online k-NN. Self-distillation
cannot be expected to beat this at the same budget, so it tells what a +10-point target asks of
the architecture at 1,200 steps.

    PYTHONPATH=. python studies/small-scale/supervised_reference.py [OUT_DIR]

Recipe: tiny-cpu's backbone (4 blocks of ViT-Tiny width, patch 4, 32 px), a linear classifier
on the [CLS] token, cross-entropy, AdamW (peak LR 5e-4 at batch 64 after 100 warm-up steps,
cosine to 0, weight decay 0.05), 1,200 steps of 64 CIFAR-10 training images with a random
crop (4 px padding) and a flip, bf16 autocast as in the study. The teacher-less k-NN of the
backbone (k = 20, 5,000-image bank, 2,000 test images, the study's monitor) at step 0 and every
200 steps goes to OUT_DIR/metrics.jsonl in the study's format, so plot.py can draw it.
``CIFAR10`` names the .npz folder (default ../shared/data/cifar10) and ``STUDY_DATA`` its
prepared shards (default data/cifar10); with SMOKE=1 (tests/test_scripts.py) it runs 4 steps.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attmask.config import load_config
from attmask.models.vit import build_backbone
from attmask.monitor import OnlineKnn
from attmask.train import open_dataset

SMOKE = os.environ.get("SMOKE") == "1"
STEPS, EVERY, BATCH, PEAK_LR, WARMUP = (4, 2, 8, 5e-4, 1) if SMOKE else (1200, 200, 64, 5e-4, 100)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_train(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [np.load(p) for p in sorted(folder.glob("train_*.npz"))]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels).long()


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32 px crop of the 4 px zero-padded image, random horizontal flip, normalised."""
    padded = F.pad(images.float() / 255, (4, 4, 4, 4))
    out = torch.empty(images.shape[0], 3, 32, 32)
    for i, (dy, dx) in enumerate(torch.randint(0, 9, (images.shape[0], 2), generator=g)):
        crop = padded[i, :, dy:dy + 32, dx:dx + 32]
        out[i] = crop.flip(-1) if torch.rand(1, generator=g) < 0.5 else crop
    return (out - MEAN) / STD


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study/SUP-supervised")
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny-cpu", overrides=[
        f"data.path={os.environ.get('STUDY_DATA', 'data/cifar10')}",
        f"train.knn_train_samples={40 if SMOKE else 5000}",
        f"train.knn_test_samples={20 if SMOKE else 2000}", "train.knn_every_epochs=1"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model)
    classifier = torch.nn.Linear(backbone.embed_dim, 10)
    params = list(backbone.parameters()) + list(classifier.parameters())
    optim = torch.optim.AdamW(params, lr=PEAK_LR, weight_decay=0.05)
    images, labels = load_train(Path(os.environ.get("CIFAR10", "../shared/data/cifar10")))
    monitor = OnlineKnn(open_dataset(cfg), cfg)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)
    log = (out / "metrics.jsonl").open("w")
    log.write(json.dumps({"step": 0, "train_s": 0.0, **monitor(backbone)}) + "\n")
    train_s = 0.0
    for step in range(1, STEPS + 1):
        tick = time.perf_counter()
        idx = order[torch.arange((step - 1) * BATCH, step * BATCH) % len(order)]
        lr = PEAK_LR * (step / WARMUP if step <= WARMUP else
                        0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))))
        for group in optim.param_groups:
            group["lr"] = lr
        backbone.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = classifier(backbone.forward_tokens(augment(images[idx], g)).cls)
        loss = F.cross_entropy(logits.float(), labels[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
        train_s += time.perf_counter() - tick
        if step % EVERY == 0:
            backbone.eval()
            knn = monitor(backbone)
            log.write(json.dumps({"step": step, "train_s": train_s, "loss": loss.item(), **knn})
                      + "\n")
            log.flush()
            print(f"step {step}: loss {loss.item():.3f} k-NN {100 * knn['knn_top1']:.1f} % "
                  f"({train_s / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
