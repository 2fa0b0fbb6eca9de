"""Code shared by the encoder server and the DiT client: wire codec, fingerprints, config."""
