"""The public, unauthenticated HTTPS listener: the pixel and click endpoints."""
