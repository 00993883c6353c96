"""Model parts: backbones (frozen feature extractors), 2D flows, and the FastFlow model."""
