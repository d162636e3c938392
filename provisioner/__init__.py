"""Enroll YubiKeys as AWS IAM MFA devices."""

__version__ = "0.1.0"
