"""Tests of the strict local IAM stand-in (provisioner.local_iam)."""
