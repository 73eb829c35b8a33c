"""meshformer: data package."""
