"""Named sweeps: the plain YAML files of the top-level sweeps/ folder, offered as the config
group `sweep` (`python run.py +sweep=guidance_scale`); copy one to make your own.

They are stored in Hydra's ConfigStore rather than joined through hydra.searchpath: a search-path
entry is a config root, so sweeps/ could only be reached as the group `sweeps` with the package
itself as a root, and a relative entry resolves against the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# The package's sweeps/: in a clone a symlink to the top-level sweeps/, in an installed wheel a copy of it.
SWEEPS_DIR = (Path(__file__).parents[1] / "sweeps").resolve()


def register_named_sweeps(folder: Path = SWEEPS_DIR) -> None:
    cs = ConfigStore.instance()
    for path in sorted(folder.glob("*.yaml")):
        try:
            node = OmegaConf.load(path)
        except Exception as e:  # a broken file must not stop runs that do not use it
            print(f"warning: skipped the named sweep {path} ({type(e).__name__}: {e}); fix the file to use it.",
                  file=sys.stderr)
            continue
        cs.store(group="sweep", name=path.stem, node=node, package="_global_", provider="difflab sweeps/")
