"""What tells a run from its siblings, for the trackers: the settings that become TensorBoard's
HParams columns (the swept ones and a few key ones, as the resolved config has them, never
paths), the run's name made of its swept settings, and its sweep folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from difflab.trackers import RunName

GROUPS = ("dataset", "autoencoder", "unet", "objective", "schedule", "sampler", "guidance", "mode")  # named by .name
KEY_SETTINGS = ("mode", "dataset", "autoencoder", "unet", "objective", "schedule", "sampler", "sampler.steps",
                "guidance", "guidance.scale", "train.max_steps", "train.batch_size", "train.lr", "train.ema.decay",
                "seed")
# Where a run's files are, or how it is run: never a column, nor a part of a run's name.
NOT_SETTINGS = ("paths", "ckpt", "hydra", "logger", "dataset.root", "train.resume", "train.init_from", "dry_run",
                "device", "train.progress", "train.threads", "sweep")


def _value(text: str) -> float | str | bool:
    """Override values arrive as text; numbers and booleans become filterable numbers."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def overrides_to_hparams(overrides: list[str]) -> dict:
    """`key=value` command-line overrides (not hydra.*) as an hparams dict."""
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: _value(v) for k, v in pairs if not k.startswith("hydra")}


def _is_setting(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_SETTINGS)


def setting(cfg: DictConfig, key: str):
    """A setting as the resolved config has it; a group by its option's name."""
    value = OmegaConf.select(cfg, f"{key}.name" if key in GROUPS else key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _path_like(value) -> bool:
    return isinstance(value, str) and (os.sep in value or value.startswith("~"))


def run_hparams(cfg: DictConfig, swept: list[str]) -> dict:
    """The HParams columns: the swept settings first, then the key ones (the schedule only where
    objective=ddpm reads it), resolved; none that is, or holds, a path."""
    keys = [k for k in dict.fromkeys([*swept, *KEY_SETTINGS]) if _is_setting(k)]
    if setting(cfg, "objective") != "ddpm" and "schedule" not in swept:
        keys.remove("schedule")
    values = {k: setting(cfg, k) for k in keys}
    return {k: v for k, v in values.items() if not _path_like(v)}


def _override_keys(lines: list[str], sweeps_only: bool) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(lines)
    return [o.key_or_group.lstrip("+~") for o in parsed if o.is_sweep_override() or not sweeps_only]


def swept_keys() -> tuple[list[str], Optional[Path]]:
    """The settings this Hydra job sweeps and its sweep folder: in a multirun, those given with
    sweep syntax on the sweep's command line (kept in its multirun.yaml) or in
    hydra.sweeper.params (a named sweep); in a single run, its command-line settings, and None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return [], None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return [k for k in _override_keys(list(hydra_cfg.overrides.task), False) if _is_setting(k)], None
    sweep_dir = Path(hydra_cfg.sweep.dir)
    keys = list((hydra_cfg.sweeper.get("params") or {}).keys())
    recorded = sweep_dir / "multirun.yaml"
    if recorded.is_file():
        keys += _override_keys(list(OmegaConf.load(recorded).hydra.overrides.task), True)
    keys = list(dict.fromkeys(k for k in keys if _is_setting(k)))
    return keys or [k for k in _override_keys(list(hydra_cfg.overrides.task), False) if _is_setting(k)], sweep_dir


def run_identity(cfg: DictConfig, run_dir: Path) -> tuple[RunName, dict]:
    """The run as the trackers name it, and its HParams columns."""
    swept, sweep_dir = swept_keys()
    hparams = run_hparams(cfg, swept)
    named = [f"{k}={hparams[k]:g}" if isinstance(hparams.get(k), float) else f"{k}={hparams.get(k)}"
             for k in swept if k in hparams]
    name = ",".join(named).replace("/", "_") if named else run_dir.name
    return RunName(run_dir, bounded_name(name), sweep_dir), hparams


MAX_NAME = 120  # characters: a tracker's folder is named by the run (file systems stop at 255 bytes)


def bounded_name(name: str) -> str:
    """The name, or when too long its start and a hash of the whole, so distinct runs stay distinct."""
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return name.encode()[:MAX_NAME - 10].decode(errors="ignore") + "~" + digest
