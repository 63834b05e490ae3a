"""Run configuration: documented dataclass sections (:mod:`.sections`), the whole run and the
equal-budget rule (:mod:`.run`), the field machinery (:mod:`.fields`), loading YAML files with
``--key.sub=value`` overrides (:mod:`.loading`) and the key reference (:mod:`.describe`).

``python -m mgrpo_fast.config [--config FILE] [--key=value ...]`` prints the resolved configuration;
``--help`` lists every key with its type, default, allowed values and documentation (the same list is
generated into docs/training.md by ``python -m mgrpo_fast.config.describe docs/training.md``).
"""

from mgrpo_fast.config.fields import ConfigError
from mgrpo_fast.config.loading import load_config, parse_cli
from mgrpo_fast.config.run import TrainConfig

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_cli"]
