"""Stand-ins for the outside systems, speaking their real protocols over real HTTP.

- ``cloudstack``: Apache CloudStack's API at ``/client/api`` (signed requests, async jobs);
- ``volume_daemon``: MigrateKit's Volume Daemon (``/api/v1/...`` operations);
- ``inject``: the driver-injection script (``python -m emulators.inject``);
- ``control``: ``/_emulator/...`` on both apps, to set up the world, program faults and
  latency, and read the state and the call log (``client.EmulatorControl`` wraps it).

``runner.start_emulators()`` starts both apps over one ``world.World``;
``python -m emulators`` runs them until SIGTERM.
"""
