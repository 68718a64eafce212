"""Gain over init of each evaluated run, on the first 1,000 test images and on all of them.

Usage: PYTHONPATH=. python studies/small-scale/test_images.py OUT_DIR
OUT_DIR holds one ``evaluate --suite knn --baselines init`` output per run, named
``<strategy>-s<seed>``. Prints, per strategy, the k-NN top-1 gain over the untrained network
of each seed, its mean with the 95 % Student-t interval over seeds, and the split of the
seed-to-seed spread into the test images' sampling and the training runs; then the same for
each AttMask strategy minus random masking, paired by seed.
"""
import json
import math
import statistics
import sys
from pathlib import Path

from attmask.eval.results import decode_hits
from attmask.eval.stats import paired_hits, split_spread, t_quantile


def summary(label: str, per_seed: list) -> str:
    gains = [100 * d.mean for d in per_seed]
    line = f"{label}: " + " ".join(f"{g:+.2f}" for g in gains)
    if len(gains) > 1:
        mean, sd = statistics.fmean(gains), statistics.stdev(gains)
        half = t_quantile(0.95, len(gains) - 1) * sd / math.sqrt(len(gains))
        spread = split_spread(per_seed)
        line += (f"; mean {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}], spread {sd:.2f}"
                 f" (test images {100 * spread.test_images:.2f}, training runs "
                 f"{100 * spread.training:.2f}, in quadrature)")
    return line


runs: dict[str, dict[int, tuple]] = {}
for path in sorted(Path(sys.argv[1]).glob("*/results.json")):
    results = json.loads(path.read_text())
    strategy, seed = path.parent.name.rsplit("-s", 1)
    runs.setdefault(strategy, {})[int(seed)] = (
        decode_hits(results["knn"]["k20"])[0],
        decode_hits(results["baselines"]["init"]["knn"]["k20"])[0])
for first in (1000, None):
    print(f"k-NN top-1 (k = 20), {'the first 1,000' if first else 'all'} test images, points")
    for strategy, seeds in runs.items():
        print("  gain over init, " + summary(strategy, [paired_hits(t[:first], i[:first])
                                                         for _, (t, i) in sorted(seeds.items())]))
    for strategy, seeds in runs.items():
        if strategy != "random" and "random" in runs:
            ref = runs["random"]
            pairs = [paired_hits(t[:first], ref[s][0][:first])
                     for s, (t, _) in sorted(seeds.items()) if s in ref]
            print(f"  paired, {summary(f'{strategy} - random', pairs)}")
