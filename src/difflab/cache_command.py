"""`difflab cache list` and `difflab cache prune --older-than 30d`: what the artifact cache and the
feature cache hold, how much room they take, and a way to free it that runs in progress survive
(see ArtifactCache.prune). The cache folder is the runs' own `paths.cache_dir` (DIFFLAB_CACHE, else
~/.cache/difflab), or `paths.cache_dir=DIR` given as in a run."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime
from pathlib import Path

from difflab.artifacts import ArtifactCache, StoredEntry
from difflab.errors import UserError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FEATURES = "features"  # real images' features (evaluate/feature_cache.py): extracted anew when missing


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '2w' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not match:
        raise UserError(f"--older-than {text} is not an age: write a number and a unit, e.g. 30d, 12h or 90m.")
    return float(match[1]) * UNITS[match[2]]


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _what(entry: StoredEntry) -> str:
    """A few words on what the entry is, from the settings in its record."""
    try:
        settings = json.loads((entry.folder / "record.json").read_text()).get("settings", {})
    except (OSError, ValueError):
        return ""
    dataset = settings.get("dataset", {})
    parts = [dataset.get("name") if isinstance(dataset, dict) else dataset, settings.get("split"),
             settings.get("noise", {}).get("objective") if isinstance(settings.get("noise"), dict) else None,
             f"{settings['train']['max_steps']} steps" if isinstance(settings.get("train"), dict)
             and "max_steps" in settings["train"] else None]
    return ", ".join(p for p in parts if p)


def _feature_files(root: Path) -> list[Path]:
    return sorted((root / FEATURES).glob("*.pt")) if (root / FEATURES).is_dir() else []


def list_cache(root: Path) -> str:
    cache = ArtifactCache(root)
    entries = cache.entries()
    lines = [f"artifact cache {cache.root}"]
    if entries:
        lines.append(f"{'stage':<20} {'key':<18} {'size':>9}  {'created':<16}  {'last used':<16}  what")
        for e in entries:
            lines.append(f"{e.stage:<20} {e.key:<18} {human_size(e.size):>9}  {_day(e.created):<16}  "
                         f"{_day(e.last_used):<16}  {_what(e)}")
    by_stage: dict[str, list[StoredEntry]] = {}
    for e in entries:
        by_stage.setdefault(e.stage, []).append(e)
    for stage, items in by_stage.items():
        lines.append(f"  {stage}: {len(items)} entries, {human_size(sum(e.size for e in items))}")
    features = _feature_files(root)
    lines.append(f"features {root / FEATURES}: {len(features)} files, "
                 f"{human_size(sum(f.stat().st_size for f in features))}")
    total = sum(e.size for e in entries) + sum(f.stat().st_size for f in features)
    lines.append(f"total {human_size(total)}")
    return "\n".join(lines)


def prune_cache(root: Path, older_than_s: float, dry_run: bool) -> str:
    removed, busy = ArtifactCache(root).prune(older_than_s, dry_run)
    cutoff = time.time() - older_than_s
    old_features = [f for f in _feature_files(root) if f.stat().st_mtime < cutoff]
    freed = sum(e.size for e in removed) + sum(f.stat().st_size for f in old_features)
    if not dry_run:
        for f in old_features:
            f.unlink(missing_ok=True)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {e.stage}/{e.key} ({human_size(e.size)}, last used {_day(e.last_used)})" for e in removed]
    lines += [f"kept {e.stage}/{e.key}: a process holds its lock" for e in busy]
    lines.append(f"{verb} {len(removed)} entries and {len(old_features)} feature files: {human_size(freed)}")
    return "\n".join(lines)


def cache_dir(overrides: list[str], conf_dir: str) -> Path:
    """The runs' paths.cache_dir, composed as a run composes it (so DIFFLAB_CACHE applies)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return Path(str(cfg.paths.cache_dir)).expanduser()


def main(argv: list[str], conf_dir: str) -> None:
    parser = argparse.ArgumentParser(prog="difflab cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every entry with its size, creation and last use")
    pruning = commands.add_parser("prune", help="delete the entries not used for a while")
    pruning.add_argument("--older-than", required=True, help="e.g. 30d, 12h, 90m: entries not used for that long")
    pruning.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    for sub in (listing, pruning):
        sub.add_argument("overrides", nargs="*", help="paths.cache_dir=DIR, as for a run")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("paths.cache_dir=")]
    if bad:
        raise UserError(f"difflab cache takes no {bad[0]}: only paths.cache_dir=DIR names another cache.")
    root = cache_dir(args.overrides, conf_dir)
    if args.command == "list":
        print(list_cache(root))
    else:
        print(prune_cache(root, parse_age(args.older_than), args.dry_run))
