"""The feddiff worker daemon: trains on private data, exchanges UNet parts with the coordinator."""
