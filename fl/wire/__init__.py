"""Bytes between peers: length-prefixed frames, bounded control messages, the allowlisted
decoder for model payloads, credentials, the handshake and TLS."""
