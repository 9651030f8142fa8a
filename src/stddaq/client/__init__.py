"""What users import: clients that need only numpy, pyzmq and the stream formats (no HDF5, no Redis)."""

from stddaq.client.stream import LiveStreamClient, image_id

__all__ = ["LiveStreamClient", "image_id"]
