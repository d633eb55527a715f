"""Data, where a round starts: image datasets on disk (IDX, Fashion-MNIST, image folders), their seeded splits over
the clients, and one client's shard of them."""
