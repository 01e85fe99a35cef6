"""Hydra entry point: composes the config, runs it, and turns a UserError into one line; `difflab export ckpt=PATH
out=DIR` writes a model's export instead (difflab.export_format).

Under torchrun (several processes) main() first joins the processes into one process group,
so that they agree on one run folder before Hydra names it, and keeps every rank but 0 from
writing in that folder (see difflab.distributed for who does what).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

import difflab.distributed as dist
from difflab.config import register_configs
from difflab.errors import SamplingInterrupted, TrainingInterrupted, UserError
from difflab.sweep.metric import optuna_direction
from difflab.sweep.named import register_named_sweeps

# The package's conf/: in a clone a symlink to the top-level conf/ (resolved, so that Hydra's records name that
# folder), in an installed wheel a copy of it; so clones, editable installs and wheels read the same configs.
CONF_DIR = str((Path(__file__).parent / "conf").resolve())

# Ranks other than 0 add these to their command line. They keep rank 0's run folder (every rank
# resumes from the checkpoints in it; a folder of their own would not have them) but write
# nothing there: no .hydra/ copy of the config, the null device as their log file, and only
# warnings on their console, so the run's log is printed and written once, by rank 0.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", f"hydra.job_logging.handlers.file.filename={os.devnull}",
                        "hydra.job_logging.root.level=WARNING"]

_run_started: Optional[datetime] = None  # under torchrun: rank 0's clock, handed to every rank


def _run_start(pattern: str) -> str:
    """${run_start:PATTERN}, which names the run and sweep folders in conf/config.yaml: the time
    now, as Hydra's ${now:} gives it, except under torchrun, where every rank reads the time
    rank 0 started at and so names the same folder."""
    return (_run_started or datetime.now()).strftime(pattern)


OmegaConf.register_new_resolver("run_start", _run_start, use_cache=True, replace=True)
OmegaConf.register_new_resolver("sweep_direction", optuna_direction, replace=True)
register_configs()
register_named_sweeps()


def _fail(e: UserError) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _check_torchrun_job() -> None:
    """A torchrun job is one run, in the one folder every rank named."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise UserError("A sweep (-m or a named sweep) cannot run inside torchrun: start one torchrun per job of the "
                        "sweep (docs/scaling-out.md).")
    run_dir = hydra_cfg.runtime.output_dir
    if dist.from_main(lambda: run_dir) != run_dir:
        raise UserError(f"The torchrun processes named different run folders ({run_dir} here): give one "
                        "hydra.run.dir on a shared filesystem, with ${run_start:...} rather than ${now:...} in it.")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from difflab.runner import run
    from difflab.sweep.jobs import run_recorded

    try:
        if cfg.dry_run:  # set by other means than the command line (which main() answers before Hydra runs)
            _print_plans([cfg], None)
            return None
        if dist.launched():
            _check_torchrun_job()
        return run_recorded(run, cfg)  # in a multirun, a failed job is recorded and the sweep goes on
    except UserError as e:
        logging.getLogger("difflab").error("%s", e)
        _fail(e)
    except TrainingInterrupted as e:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
        print(f"stopped: training was interrupted after step {e.step} and {e.checkpoint} holds it; continue with the "
              f"same command plus train.resume=auto hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(130)  # the shell's code for a process stopped by Ctrl-C
    except SamplingInterrupted as e:
        print(f"stopped: sampling was interrupted, and the trained model is kept in {e.checkpoint}: sample it with "
              f"`python run.py mode=sample ckpt={e.checkpoint}`, or measure it with mode=evaluate", file=sys.stderr)
        sys.exit(130)


DRY_RUN = re.compile(r"^\+{0,2}dry_run=(true|True|yes|1)$")


def _print_plans(cfgs: list[DictConfig], run_dir: Optional[Path]) -> None:
    from difflab.plan import build_plan

    for i, cfg in enumerate(cfgs):
        plan = build_plan(cfg, run_dir)
        print(("" if len(cfgs) == 1 else f"job {i}:\n") + plan.table())


def _job_overrides(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job a command line (and the named sweep it selects) would run:
    one list without sweep syntax, several with it, as Hydra's basic sweeper expands them."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose(config_name="config", overrides=plain, return_hydra_config=True).hydra.sweeper.get("params") or {}
    given = {o.key_or_group for o in parsed}
    parsed += parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in given])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _dry_run(argv: list[str]) -> NoReturn:
    """dry_run=true: the plan of the run (of each job, in a sweep), printed; nothing is written,
    not even the run folder Hydra would make."""
    from hydra import compose
    from omegaconf import open_dict

    args = _hydra_command_line(argv)  # -m, --multirun, --cfg ...: Hydra's own flags, which a plan ignores
    try:
        with compose_api(args.config_dir):
            cfgs = []
            for job in _job_overrides(args.overrides):
                cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
                given_dir = any(o.startswith("hydra.run.dir=") for o in job)
                run_dir = Path(cfg.hydra.run.dir) if given_dir else None
                with open_dict(cfg):
                    del cfg["hydra"]
                cfgs.append(cfg)
            _print_plans(cfgs, run_dir)
    except UserError as e:
        _fail(e)
    except Exception as e:  # Hydra's own errors: a wrong key, option or type
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


def composition_error(e: Exception) -> str:
    """Hydra's error composing a config, as one sentence naming the fix."""
    from difflab.config import OBJECTIVE_SCHEMAS

    text = "\n".join(str(c) for c in (e, e.__cause__) if c is not None)
    missing = re.search(r"Could not (?:find|load) '(\w+)/([^']+)'", text)
    if missing and (Path(CONF_DIR) / missing.group(1)).is_dir():  # an option (or preset) that no file names
        group, option = missing.groups()
        options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
        plus = "+" if group == "experiment" else ""  # presets are added to the defaults, not chosen among them
        return f"{plus}{group}={option} is not an option: choose one of {', '.join(options)}."
    wrong = re.search(r"Could not override '([^']+)'", text)
    if not wrong:
        return text.splitlines()[0]
    key = wrong.group(1)
    group, _, field = key.partition(".")
    if group == "objective":
        owners = [name for name, schema in OBJECTIVE_SCHEMAS.items() if field in schema.__dataclass_fields__]
        chosen = re.search(r"object_type=(\w+)", text)
        current = next((n for n, sc in OBJECTIVE_SCHEMAS.items() if chosen and sc.__name__ == chosen.group(1)), "?")
        if owners:
            return (f"{key} is a setting of objective={' or objective='.join(owners)}, not of objective={current}: "
                    f"add objective={owners[0]}, or leave {key} out.")
    return f"{key} is not a setting here: check its spelling (`python run.py --cfg job` prints every setting)."


def _hydra_command_line(argv: list[str]) -> argparse.Namespace:
    """The command line as @hydra.main will read it, so that the checks before Hydra tell its flags (and the folder
    after --config-dir) from the overrides; a flag Hydra does not know stops here with Hydra's own usage message.
    Overrides on both sides of a flag are taken here (a dry run takes them) and left to Hydra to refuse in a run."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_intermixed_args(argv)


def _flags_besides_config_dir(args: argparse.Namespace) -> bool:
    from hydra._internal.utils import get_args_parser

    defaults = vars(get_args_parser().parse_args([]))
    return any(value != defaults[key] for key, value in vars(args).items() if key not in ("overrides", "config_dir"))


@contextmanager
def compose_api(config_dir: Optional[str]) -> Iterator[None]:
    """Hydra's compose API searching the folders @hydra.main will: conf/, then a user's own `--config-dir DIR`
    (Hydra puts it after the primary folder too), so that the checks before Hydra, and the Python API's configs,
    accept the user's options."""
    from hydra import initialize_config_dir
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        if config_dir is not None:
            if not Path(config_dir).is_dir():
                raise UserError(f"--config-dir {config_dir} is not a folder: name the folder that holds your own "
                                "config groups (DIR/dataset/my.yaml for dataset=my).")
            search_path = create_config_search_path(CONF_DIR)
            search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}",
                                anchor=SearchPathQuery(provider="schema"))
            GlobalHydra.instance().clear()  # initialize_config_dir restores the previous state on leaving
            Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
        yield


def _check_composition(argv: list[str]) -> None:
    """Compose a single run's config before Hydra does, so that a wrong key, option or type is one
    sentence (Hydra would print several lines and a hint that rarely fits)."""
    from hydra import compose

    args = _hydra_command_line(argv)
    if _flags_besides_config_dir(args):
        return  # sweeps, --cfg, --help ...: Hydra's own handling
    try:
        with compose_api(args.config_dir):
            compose(config_name="config", overrides=args.overrides)
    except Exception as e:
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)


def _settings_given(argv: list[str]) -> dict[str, str]:
    """The command line's `key=value` overrides (`+key`, `++key`, `~key` as `key`), the last of a
    key winning as in Hydra."""
    return dict(a.lstrip("+~").partition("=")[::2] for a in argv if "=" in a and not a.startswith("-"))


def _check_output_folders(argv: list[str]) -> None:
    """A run or sweep folder named on the command line must be a folder Hydra can make or use."""
    for key, value in _settings_given(argv).items():
        if key in ("hydra.run.dir", "hydra.sweep.dir") and Path(value).expanduser().is_file():
            _fail(UserError(f"{key}={value} is a file, not a folder: name a folder for the run's outputs."))


def _rewrite_ckpt_shorthand(argv: list[str]) -> list[str]:
    """`ckpt=PATH` is short for `ckpt.model=PATH` (ckpt also holds .autoencoder, .classifier)."""
    return [re.sub(r"^ckpt=", "ckpt.model=", a) for a in argv]


def _objective_for_ddpm_settings(argv: list[str]) -> list[str]:
    """The schedule group and ddpm's own settings (prediction, min_snr_gamma) belong to
    objective=ddpm: a command line that sets them and names no objective means ddpm, as every such
    command did when ddpm was the default; a schedule beside another objective is refused, since
    that objective would ignore it."""
    from difflab.config import OBJECTIVE_SCHEMAS

    others = {f for name, schema in OBJECTIVE_SCHEMAS.items() if name != "ddpm" for f in schema.__dataclass_fields__}
    ddpm_only = set(OBJECTIVE_SCHEMAS["ddpm"].__dataclass_fields__) - others
    given = _settings_given(argv)
    schedule = next((f"{k}={v}" for k, v in given.items() if k.partition(".")[0] == "schedule"), None)
    if schedule is None and not any(k.partition(".")[2] in ddpm_only for k in given if k.startswith("objective.")):
        return argv
    if "objective" not in given:
        last = max(i for i, a in enumerate(argv) if "=" in a and not a.startswith("-"))
        return [*argv[:last + 1], "objective=ddpm", *argv[last + 1:]]  # in the overrides: flags may follow them
    named = [v.strip() for v in re.sub(r"^\w+\(|\)$", "", given["objective"]).split(",")]
    other = next((n for n in named if n != "ddpm"), None)
    if other is not None and schedule is not None:  # ddpm's own objective.* keys: Hydra's error says it
        raise UserError(f"{schedule} sets the noise schedule of objective=ddpm, which objective={other} does not "
                        f"use: add objective=ddpm, or leave {schedule} out.")
    return argv


def command_line(argv: list[str]) -> list[str]:
    """The command line as Hydra is to read it: `ckpt=` expanded, objective=ddpm added where ddpm's settings
    imply it."""
    return _objective_for_ddpm_settings(_rewrite_ckpt_shorthand(argv))


def _export(argv: list[str]) -> NoReturn:
    """`difflab export ckpt=PATH out=DIR`: a trained model as files anyone can load without difflab's checkpoints
    (which pickle) or its run folders (see difflab.export_format)."""
    from difflab.export_format import write_export

    usage = ("usage: difflab export ckpt=PATH out=DIR  (PATH: a diffusion checkpoint or run folder; DIR: a new or "
             "empty folder, or an earlier export to overwrite)")
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        sys.exit(0)
    given = dict(a.partition("=")[::2] for a in argv)
    wrong = next((a for a in argv if a.partition("=")[0] not in ("ckpt", "out") or "=" not in a), None)
    missing = next((k for k in ("ckpt", "out") if not given.get(k)), None)
    if wrong is not None or missing is not None:
        what = f"not {wrong}" if wrong is not None else f"and {missing}= is missing"
        _fail(UserError(f"`difflab export` takes ckpt=PATH out=DIR, {what}: e.g. `difflab export "
                        "ckpt=outputs/<run>/checkpoints/last.pt out=my_model`."))
    try:
        folder = write_export(Path(given["ckpt"]), Path(given["out"]))
    except UserError as e:
        _fail(e)
    print(f"exported {given['ckpt']} to {folder}: load it with difflab.load({str(folder)!r})")
    sys.exit(0)


def _torchrun_main() -> None:
    """One rank of `torchrun --nproc_per_node=N run.py ...`: join the others, take rank 0's start
    time for the run folder's name, run, and leave the process group however the run ends."""
    global _run_started
    try:
        dist.init()
    except UserError as e:
        _fail(e)
    try:
        _run_started = dist.from_main(datetime.now)
        if not dist.is_main():
            sys.argv += QUIET_RANK_OVERRIDES
        _hydra_main()
    finally:
        dist.teardown()


def _check_optuna(args: list[str]) -> None:
    """+sweep=optuna (sweeps/optuna.yaml) selects a sweeper plugin that is an optional extra."""
    import importlib.util

    if "+sweep=optuna" in args and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        _fail(UserError("+sweep=optuna needs the Optuna sweeper, which is not installed: pip install 'difflab[optuna]'."))


def main() -> None:
    if sys.argv[1:2] == ["cache"]:  # difflab cache list | prune --older-than 30d
        from difflab.cache_command import main as cache_main
        try:
            return cache_main(sys.argv[2:], CONF_DIR)
        except UserError as e:
            _fail(e)
    if sys.argv[1:2] == ["export"]:
        _export(sys.argv[2:])
    try:
        sys.argv = [sys.argv[0], *command_line(sys.argv[1:])]
    except UserError as e:
        _fail(e)
    _check_output_folders(sys.argv[1:])
    _check_optuna(sys.argv[1:])
    if any(DRY_RUN.match(a) for a in sys.argv[1:]):
        _dry_run(sys.argv[1:])
    _check_composition(sys.argv[1:])
    if dist.launched():
        _torchrun_main()
    else:
        _hydra_main()
