"""``python -m local_iam_server``: run the strict local IAM stand-in."""

from local_iam_server.server import main

raise SystemExit(main())
