"""The daemon's host memory: the block pool every layer shares, and the pinned region the transports copy into."""
