"""Two machines that talk to each other over the pool's private network."""

import pytest

from vmpool.client import VM


@pytest.mark.vm(count=2)
def test_http_between_two_machines(pool_vms: tuple[VM, VM]) -> None:
    server, client = pool_vms
    assert server.address and client.address and server.address != client.address
    server.exec(
        "mkdir -p /tmp/www && echo 'served by vmpool' > /tmp/www/index.html && "
        "httpd -p 8080 -h /tmp/www",
        check=True,
    )
    fetched = client.exec(
        f"timeout 20 wget -q -O - http://{server.address}:8080/index.html", check=True, timeout=30
    )
    assert fetched.stdout.strip() == "served by vmpool"
