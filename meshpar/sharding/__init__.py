"""How parameters are placed: logical-axis rules, strategies, sharded init (NNX, Linen),
Explicit-mesh help."""
