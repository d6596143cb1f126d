"""Networks. Any `nn.Module` works: the algorithms call it through `torch.func.functional_call`."""
