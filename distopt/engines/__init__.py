"""Engine adapters: each turns what an engine hands over into shard views for the algorithms."""
