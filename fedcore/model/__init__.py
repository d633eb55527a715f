"""The model: the UNets and their three parts, the DDPM maths (schedule, loss, samplers), and local training on
one client's shard."""
