"""What the platform says about itself: health, Prometheus metrics, the OpenAPI document, structured logs."""
