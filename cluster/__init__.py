"""One replica's runtime: config, placement, worker grid, scheduler, KV block manager, engine loop."""
