"""Reptile and its first-order relatives, vectorised with torch.func, trained with Lightning."""
