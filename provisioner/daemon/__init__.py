"""The desk daemon: token workers, who gets a token, the control API and the live status."""
