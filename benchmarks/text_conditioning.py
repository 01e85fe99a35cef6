"""Text-conditional MNIST against the class-conditional model at the same budget: the share of
samples the evaluation classifier reads as the digit the prompt (or label) names; prints one JSON object.

Two `python run.py` trainings of the default recipe with guidance=cfg (the same network, objective,
steps and batch): conditioning=text (captions from dataset.captions.templates, the learned encoder)
and the default conditioning=class. Then, in this process, each model samples --per-digit images of
every digit with classifier-free guidance at --scale: the text model once per seen template and
once per held-out template (never a training caption), the class model by label; the data set's
evaluation classifier (the one fd_classifier uses) reads every sample. Usage:

    python benchmarks/text_conditioning.py [--steps 1500] [--per-digit 20] [--scale 1.5] \\
        [--held-out "an image of the number {word}"] [--overrides "..."] [--out /tmp/text_conditioning] \\
        [--trained TEXT_RUN CLASS_RUN]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from difflab.data.captions import class_fields
from difflab.evaluate.feature_classifier import accuracy, feature_classifier
from difflab.sampling import sample_images
from difflab.trained import load_diffusion_model

REPO = Path(__file__).resolve().parents[1]
DIGITS = 10


def train(name: str, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, str(REPO / "run.py"), "dataset=mnist", "guidance=cfg", "eval.num_samples=0",
               "sample.num_images=0", "train.progress=false", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed: {done.stderr.strip().splitlines()[-3:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return metrics


def read_as(model, cfg, classifier, n_per_digit: int, prompts_of=None) -> float:
    """Share of samples read as their digit: by prompt (prompts_of(digit)) or by label."""
    digits = torch.arange(DIGITS).repeat_interleave(n_per_digit)
    if prompts_of is None:
        result = sample_images(model, cfg, len(digits), [int(d) for d in digits], torch.device("cpu"))
    else:
        result = sample_images(model, cfg, len(digits), "balanced", torch.device("cpu"),
                               prompts=[prompts_of(int(d)) for d in digits])
    return accuracy(classifier.net, result.images, digits, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--held-out", default="an image of the number {word}")
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    parser.add_argument("--out", type=Path, default=Path("/tmp/difflab_text_conditioning"))
    parser.add_argument("--trained", type=Path, nargs=2, metavar=("TEXT_RUN", "CLASS_RUN"),
                        help="run folders of the two trainings, already made with these settings: measure only")
    args = parser.parse_args()
    common = [f"train.max_steps={args.steps}", *args.overrides.split()]
    if args.trained:
        trained = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in zip(("text", "class"), args.trained)}
    else:
        trained = {"text": train("text", args.out / "text", ["conditioning=text", *common]),
                   "class": train("class", args.out / "class", common)}
    text = load_diffusion_model(trained["text"]["checkpoint"], torch.device("cpu"))
    label = load_diffusion_model(trained["class"]["checkpoint"], torch.device("cpu"))
    cfg = OmegaConf.merge(text.cfg, {"guidance": {"name": "cfg", "scale": args.scale},
                                     "sample": {"batch_size": 250, "gif_images": 0}})
    classifier = feature_classifier(cfg, torch.device("cpu"))  # trains it when not cached: with gradients
    torch.set_grad_enabled(False)
    fields = class_fields(cfg.dataset)
    seen = list(cfg.dataset.captions.templates)
    start = time.perf_counter()
    by_template = {t: read_as(text, cfg, classifier, args.per_digit, lambda d, t=t: t.format(**fields[d])) for t in seen}
    held_out = read_as(text, cfg, classifier, args.per_digit, lambda d: args.held_out.format(**fields[d]))
    class_model = read_as(label, OmegaConf.merge(label.cfg, {"guidance": cfg.guidance, "sample": cfg.sample}),
                          classifier, args.per_digit)
    print(json.dumps({
        "steps": args.steps, "overrides": args.overrides, "samples_per_digit": args.per_digit, "cfg_scale": args.scale,
        "sampler": OmegaConf.to_container(cfg.sampler), "evaluation_classifier_test_accuracy": classifier.test_accuracy,
        "text": {"seen_templates": by_template, "seen_mean": sum(by_template.values()) / len(by_template),
                 "held_out_template": {args.held_out: held_out},
                 "train_wall_time_s": trained["text"]["train_wall_time_s"], "num_params": trained["text"]["num_params"],
                 "final_loss": trained["text"]["final_loss"]},
        "class": {"read_as_label": class_model, "train_wall_time_s": trained["class"]["train_wall_time_s"],
                  "num_params": trained["class"]["num_params"], "final_loss": trained["class"]["final_loss"]},
        "sampling_and_reading_s": time.perf_counter() - start,
    }, indent=2))


if __name__ == "__main__":
    main()
