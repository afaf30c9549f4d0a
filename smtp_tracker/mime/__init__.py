"""mime package."""
