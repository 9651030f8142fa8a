"""What users import: clients of stddaq services (no HDF5 or Redis needed)."""
