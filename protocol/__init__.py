"""fedbus: the bus-level protocol (messages, codec, signing, config, transport)."""
