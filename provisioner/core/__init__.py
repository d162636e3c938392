"""The pure core: the enrollment's steps, its values, ports and errors. No I/O, no vendor
library.
"""
