"""What the wheel ships besides code: the Hydra configs and the bundled data.

    steerlm/conf/           every stage's config (the checkout's `conf/` links here)
    steerlm/bundled_data/   100 HelpSteer2 rows, OASST1 English validation (the checkout's `data/` links here)

Configs name a bundled file as `${bundled:oasst1/oasst1_validation_en.messages.jsonl.gz}`, so the same
config runs from a checkout, from an installed wheel, and from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
BUNDLED_DATA_DIR = PACKAGE_DIR / "bundled_data"


def bundled(relative: str) -> str:
    """Absolute path of a bundled data file; a name that is not bundled is an error that lists what is."""
    path = BUNDLED_DATA_DIR / relative
    if not path.is_file():
        have = sorted(str(p.relative_to(BUNDLED_DATA_DIR)) for p in BUNDLED_DATA_DIR.rglob("*") if p.is_file())
        raise FileNotFoundError(f"${{bundled:{relative}}}: not a bundled data file (bundled: {', '.join(have)})")
    return str(path)


OmegaConf.register_new_resolver("bundled", bundled, replace=True)
