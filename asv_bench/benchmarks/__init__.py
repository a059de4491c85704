"""asv benchmarks for xafunc: every xafunc benchmark sits beside its torch.func baseline."""
