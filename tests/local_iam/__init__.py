"""Tests of the strict local IAM stand-in (local_iam_server)."""
