"""Training engines: the ``Engine`` contract, one process, FSDP2 and DeepSpeed ZeRO."""
