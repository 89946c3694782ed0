"""``kdflow run -m``: Hydra's sweep syntax (``a=1,2 b=x,y``) expanded into one study per point."""
from __future__ import annotations

import re
from typing import List, Tuple

from kdflow.methods.errors import ConfigError


def sweep_points(overrides: List[str]) -> List[Tuple[List[str], str]]:
    """The cartesian product of the sweeps in ``overrides``, in Hydra's order
    (``study.seeds=[0],[1] x=1,2`` -> 4 points): each point's plain overrides and a
    folder-safe name made of the swept settings' values."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as err:
        raise ConfigError("overrides", str(err).splitlines()[0],
                          fix="write sweeps as key=a,b,c (lists as key=[0,1],[2,3])") from None
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    return [(point, point_name([o for o in point if o.split("=")[0] in swept])) for point in points]


def point_name(overrides: List[str]) -> str:
    """``overrides`` joined into a folder name (``a.b=2_c=[0]`` -> ``a.b=2_c=0``)."""
    text = "_".join(overrides) or "point"
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "", text.replace("/", "-"))[:120]
