"""Process groups, expert dispatch/combine backends, the msgpack wire protocol."""
