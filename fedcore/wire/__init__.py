"""The wire, the only room that knows protobuf and gRPC's messages: the generated code of the v1 contract (proto/),
bounded chunked streams (stream.py), chunk messages without protobuf copies (frames.py), protobuf <-> domain
objects (convert.py) and the bound of every field (bounds.py)."""
