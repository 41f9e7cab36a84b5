"""What runs on one GPU: the Ray worker actor and its Ray-free model math (`actors.shard`)."""
