"""AWS: IAM (the directory) and its policy simulator."""
