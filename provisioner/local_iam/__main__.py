"""``python -m provisioner.local_iam``: run the strict local IAM stand-in."""

from provisioner.local_iam.server import main

raise SystemExit(main())
