"""The export folder: a trained diffusion model as files anyone can load, with no pickle in them and no run folder
around them (a training checkpoint is pickled torch state, which only `weights_only` loading keeps safe, and it
carries the optimizer and histories a user of the model never needs).

    model.safetensors        the checkpoint's EMA weights, under the checkpoint's own names
    autoencoder.safetensors  the autoencoder of a latent model
    config.json              the resolved training config, the meta that rebuilds the network (shape, classes,
                             label dropout), the latent space's settings and scale, and the sha256 of each weights file
    README.md                the model card: data set, objective, network, training, the run's metrics, how to load

Reading one back gives the parts of a checkpoint that sampling reads, so a checkpoint and its export build their model
with the same code (trained.diffusion_model_from_state) and sample the same images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from difflab.artifacts import Artifact, file_digest
from difflab.checkpoint import atomic_write, atomic_write_json, atomic_write_text
from difflab.config import objective_name
from difflab.errors import UserError
from difflab.record import read_metrics, run_checkpoint
from difflab.trained import dims, load_diffusion_state, network_weights
from difflab.version import __version__

EXPORT_FORMAT = 1  # the layout of config.json and the files beside it
CONFIG = "config.json"
MODEL = "model.safetensors"
AUTOENCODER = "autoencoder.safetensors"
CARD = "README.md"


def _json(path: Path) -> dict:
    """A JSON object file's content; {} when it is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _export_info(folder: Path) -> Optional[dict]:
    """An export's config.json, or None when the folder holds none (a file of that name that is not an export's
    counts as none: it is the user's)."""
    info = _json(folder / CONFIG)
    return info if "difflab_export" in info else None


def is_export(path: Path) -> bool:
    return path.is_dir() and _export_info(path) is not None


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a user names by itself or by its run folder."""
    path = path.expanduser()
    if path.is_dir():
        found = run_checkpoint(path)
        if found is None:
            raise UserError(f"{path} is a folder with neither checkpoints/last.pt nor a metrics.json naming a "
                            "checkpoint: give a diffusion run's folder, its checkpoints/last.pt, or an export folder.")
        return found
    return path


def read_model_state(given: str | Path, given_name: str = "ckpt") -> tuple[dict, Path]:
    """The diffusion model's state a user names by a checkpoint, its run folder or an export folder (read with no
    pickle), and the file or folder it came from."""
    path = Path(given).expanduser()
    if is_export(path):
        return read_export(path), path.resolve()
    checkpoint = find_checkpoint(path)
    return load_diffusion_state(checkpoint, given_name), checkpoint.resolve()


def given_model_artifact(path: Path) -> Artifact:
    """A model read_model_state found, keyed by its content (an export's config.json holds the sha256 of each of its
    weights files)."""
    return Artifact(path, f"file-{file_digest(path / CONFIG if path.is_dir() else path)}", "given", {})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _training_metrics(given: Path, checkpoint: Path) -> dict:
    """What the run that made the model recorded: the metrics.json of the run folder given, of the run whose
    checkpoints/ holds the checkpoint, or of the run the artifact cache's record.json names; else that record's own
    training metrics; {} when none of them is there."""
    cache_record = _json(checkpoint.parent / "record.json") if checkpoint.name == "model.pt" else {}
    runs = [given] if given.is_dir() else []
    runs += [checkpoint.parent.parent] if checkpoint.parent.name == "checkpoints" else []
    runs += [Path(cache_record["run_dir"])] if cache_record.get("run_dir") else []
    for run_dir in runs:
        metrics = read_metrics(run_dir)
        if metrics:
            return metrics
    return cache_record.get("metrics", {})


def _check_out(out: Path) -> Optional[dict]:
    """The earlier export in `out` that this one replaces (None for a new or empty folder); a folder of other files is
    refused, so an export never mixes into, or deletes, a user's own files."""
    if out.is_file():
        raise UserError(f"out={out} is a file: name a folder for the export.")
    earlier = _export_info(out) if out.is_dir() else None
    if out.is_dir() and earlier is None and any(out.iterdir()):
        raise UserError(f"out={out} already holds files and no earlier export: name a new or empty folder.")
    return earlier


def write_export(source: Path, out: Path) -> Path:
    """Export the diffusion model of `source` (a checkpoint or a run folder) into `out`. An earlier export there is
    overwritten file by file, each file atomically; config.json, written after the weights, holds their sha256, so an
    export interrupted halfway is refused when loaded rather than read as a mix of two models."""
    if is_export(source.expanduser()):
        raise UserError(f"{source} is an export already: copy the folder, or export the checkpoint it came from.")
    checkpoint = find_checkpoint(source)
    state = load_diffusion_state(checkpoint)
    earlier = _check_out(out)
    files = {MODEL: save_tensors(_contiguous(state["ema"]["model"]))}
    autoencoder = state.get("autoencoder")
    if autoencoder:
        files[AUTOENCODER] = save_tensors(_contiguous(autoencoder["weights"]))
    for name, data in files.items():
        atomic_write(out / name, lambda f, data=data: f.write(data))
    for stale in set((earlier or {}).get("files", {})) - set(files):  # the earlier export's own, e.g. its autoencoder
        (out / stale).unlink(missing_ok=True)
    info = {"difflab_export": EXPORT_FORMAT, "difflab": __version__, "stage": state["stage"],
            "step": state.get("step"), "config": state["config"], "meta": state["meta"],
            "autoencoder": {k: v for k, v in autoencoder.items() if k != "weights"} if autoencoder else None,
            "files": {name: _sha256(data) for name, data in files.items()},
            "checkpoint": str(checkpoint.resolve())}
    atomic_write_json(out / CONFIG, info)
    atomic_write_text(out / CARD, model_card(info, state, _training_metrics(source.expanduser(), checkpoint), out))
    return out


def _contiguous(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def read_export(folder: Path) -> dict:
    """The checkpoint parts the export in `folder` (see is_export) holds: config, stage, meta, EMA weights and
    autoencoder, read from JSON and safetensors alone, each weights file checked against its sha256 in config.json."""
    info = _export_info(folder)
    if info["difflab_export"] > EXPORT_FORMAT:
        raise UserError(f"The export {folder} has format {info['difflab_export']}, newer than the {EXPORT_FORMAT} "
                        "this difflab reads: upgrade difflab to load it.")
    weights = {name: _read_weights(folder, name, digest) for name, digest in info["files"].items()}
    autoencoder = info["autoencoder"]
    return {"config": info["config"], "stage": info["stage"], "meta": info["meta"], "step": info["step"],
            "ema": {"model": weights[MODEL]},
            "autoencoder": {**autoencoder, "weights": weights[AUTOENCODER]} if autoencoder else None}


def _read_weights(folder: Path, name: str, digest: str) -> dict[str, Tensor]:
    try:
        data = (folder / name).read_bytes()
    except OSError:
        raise UserError(f"The export {folder} lacks {name}: export the model again.") from None
    if _sha256(data) != digest:
        raise UserError(f"The export {folder} is damaged or half-written ({name} is not the file its config.json "
                        "records): export the model again.")
    return load_tensors(data)


# ---------------------------------------------------------------- the model card

def _objective(cfg: DictConfig) -> str:
    name = objective_name(cfg)
    if name == "ddpm":
        s = cfg.schedule
        return f"ddpm ({cfg.objective.prediction} prediction, {s.name} schedule over T={s.T} steps)"
    return name


def _space(info: dict) -> str:
    ae = info["autoencoder"]
    if ae is None:
        return "pixel space"
    return (f"latent space of a {ae['config']['name']} autoencoder: {dims(info['meta']['shape'])} latents of "
            f"{dims(ae['image_shape'])} images, scaled by {ae['latent_scale']:.4g}")


def _conditioning(meta: dict) -> str:
    if not meta["num_classes"]:
        return "unconditional"
    if meta["label_dropout"] > 0:
        return (f"{meta['num_classes']} classes, labels dropped with p={meta['label_dropout']:g} in training: "
                "classifier-free guidance works (`sample(..., guidance_scale=1.5)`)")
    return f"{meta['num_classes']} classes"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_rows(metrics: dict) -> list[str]:
    """The numbers the run recorded, each beside its standard error; timings, which say how fast the machine was
    rather than how good the model is, are left out."""
    rows = []
    for key, value in sorted(metrics.items()):
        if _number(value) and not key.endswith(("_se", "_std", "_s", "_seconds")):
            se = metrics.get(f"{key}_se")
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
            rows.append(f"| {key} | {shown}" + (f" ± {se:.2g}" if _number(se) else "") + " |")
    return rows


def _measured(metrics: dict) -> str:
    e = metrics.get("eval")
    if not isinstance(e, dict):
        return ""
    return (f" The evaluation drew {e.get('num_samples')} samples with sampler={e.get('sampler')} "
            f"({e.get('sampler_steps')} steps), guidance={e.get('guidance')}; reference: {e.get('reference')}.")


def model_card(info: dict, state: dict, metrics: dict, out: Path) -> str:
    cfg, meta = OmegaConf.create(info["config"]), info["meta"]
    data, train = cfg.dataset, cfg.train
    parameters = sum(t.numel() for t in network_weights(state, "unet").values())
    rows = [("data set", f"{data.name}: {dims((data.channels, data.image_size, data.image_size))} images"),
            ("objective", _objective(cfg)),
            ("network", f"unet={cfg.unet.name}, {parameters:,} parameters (EMA weights, decay {train.ema.decay:g})"),
            ("space", _space(info)),
            ("conditioning", _conditioning(meta)),
            ("training", f"mode={info['stage']}, {info['step']} steps of batch {train.batch_size}, lr {train.lr:g}, "
                         f"seed {cfg.seed}")]
    files = f"`{MODEL}` (the EMA weights), " + (f"`{AUTOENCODER}`, " if info["autoencoder"] else "")
    lines = [f"# {objective_name(cfg)} diffusion model of {data.name}", "",
             f"Exported by difflab {__version__}. Files: {files}`{CONFIG}` (the training config and "
             "what rebuilding the network needs); no file here is a pickle.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    shown = _metric_rows(metrics)
    if shown:
        lines += ["## Metrics", "", "From the training run's metrics.json." + _measured(metrics), "",
                  "| metric | value |", "|---|---|", *shown, ""]
    lines += ["## Use", "", "```python", "import difflab", "", f"pipe = difflab.load({str(out)!r})",
              "samples = pipe.sample(16)  # samples.images: uint8 N,C,H,W; samples.labels", "samples.to_pil()[0]",
              "```", ""]
    return "\n".join(lines)
