"""Run configuration: documented dataclass sections (:mod:`.sections`), the field machinery
(:mod:`.fields`) and loading YAML files with ``--key.sub=value`` overrides (:mod:`.loading`).

``python -m mgrpo_fast.config [--config FILE] [--key=value ...]`` prints the resolved configuration;
``--help`` lists every key with its default and its documentation.
"""

from mgrpo_fast.config.fields import ConfigError
from mgrpo_fast.config.loading import load_config, parse_cli
from mgrpo_fast.config.run import TrainConfig

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_cli"]
