"""meshformer: launch package."""
