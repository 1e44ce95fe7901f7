"""The teacher cache: a self-describing zarr v3 store of top-k teacher logits per (epoch, sample)."""
