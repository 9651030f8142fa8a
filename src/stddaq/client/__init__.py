"""What users import: clients of stddaq services that need only numpy, pyzmq, websockets and the
stream formats (no HDF5, no Redis): live stream subscriber, recording client."""

from stddaq.client.stream import LiveStreamClient, image_id

__all__ = ["LiveStreamClient", "image_id"]
