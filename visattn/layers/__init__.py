"""nn.Module layers that own projections and call visattn.ops (one file per method)."""
