"""Do the project's metrics see what they are asked to measure? Prints one JSON object and draws
benchmarks/results/metric_sensitivity_<data set>.png.

For each feature design of the evaluation classifier (feature_classifier.NETWORK and the others
in DESIGNS), ladders of known degradations of real training images (none of them in the
reference set) and, with a trained model, of sampling steps:

    noise   Gaussian noise of sigma 0, 0.02, 0.05, 0.1, 0.2 (pixel range [0, 1])
    blur    Gaussian blur of sigma 0, 0.5, 1, 1.5, 2 pixels
    imbalance   share of images from the first half of the classes: 0.5 ... 0.9
    dropped     classes left out (their share drawn from the others): 0, 1, 2, 3, 5
    steps   the model's samples (the run's sampler) at 100, 50, 20, 10, 5 steps

Each rung's FD, KID, precision, recall (and class accuracy) with their standard errors, as
metrics.json records them, at each sample count n (the reference is the first n of evaluate's
seeded reference pick). A metric is fit for purpose on a ladder when it moves monotonically down
the ladder and neighbouring rungs differ by more than twice their combined standard error at
n = 2000. Usage:

    python benchmarks/metric_sensitivity.py [--dataset mnist] [--sizes 500,2000,10000] \
        [--designs multi,last,layer] [--steps-model] [--step-samples 2000]

--steps-model takes the default run's model of the data set from the artifact cache (run
`python run.py dataset=...` first).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.transforms.functional import gaussian_blur  # noqa: E402

DESIGNS = {  # name -> the classifier's network settings; "multi" is feature_classifier.NETWORK
    "multi": {"width": 32, "features": "multi", "norm": "standard", "low_level_weight": 0.5},
    "multi_unweighted": {"width": 32, "features": "multi", "norm": "standard", "low_level_weight": 1.0},
    "last": {"width": 32, "features": "last", "norm": "standard"},
    "layer": {"width": 32, "features": "last", "norm": "layer"},  # the earlier design
}
LADDERS = {"noise": [0.0, 0.02, 0.05, 0.1, 0.2], "blur": [0.0, 0.5, 1.0, 1.5, 2.0],
           "imbalance": [0.5, 0.6, 0.7, 0.8, 0.9], "dropped": [0, 1, 2, 3, 5]}
STEPS = [100, 50, 20, 10, 5]
WORSE_IS_HIGHER = {"fd": True, "kid": True, "precision": False, "recall": False, "class_accuracy": False,
                   "class_share_tv": True}
SEPARATION_N = 2000
POOL_SEED = 3


def add_noise(images: Tensor, sigma: float, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255 + sigma * torch.randn(images.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def blur(images: Tensor, sigma: float) -> Tensor:
    if sigma == 0:
        return images
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images.float(), [size, size], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def class_draw(labels: Tensor, n: int, weights: Tensor, seed: int = 0) -> Tensor:
    """Indices of n images whose classes follow `weights` (one per class), without replacement."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    picked = []
    for c in range(len(weights)):
        want = int((classes == c).sum())
        have = (labels == c).nonzero().flatten()
        picked.append(have[torch.randperm(len(have), generator=g)[:want]])
    picked = torch.cat(picked)
    return picked[torch.randperm(len(picked), generator=g)]  # so the first n of them are a draw of n too


def imbalance_weights(num_classes: int, share: float) -> Tensor:
    half = num_classes // 2
    return torch.tensor([share / half] * half + [(1 - share) / (num_classes - half)] * (num_classes - half))


def dropped_weights(num_classes: int, dropped: int) -> Tensor:
    return torch.tensor([0.0] * dropped + [1.0] * (num_classes - dropped))


def fit_for_purpose(values: list[float], errors: list[float], worse_is_higher: bool) -> dict:
    """Monotone down the ladder, and each neighbouring pair of rungs apart by > 2 combined errors."""
    sign = 1 if worse_is_higher else -1
    steps = [sign * (b - a) for a, b in zip(values, values[1:])]
    apart = [abs(b - a) > 2 * math.hypot(ea, eb) for a, b, ea, eb in zip(values, values[1:], errors, errors[1:])]
    return {"monotone": all(s > 0 for s in steps), "separated": all(apart),
            "fit": all(s > 0 for s in steps) and all(apart)}


def rung_metrics(features: dict, reference: dict, layers: dict, kind: str, bootstrap: int,
                 expected: Tensor | None) -> dict:
    """The rung's metrics under short names (fd, kid, precision, recall, class_accuracy, class_share_tv) with their
    standard errors, as metrics.json gets them."""
    from difflab.evaluate.metrics import KEYS, SE, metrics_from_features
    from difflab.evaluate.uncertainty import share_standard_error

    raw = metrics_from_features(features, reference, layers, kind, bootstrap)
    keys = KEYS[kind]
    names = {"fd": keys["frechet_inception_distance"], "kid": keys["kernel_inception_distance_mean"],
             "precision": keys["precision"], "recall": keys["recall"]}
    out = {short: raw[name] for short, name in names.items()} | {short + SE: raw[name + SE] for short, name in names.items()}
    if "logits" in features:
        from difflab.evaluate.class_shares import class_share_distance

        k = features["logits"].shape[1]
        out["class_share_tv"], out["class_share_tv_se"] = class_share_distance(
            features["logits"].argmax(1), reference["logits"].argmax(1), k, bootstrap)
    if "logits" in features and expected is not None:
        acc = float((features["logits"].argmax(1) == expected).float().mean())
        out |= {"class_accuracy": acc, "class_accuracy_se": share_standard_error(acc, len(expected))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--sizes", default="500,2000,10000")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--steps-model", action="store_true")
    parser.add_argument("--step-samples", type=int, default=2000)
    parser.add_argument("--step-samples-file", default="", help="keep the steps ladder's samples here and reuse them")
    parser.add_argument("--bootstrap", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    parser.add_argument("--png", default="")
    parser.add_argument("--inception-weights", default="",
                        help="torch-fidelity's Inception weights file: adds Inception FID's ladders as design 'inception'")
    args = parser.parse_args()

    from cached_model import cached_model, run_config

    from difflab.evaluate.extractors import FeatureExtraction, classifier_extractor, inception_extractor, metric_layers
    from difflab.evaluate.feature_classifier import feature_classifier, real_splits
    from difflab.evaluate.metrics import REFERENCE_SEED
    from difflab.sampling import sample_images

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = run_config(f"dataset={args.dataset}", *args.overrides.split())
    train, held_out = real_splits(cfg, 10_000)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(REFERENCE_SEED))
    reference_images, pool = train.images[perm[:max(sizes)]], perm[max(sizes):]
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(POOL_SEED))]
    pool_images, pool_labels = train.images[pool], train.labels[pool]
    k = train.num_classes
    top = max(sizes)

    rungs: dict[str, list[tuple[object, Tensor, Tensor | None]]] = {}  # ladder -> [(rung, images, labels)]
    base, base_labels = pool_images[:top], pool_labels[:top]
    rungs["noise"] = [(s, add_noise(base, s), base_labels) for s in LADDERS["noise"]]
    rungs["blur"] = [(s, blur(base, s), base_labels) for s in LADDERS["blur"]]
    for name, weights in (("imbalance", imbalance_weights), ("dropped", dropped_weights)):
        rungs[name] = []
        for rung in LADDERS[name]:
            idx = class_draw(pool_labels, top, weights(k, rung))
            rungs[name].append((rung, pool_images[idx], pool_labels[idx]))
    rungs["test split"] = [("test", held_out.images, held_out.labels)]
    timings = {}
    saved = Path(args.step_samples_file) if args.step_samples_file else None
    if args.steps_model and saved is not None and saved.is_file():  # an earlier run's samples
        stored = torch.load(saved, weights_only=True)
        rungs["steps"] = [(steps, stored[str(steps)]["images"], stored[str(steps)]["labels"]) for steps in STEPS]
    elif args.steps_model:
        model, _ = cached_model(cfg, device)
        rungs["steps"] = []
        for steps in STEPS:
            scfg = run_config(f"dataset={args.dataset}", f"sampler.steps={steps}", *args.overrides.split())
            t0 = time.perf_counter()
            result = sample_images(model, scfg, args.step_samples, "balanced", device)
            timings[f"sample_{steps}_steps_s"] = time.perf_counter() - t0
            order = torch.randperm(len(result.images), generator=torch.Generator().manual_seed(POOL_SEED))
            labels = None if result.labels is None else result.labels[order]
            rungs["steps"].append((steps, result.images[order], labels))  # so its first n are a draw of n too
            print(f"sampled {args.step_samples} at {steps} steps in {timings[f'sample_{steps}_steps_s']:.0f} s",
                  file=sys.stderr)
        if saved is not None:
            torch.save({str(steps): {"images": images, "labels": labels} for steps, images, labels in rungs["steps"]},
                       saved)

    report = {"dataset": args.dataset, "sizes": sizes, "bootstrap": args.bootstrap, "designs": {}, "timings": timings,
              "rule": f"fit: monotone along the ladder and neighbouring rungs > 2 combined SE apart at n={SEPARATION_N}"}
    designs = args.designs.split(",") + (["inception"] if args.inception_weights else [])
    for design in designs:
        t0 = time.perf_counter()
        if design == "inception":
            extractor, kind, about = inception_extractor(Path(args.inception_weights)), "inception", {}
            extract = FeatureExtraction(extractor, ["2048"], device, 100)
        else:
            classifier = feature_classifier(cfg, device, DESIGNS[design])
            extractor, kind = classifier_extractor(classifier.path, classifier.key), "classifier"
            about = {"classifier_test_accuracy": classifier.test_accuracy}
            extract = FeatureExtraction(extractor, ["features", "logits"], device, 500)
        layers = metric_layers(extractor, ["fid", "kid", "prc"])
        reference = extract(reference_images)
        out = {**about, "feature_dim": reference[layers["fid"]].shape[1], "ladders": {}}
        for ladder, items in rungs.items():
            entries = []
            for rung, images, labels in items:
                feats = extract(images[:top])  # the held-out split may hold more than the largest n
                per_n = {}
                for n in sizes:
                    if n > len(images):
                        continue
                    ref = {key: value[:n] for key, value in reference.items()}
                    mine = {key: value[:n] for key, value in feats.items()}
                    per_n[str(n)] = rung_metrics(mine, ref, layers, kind, args.bootstrap,
                                                 None if labels is None else labels[:n])
                entries.append({"rung": rung, "n": per_n})
            verdicts = {}
            if len(entries) > 1 and all(str(SEPARATION_N) in e["n"] for e in entries):
                for metric, higher in WORSE_IS_HIGHER.items():
                    at = [e["n"][str(SEPARATION_N)] for e in entries]
                    if metric in at[0]:
                        verdicts[metric] = fit_for_purpose([a[metric] for a in at], [a[f"{metric}_se"] for a in at],
                                                           higher)
            out["ladders"][ladder] = {"rungs": entries, "fit": verdicts}
            print(f"{design} {ladder}: " + ", ".join(
                f"{e['rung']}: fd {e['n'].get(str(SEPARATION_N), e['n'][max(e['n'], key=int)])['fd']:.3g}"
                for e in entries) + f" {verdicts.get('fd', '')}", file=sys.stderr)
        out["seconds"] = time.perf_counter() - t0
        report["designs"][design] = out
    print(json.dumps(report, indent=1))
    if args.png:
        draw(report, Path(args.png))


def draw(report: dict, path: Path) -> None:
    """One panel per ladder: FD at n = 2000 relative to the ladder's first rung, with its error,
    one line per design."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladders = [name for name, v in next(iter(report["designs"].values()))["ladders"].items() if len(v["rungs"]) > 1]
    fig, axes = plt.subplots(1, len(ladders), figsize=(3.2 * len(ladders), 3.2), squeeze=False)
    for ax, ladder in zip(axes[0], ladders):
        for design, out in report["designs"].items():
            if ladder not in out["ladders"]:
                continue
            rungs = out["ladders"][ladder]["rungs"]
            at = [r["n"].get(str(SEPARATION_N)) for r in rungs]
            if any(a is None for a in at):
                continue
            first = at[0]["fd"]
            ax.errorbar(range(len(at)), [a["fd"] / first for a in at], yerr=[2 * a["fd_se"] / first for a in at],
                        label=design, capsize=3, marker="o")
        ax.set_xticks(range(len(rungs)), [str(r["rung"]) for r in rungs])
        ax.set_title(ladder)
        ax.set_yscale("log")
        ax.set_ylabel("FD / first rung's (±2 SE)")
    axes[0][0].legend()
    fig.suptitle(f"{report['dataset']}: FD along each degradation ladder, n={SEPARATION_N}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
