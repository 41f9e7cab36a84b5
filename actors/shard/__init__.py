"""Ray-free model math for one shard of a TP x PP grid: layers, models, loader, KV cache, sampler."""
