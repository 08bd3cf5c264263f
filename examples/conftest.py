"""The examples: `pytest examples/` runs the busybox ones (README's fast demo).

examples/debian needs Debian machines with systemd; run it on its own with its pool.toml:
``pytest -n 2 --vm-backend podman --vm-pool-config examples/debian/pool.toml examples/debian``.
"""

collect_ignore = ["debian"]
