"""Data and models shared by both stages: shards, replayable views, timm model building."""
