"""Image-to-image on the default MNIST model; prints one JSON object (and writes it with --out).

SDEdit: held-out test digits are edited towards another class, (label + 5) mod 10, at each
strength; the evaluation classifier (the one mode=evaluate measures with) says how many edits read
as the target class and how many still as the source, and the edits' distance to their source is
measured in pixels (RMS, in [0, 1] units) and in the evaluation classifier's (standardised)
features. Inpainting: the right half of each digit is masked and regenerated conditioned on the
source class; the completions are read as the source class far more often than samples drawn
without the visible half (the same model, random labels), and the masked inputs themselves (the
hidden half black) are the reference for what the visible half alone tells the classifier.

The model is the one `python run.py` trains, taken from the artifact cache (`--cache`, with
train.reuse_other_code=true, so a model trained by an earlier version of the code is used); when
there is none, a shorter one is trained first (`--train-steps`). Usage:

    python benchmarks/editing.py --cache /tmp/bench_cache --out benchmarks/results/editing_mnist.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="/tmp/bench_cache", help="the artifact cache (paths.cache_dir)")
    parser.add_argument("--num-images", type=int, default=200, help="test digits edited per case")
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    parser.add_argument("--resample", type=int, default=2, help="RePaint's U for the resampled inpainting case")
    parser.add_argument("--train-steps", type=int, default=600, help="steps of the model trained when none is cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from difflab.api import _compose
    from difflab.artifacts import ArtifactCache, diffusion_settings
    from difflab.data import load_split, to_model_range
    from difflab.diffusion.editing import start_step
    from difflab.edit import EditInputs, edit_images, edit_nfe
    from difflab.evaluate.feature_classifier import feature_classifier
    from difflab.sampling import sample_images, sampler_steps
    from difflab.trained import load_diffusion_model

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    common = [f"paths.cache_dir={args.cache}", "train.reuse_other_code=true", "device=cpu", "sample.gif=false"]
    cfg = _compose(common)
    cache = ArtifactCache(cfg.paths.cache_dir)
    entry, trained_here = cache.find("diffusion", diffusion_settings(cfg), other_code=True), None
    if entry is None:  # no default model: a shorter one (its own cache entry)
        trained_here = [f"train.max_steps={args.train_steps}"]
        proc = subprocess.run([sys.executable, str(REPO / "run.py"), *common, *trained_here, "sample.num_images=0",
                               "eval.num_samples=0", "train.progress=false", "hydra.run.dir=/tmp/editing_bench_train"],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        cfg = _compose([*common, *trained_here])
        entry = cache.find("diffusion", diffusion_settings(cfg), other_code=True)
    model = load_diffusion_model(str(entry.path), device)
    judge = feature_classifier(cfg, device)

    test = load_split(cfg.dataset, "test", cfg.paths.cache_dir)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.num_images]
    source, source_labels = test.images[pick], test.labels[pick]
    targets = (source_labels + 5) % 10

    @torch.no_grad()
    def read(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = zip(*(judge.net(to_model_range(b).to(device)) for b in images.split(500)))
        return torch.cat(features).cpu(), torch.cat(logits).argmax(1).cpu()

    source_features, source_read = read(source)
    steps = sampler_steps(model.process, cfg.sampler)

    def edit(strength: float, labels: torch.Tensor, masks=None, resample: int = 1) -> tuple[dict, torch.Tensor]:
        run = OmegaConf.merge(cfg, {"edit": {"strength": strength, "labels": labels.tolist(), "resample": resample}})
        t0 = time.perf_counter()
        out = edit_images(model, run, EditInputs(source, masks, None), device)
        features, predicted = read(out.images)
        pixels = ((out.images.float() - source.float()) / 255).flatten(1)
        taken = steps - start_step(steps, strength)
        return {"strength": strength, "steps_taken": taken,
                "nfe": edit_nfe(cfg.sampler.name, taken, resample if masks is not None else 1),
                "pixel_rms_to_source": float(pixels.pow(2).mean(1).sqrt().mean()),
                "feature_distance_to_source": float((features - source_features).norm(dim=1).mean()),
                "read_as_target": float((predicted == labels).float().mean()),
                "read_as_source": float((predicted == source_labels).float().mean()),
                "seconds": round(time.perf_counter() - t0, 1)}, out.images

    sdedit = []
    for strength in args.strengths.split(","):
        sdedit.append(edit(float(strength), targets)[0])
        print(json.dumps(sdedit[-1]), file=sys.stderr, flush=True)

    mask = torch.zeros_like(source[:, :1], dtype=torch.float32)
    mask[..., source.shape[-1] // 2:] = 1  # regenerate the right half
    masked = torch.where(mask.bool(), torch.zeros_like(source), source)  # the hidden half black (background)
    inpainting = {
        "masked_inputs_read_as_source": float((read(masked)[1] == source_labels).float().mean()),
        "inpainted": edit(1.0, source_labels, mask)[0],
        "inpainted_resampled": {**edit(1.0, source_labels, mask, args.resample)[0], "resample": args.resample},
        "inpainted_with_another_label": edit(1.0, targets, mask)[0],
    }
    random_labels = torch.randint(0, 10, (args.num_images,), generator=torch.Generator().manual_seed(1))
    samples = sample_images(model, cfg, args.num_images, random_labels.tolist(), device)
    inpainting["samples_read_as_source"] = float((read(samples.images)[1] == source_labels).float().mean())

    result = {
        "what": "SDEdit strength sweep and half-digit inpainting on the default MNIST model "
                "(benchmarks/editing.py)",
        "date": time.strftime("%Y-%m-%d"),
        "model": str(entry.path), "model_settings": "python run.py defaults" if trained_here is None
        else " ".join(trained_here),
        "sampler": f"{cfg.sampler.name}, {steps} steps", "num_images": args.num_images,
        "evaluation_classifier_test_accuracy": judge.test_accuracy,
        "source_read_as_source": float((source_read == source_labels).float().mean()),
        "sdedit_target": "(source label + 5) mod 10",
        "sdedit": sdedit,
        "inpainting": {"mask": "right half (columns 14-27) regenerated, conditioned on the source label", **inpainting},
        "threads": args.threads,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
