"""encoder package."""
