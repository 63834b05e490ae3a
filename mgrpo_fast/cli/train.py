"""``python -m mgrpo_fast.train`` / ``mgrpo-train``: train MGRPO or GRPO from a YAML config.

    python -m mgrpo_fast.train --config configs/mgrpo_default.yaml [--key.sub=value ...] [--resume]
    torchrun --nproc_per_node=8 -m mgrpo_fast.train --config configs/mgrpo_default.yaml

``--help`` lists every key with its default. ``--resume`` continues from the newest checkpoint in
``checkpoint.dir`` (``--checkpoint.resume=PATH`` from a given one) with the same data order and RNG.
A bad key or value exits with status 2 and a message naming the file/line or the override.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from mgrpo_fast.config.fields import ConfigError
from mgrpo_fast.config.loading import load_config, parse_cli

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(*parse_cli(argv))
    except (ConfigError, FileNotFoundError) as e:
        print(f"mgrpo-train: error: {e}", file=sys.stderr)
        return 2
    from mgrpo_fast.engines.distributed import finish_distributed
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    trainer = MGRPOTrainer(cfg)
    metrics = trainer.train()
    finish_distributed()  # after success only: a barrier would wait forever on a rank that died
    if not trainer.is_main:
        return 0
    summary = {
        k: v for k, v in metrics.items() if k.startswith(("eval/", "layer1/accuracy", "layer2/accuracy"))
    }
    logging.getLogger("mgrpo_fast.train").info("done at step %d: %s", trainer.step, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
