"""The feddiff coordinator: gRPC server, round loop, checkpoints."""
