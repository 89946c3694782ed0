"""``kdflow run -m``: Hydra's sweep syntax (``a=1,2 b=x,y``) expanded into one study per point."""
from __future__ import annotations

import re
from typing import List

from methods.errors import ConfigError


def sweep_points(overrides: List[str]) -> List[List[str]]:
    """The cartesian product of the sweeps in ``overrides``, each point a list of plain
    overrides, in Hydra's order (``study.seeds=[0],[1] x=1,2`` -> 4 points)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as err:
        raise ConfigError("overrides", str(err).splitlines()[0],
                          fix="write sweeps as key=a,b,c (lists as key=[0,1],[2,3])") from None
    return points


def point_name(point: List[str], overrides: List[str]) -> str:
    """A folder-safe name for one point, from the overrides that vary across the sweep."""
    varying = [o for o in point if o not in overrides]
    text = "_".join(varying) or "point"
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "", text.replace("/", "-"))[:120]
