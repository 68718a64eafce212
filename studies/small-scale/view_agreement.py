"""How much two augmented views of one CIFAR-10 image agree for the teacher, per augmentation.

Self-distillation asks the student to predict, from one view, the prototype the teacher gives
another view of the same image. If the teacher's choice for two views of one image is barely
more alike than for two different images, its targets say little about the image. This script
measures that for the untrained `tiny-cpu` network (the teacher at step 0), or for a trained
one, on 256 CIFAR-10 training images: two global views (32 px, crop scale 0.35-1, flip) with
each colour setting, the teacher's [CLS] logits centred by the batch mean (as the centre does),
then the share of images whose two views have the same arg-max prototype ("other": the same
with the second view of the next image, the chance level) and the mean cosine of the centred
logits.

    PYTHONPATH=. python studies/small-scale/view_agreement.py [CHECKPOINT.pt]

``CIFAR10`` names the .npz folder (default ../shared/data/cifar10); with SMOKE=1
(tests/test_scripts.py) it reads 16 images.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torchvision.transforms import v2

from attmask.config import from_dict, load_config
from attmask.data.transforms import _finish
from attmask.engine import build_net
from attmask.runtime import load_checkpoint

CIFAR = Path(os.environ.get("CIFAR10", Path(__file__).resolve().parents[3] / "shared" / "data"
                            / "cifar10")) / "train_00.npz"
IMAGES = 16 if os.environ.get("SMOKE") == "1" else 256


def jitter(b: float, c: float, s: float, h: float, p: float) -> v2.Transform:
    return v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=p)


SETTINGS = {
    "crop + flip only": [],
    "DINO colour: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2": [
        jitter(0.4, 0.4, 0.2, 0.1, 0.8), v2.RandomGrayscale(0.2)],
    "DINO jitter, no grey": [jitter(0.4, 0.4, 0.2, 0.1, 0.8)],
    "jitter without hue, grey 0.2": [jitter(0.4, 0.4, 0.2, 0.0, 0.8), v2.RandomGrayscale(0.2)],
    "half: jitter (0.2, 0.2, 0.1, 0.05) p 0.8, grey 0.1": [
        jitter(0.2, 0.2, 0.1, 0.05, 0.8), v2.RandomGrayscale(0.1)],
    "hue 0.1 only": [jitter(0.0, 0.0, 0.0, 0.1, 0.8)],
}


def main(checkpoint: str | None) -> None:
    if not CIFAR.is_file():
        sys.exit(f"error: {CIFAR} not found (the shared CIFAR-10 copy)")
    torch.set_num_threads(1)
    state = load_checkpoint(checkpoint) if checkpoint else None
    # a checkpoint brings its run's architecture; without one, the tiny-cpu network of seed 0
    cfg = from_dict(yaml.safe_load(state["config"])) if state else load_config("tiny-cpu")
    torch.manual_seed(0)
    net = build_net(cfg.model, drop_path=0.0).eval()
    if state:
        net.load_state_dict(state["teacher"])
    images = torch.from_numpy(np.load(CIFAR)["images"][:IMAGES]).permute(0, 3, 1, 2).contiguous()
    print(f"teacher: {checkpoint or 'untrained (tiny-cpu, seed 0)'}; {IMAGES} CIFAR-10 train images")
    for name, colour in SETTINGS.items():
        view = v2.Compose([v2.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), *colour, _finish()])
        torch.manual_seed(1)
        with torch.no_grad():
            z1, z2 = (net(torch.stack([view(x) for x in images]), patch_logits=False)[0]
                      for _ in range(2))
        centre = torch.cat([z1, z2]).mean(0)
        z1, z2 = z1 - centre, z2 - centre
        same = (z1.argmax(1) == z2.argmax(1)).float().mean()
        other = (z1.argmax(1) == z2.roll(1, 0).argmax(1)).float().mean()
        cos = F.cosine_similarity(z1, z2).mean()
        print(f"{name:55s} same image {same:.2f} (other image {other:.2f}), cosine {cos:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
