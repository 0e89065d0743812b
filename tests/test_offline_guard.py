import socket

import pytest


def test_outbound_connections_are_refused_during_tests():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match="network"):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()
