"""Sample quality against sampler steps for the default MNIST model; prints one JSON object.

The model is the one `python run.py` trains (taken from the artifact cache; run that first).
Each case samples `n` images with its sampler and measures them as `mode=evaluate` does (the
same evaluate_model): FD/KID with the evaluation classifier, class accuracy, and FID/KID/IS/PR
with Inception when its weights are at hand. Usage:

    python benchmarks/sampler_quality.py [--cases ddim:50:1000,dpmpp_2m:20:1000:logsnr,...] [--threads 1]
    python benchmarks/sampler_quality.py --nfe 5,10,20 --samplers ddim,heun,dpmpp_2m,unipc \
        --spacings trailing,karras,logsnr --num-samples 2000   # the {sampler x spacing} table at equal NFE

A case is sampler:steps:num_samples[:spacing] (steps "all" = every one of the schedule's T steps;
no spacing = the objective's usual). Each row records its network evaluations per sample (nfe).
The model and its guidance are the ones `python run.py` trains and samples (guidance=auto decided
as the plan decides it); `--overrides compress.quantize=bf16` samples at that precision, as
mode=evaluate does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# The table at one sample count. On a shared 2-core CPU sampling runs at ~50-200
# image-steps/s, so ddpm:all:1000 alone takes hours: pass fewer samples there (see results/).
DEFAULT_CASES = ("dpmpp_2m:10:1000,dpmpp_2m:20:1000,ddim:10:1000,ddim:20:1000,ddim:50:1000,ddim:100:1000,"
                 "ddpm:all:1000")


def steps_for_nfe(sampler: str, evaluations: int) -> int:
    """The steps that cost `evaluations` network evaluations (Heun: 2 steps - 1, rounded up)."""
    return (evaluations + 2) // 2 if sampler == "heun" else evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    parser.add_argument("--nfe", default="", help="instead of --cases: these NFE for each sampler and spacing")
    parser.add_argument("--samplers", default="ddim,heun,dpmpp_2m,unipc")
    parser.add_argument("--spacings", default="trailing,karras,logsnr")
    parser.add_argument("--num-samples", type=int, default=2000)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.nfe:
        cases = [f"{s}:{steps_for_nfe(s, int(n))}:{args.num_samples}:{sp}" for n in args.nfe.split(",")
                 for s in args.samplers.split(",") for sp in args.spacings.split(",")]

    import torch
    from cached_model import cached_model, run_config

    from difflab.compress.quantize import quantize_model
    from difflab.diffusion import nfe
    from difflab.evaluate.metrics import evaluate_model
    from difflab.sampling import sample_images, sampler_steps

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results = []
    for case in cases:
        sampler, steps, n, *spacing = case.split(":")
        cfg = run_config(f"sampler={sampler}", f"sampler.steps={'null' if steps == 'all' else steps}",
                         f"eval.num_samples={n}", *(f"sampler.spacing={sp}" for sp in spacing), *args.overrides.split())
        model, path = cached_model(cfg, device)
        quantized = quantize_model(model, cfg, device) if cfg.compress.quantize else {}
        t0 = time.perf_counter()
        metrics = evaluate_model(model, cfg, device, path,
                                 lambda k: sample_images(model, cfg, k, "balanced", device))
        about = metrics.pop("eval")
        taken = sampler_steps(model.process, cfg.sampler)
        row = {"sampler": sampler, "steps": steps, "spacing": cfg.sampler.spacing, "nfe": nfe(sampler, taken),
               "num_samples": int(n), "guidance": cfg.guidance.name, **quantized, **metrics,
               "wall_s": time.perf_counter() - t0, "extractors": about["extractors"]}
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one case per line
        results.append(row)
    print(json.dumps({"model": path, "threads": args.threads, "device": "cpu", "results": results}, indent=2))


if __name__ == "__main__":
    main()
