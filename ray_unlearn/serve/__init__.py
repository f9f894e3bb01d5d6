"""Ray Serve layer (shard deployments and the ERASER gateway). Not built yet: see issue 3."""
