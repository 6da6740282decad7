"""``python -m emulators``: run the CloudStack and Volume Daemon emulators."""

from emulators.runner import main

raise SystemExit(main())
