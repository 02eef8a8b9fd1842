"""gateway_parts/discovery.py and the model client's second try: the gateway follows the model tier's addresses as
they change, and a call a stopping model server cancelled is made again.

The name's lookups are replaced here by a list the test changes (what the cluster's DNS would answer); the model
servers are FakeModelServer on 127.0.0.1. tests/test_cluster.py shows the same with real DNS and real rollouts.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

import protobuf
from gateway_parts import discovery
from gateway_parts.errors import GatewayError
from gateway_parts.model_client import ModelClient
from gateway_parts.settings import Settings
from servers import FakeModelServer

NAME = "dns:///clothing-model-headless.test:8500"
BATCH = np.zeros((1, 299, 299, 3), np.uint8)


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("dns:///clothing-model-headless:8500", ("clothing-model-headless", 8500)),
        ("clothing-model:8500", ("clothing-model", 8500)),
        ("localhost:8500", ("localhost", 8500)),
        ("10.0.0.1:8500", None),
        ("[::1]:8500", None),
        ("ipv4:10.0.0.1:8500,10.0.0.2:8500", None),
        ("unix:/run/model.sock", None),
        ("dns://10.0.0.53/clothing-model:8500", None),  # a DNS server of its own: gRPC's resolver asks it
        ("clothing-model", None),
    ],
)
def test_only_names_are_looked_up(target, name):
    found = discovery.name_in(target)
    assert (found and (found.host, found.port)) == name


def test_a_name_is_looked_up_with_the_system_resolver():
    assert discovery.look_up(discovery.Name("localhost", 8500))[0] in ("127.0.0.1:8500", "[::1]:8500")
    assert discovery.target_for(("10.0.0.1:8500", "10.0.0.2:8500")) == "ipv4:10.0.0.1:8500,10.0.0.2:8500"
    assert discovery.target_for(("[fd00::1]:8500",)) == "ipv6:[fd00::1]:8500"
    with pytest.raises(OSError):
        discovery.look_up(discovery.Name("no-such-host.invalid", 8500))


class Answers:
    """What the name resolves to, as the test says: addresses, or a failed lookup (None)."""

    def __init__(self, addresses):
        self.addresses = addresses
        self.asked = 0

    def __call__(self, name):
        self.asked += 1
        if self.addresses is None:
            raise OSError(f"{name.host}: no answer")
        return tuple(self.addresses)


def wait_for(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_gateway_follows_the_model_tier_as_its_addresses_change(monkeypatch):
    """A rollout as the gateway sees it: the name gives the old server, then both, then the new one alone, then no
    answer for a while (a DNS outage); calls go where the name says, none fails, and the channel that was replaced
    is closed once its calls could have finished."""
    with FakeModelServer() as old, FakeModelServer() as new:
        answers = Answers([old.target])
        monkeypatch.setattr(discovery, "look_up", answers)
        client = ModelClient(Settings(tf_serving_host=NAME, lookup_every=0.05, predict_timeout=0.5))
        try:
            first = client.channels.current
            for _ in range(5):
                client.predict(BATCH)
            assert (old.calls, new.calls) == (5, 0)
            assert REGISTRY.get_sample_value("gateway_model_addresses") == 1

            answers.addresses = [old.target, new.target]
            wait_for(lambda: client.channels.addresses == (old.target, new.target))
            for _ in range(20):
                client.predict(BATCH)
            assert old.calls > 5 and new.calls > 0, (old.calls, new.calls)  # round robin over both
            assert REGISTRY.get_sample_value("gateway_model_addresses") == 2

            answers.addresses = [new.target]
            wait_for(lambda: client.channels.addresses == (new.target,))
            before = old.calls
            for _ in range(10):
                client.predict(BATCH)
            assert old.calls == before

            answers.addresses, asked = None, answers.asked
            wait_for(lambda: answers.asked > asked + 3)
            client.predict(BATCH)  # the last addresses known stay in use
            assert client.channels.addresses == (new.target,)
            wait_for(lambda: _closed(first), timeout=5)  # retired 1.5 s (its deadline + 1 s) after it was replaced
        finally:
            client.close()


def _closed(stubs) -> bool:
    try:
        stubs.status(protobuf.GetModelStatusRequest(), timeout=1)
    except ValueError:  # grpc: "Cannot invoke RPC on closed channel!"
        return True
    return False


def test_new_addresses_that_do_not_connect_wait_while_the_old_ones_work(monkeypatch):
    """A stale answer (a pod already gone) does not take over from a channel that works: the gateway keeps calling
    what answers, and tries the new addresses again at its next lookup."""
    with FakeModelServer() as model:
        answers = Answers([model.target])
        monkeypatch.setattr(discovery, "look_up", answers)
        monkeypatch.setattr(discovery, "READY_WAIT", 0.2)
        client = ModelClient(Settings(tf_serving_host=NAME, lookup_every=0.05))
        try:
            client.predict(BATCH)  # the lookups start with the first call
            answers.addresses = ["127.0.0.1:9"]  # nothing listens there
            asked = answers.asked
            wait_for(lambda: answers.asked > asked + 2)
            assert client.channels.addresses == (model.target,)
            client.predict(BATCH)
        finally:
            client.close()


def test_lookups_stop_with_the_client(monkeypatch):
    with FakeModelServer() as model:
        answers = Answers([model.target])
        monkeypatch.setattr(discovery, "look_up", answers)
        client = ModelClient(Settings(tf_serving_host=NAME, lookup_every=0.05))
        client.predict(BATCH)
        client.close()
        time.sleep(0.2)
        asked = answers.asked
        time.sleep(0.3)
        assert answers.asked == asked
        assert not [t for t in threading.enumerate() if t.name == "model-lookup" and t.is_alive()]


def test_an_address_or_a_lookup_interval_of_zero_is_left_to_grpc(monkeypatch):
    answers = Answers(["127.0.0.1:1"])
    monkeypatch.setattr(discovery, "look_up", answers)
    with FakeModelServer() as model:
        for settings in (Settings(tf_serving_host=model.target), Settings(tf_serving_host=NAME, lookup_every=0)):
            client = ModelClient(settings)
            try:
                assert client.channels.name is None and client.channels.addresses == ()
                if settings.tf_serving_host == model.target:
                    client.predict(BATCH)
            finally:
                client.close()
    assert answers.asked == 0


def test_a_predict_the_model_server_cancelled_is_made_once_more():
    """A model server stopping with calls in hand answers them CANCELLED (TF Serving's and ours alike): the gateway
    makes such a call once more, within its deadline; a second CANCELLED is the answer."""
    retries = {"code": "CANCELLED"}
    before = REGISTRY.get_sample_value("gateway_model_retries_total", retries) or 0
    with FakeModelServer(cancel_first=1) as model:
        client = ModelClient(Settings(tf_serving_host=model.target))
        try:
            client.predict(BATCH)
            assert model.calls == 2  # the metadata call is not counted: Predict was tried twice
            assert REGISTRY.get_sample_value("gateway_model_retries_total", retries) == before + 1
        finally:
            client.close()
    with FakeModelServer(cancel_first=2) as model:
        client = ModelClient(Settings(tf_serving_host=model.target))
        try:
            with pytest.raises(GatewayError) as raised:
                client.predict(BATCH)
            assert raised.value.status == 502 and "CANCELLED" in raised.value.message
            assert model.calls == 2
        finally:
            client.close()
