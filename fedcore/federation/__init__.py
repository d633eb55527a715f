"""Federation, the round itself without any transport: the strategies' round plans, a client's work, bounds on an
update, streaming FedAvg, the round engine, checkpoints and the round log."""
