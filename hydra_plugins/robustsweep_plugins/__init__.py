"""Hydra search path for robustsweep's plug-in packages (robustsweep.core.plugins): each installed
plug-in's ``conf/`` folder is searched after robustsweep's own, so ``+margin=on`` finds
``mypkg/conf/margin/on.yaml``. Hydra imports every ``hydra_plugins`` module at start-up; this one
reads entry-point metadata only and imports no plug-in.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from robustsweep.core import plugins


class RobustsweepPluginsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for d in plugins.conf_dirs():
            search_path.append(provider="robustsweep-plugin", path=f"file://{d}")
