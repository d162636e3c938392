"""One module (or package) per outside system: the token over PC/SC, USB, AWS, the store, the
control socket, systemd.
"""
