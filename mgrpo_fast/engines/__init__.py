"""Training engines: the ``Engine`` contract (``base``), one process (``local``), FSDP2 (``fsdp2``) and
DeepSpeed ZeRO (``deepspeed_zero``) under ``torchrun`` (``distributed``), chosen by ``factory``; the
AdamW optimizer and its schedule (``optim``)."""

from mgrpo_fast.engines.base import Engine, NonFiniteLossError, StepResult

__all__ = ["Engine", "NonFiniteLossError", "StepResult"]
