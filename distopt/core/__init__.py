"""Engine-independent building blocks: shard views, collectives, linear algebra, projection."""
