"""quickstart: Flower's PyTorch quickstart with FedUGM."""
