"""Data, where a round starts: image datasets on disk (IDX, Fashion-MNIST, image folders) and their seeded
splits over the clients."""
