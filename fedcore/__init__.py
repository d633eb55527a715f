"""fedcore: the pure core of feddiff, in rooms ordered as a round builds on them: what a round starts from
(images, the model, its bytes) to the left, what runs it and looks at its result to the right.

errors.py, atomic.py and settings.py serve every room. A room imports them and the rooms to its left in
ROOMS, never a room to its right (tests/test_import_walls.py checks every import):

  data         image datasets, their splits over the clients, one client's shard
  model        the UNets and their three parts, DDPM maths and sampling, local training
  payload      a model's parts as safetensors bytes, checked before use; models on disk in and out
  federation   the round without a transport: plans, a client's work, bounds, FedAvg, the round engine,
               checkpoints, the round log
  wire         the only room that knows protobuf: generated code, streams, chunk frames, converters, bounds
  evaluation   after a round: the Frechet distance of a model's samples, sample grids
  experiments  whole runs in one process: the simulation, the paper's experiment table, its report
"""

ROOMS = ("data", "model", "payload", "federation", "wire", "evaluation", "experiments")

__version__ = "0.1.0"
