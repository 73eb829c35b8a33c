"""meshformer: parallel package."""
