"""Preprocess datasets into mpitrain's HDF5 shards (schema in ``mpitrain.data.manifest``)."""
