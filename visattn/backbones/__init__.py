"""timm-registered backbone families; importing this package registers them with timm."""
