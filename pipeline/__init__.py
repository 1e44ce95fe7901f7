"""Data side: webdataset shards, their manifest, the shard reader and replayable augmented views."""
