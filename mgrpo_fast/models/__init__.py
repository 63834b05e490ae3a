"""Loading causal LMs and running them on packed micro-batches (packed varlen attention)."""
