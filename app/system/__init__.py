"""What the platform says about itself: health and the OpenAPI document."""
