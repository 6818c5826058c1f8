"""The DNS side of edge: authoritative instance names plus a forwarding resolver."""
