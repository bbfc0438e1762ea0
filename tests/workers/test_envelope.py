"""Signed job envelopes: the agent refuses anything it cannot trust, before anything runs."""

from __future__ import annotations

import base64
import json
import time

import pytest

from dispatch.contract import ENVELOPE_FIELDS, agent_queue, shared_queue
from dispatch.signing import Signer, SigningError, generate_keypair, load_signing_key
from workers.envelope import EnvelopeRefused, Verifier

PRIVATE, PUBLIC = generate_keypair()
OTHER_PRIVATE, _ = generate_keypair()


def verifier(**overrides: str) -> Verifier:
    identity = {"tenant": "acme", "project": "web", "agent_id": "a1", "platform": "linux", **overrides}
    return Verifier(PUBLIC, **identity)


def message(private: str = PRIVATE, **overrides) -> dict[str, str]:
    fields = {
        "audience": agent_queue("acme", "a1"),
        "tenant": "acme",
        "project": "web",
        "job_id": "j-1",
        "attempt": 1,
        "name": "wf",
        "workflow": "name: wf\ntasks: []\n",
        "variables": {"A": 1},
        **overrides,
    }
    return Signer(load_signing_key(private)).sign(**fields)


def refusal(kwargs: dict, v: Verifier | None = None, now: float | None = None) -> str:
    with pytest.raises(EnvelopeRefused) as info:
        (v or verifier()).verify(kwargs, now=now)
    return info.value.reason


def test_a_well_signed_envelope_for_this_agent_verifies():
    envelope = verifier().verify(message())
    assert (envelope.job_id, envelope.attempt, envelope.variables) == ("j-1", 1, {"A": 1})
    assert envelope.expires_at > time.time()


def test_the_shared_queue_of_the_agents_project_and_platform_is_an_accepted_audience():
    assert verifier().verify(message(audience=shared_queue("acme", "web", "linux"))).job_id == "j-1"


def test_the_envelope_holds_exactly_the_documented_fields_and_no_secrets():
    claims = json.loads(base64.b64decode(message()["envelope"]))
    assert set(claims) == set(ENVELOPE_FIELDS)
    assert "secrets" not in claims


def test_a_message_signed_by_another_key_is_refused():
    assert refusal(message(OTHER_PRIVATE)) == "bad_signature"


def test_an_unsigned_message_is_refused():
    assert refusal({"workflow": "name: x"}) == "unsigned"


def test_a_tampered_envelope_is_refused():
    kwargs = message()
    claims = json.loads(base64.b64decode(kwargs["envelope"]))
    claims["workflow"] = "name: evil\ntasks: []\n"
    kwargs["envelope"] = base64.b64encode(json.dumps(claims).encode()).decode()
    assert refusal(kwargs) == "bad_signature"


def test_an_expired_envelope_is_refused():
    kwargs = message(expires_at=time.time() + 5)
    assert refusal(kwargs, now=time.time() + 10) == "expired"


@pytest.mark.parametrize(
    "overrides",
    [
        {"audience": agent_queue("acme", "a2")},
        {"tenant": "other"},
        {"project": "db"},
        {"audience": shared_queue("acme", "web", "windows")},
    ],
)
def test_an_envelope_for_another_agent_tenant_project_or_platform_is_refused(overrides):
    assert refusal(message(**overrides)) == "wrong_audience"


def test_a_replayed_envelope_is_refused():
    v = verifier()
    kwargs = message()
    v.verify(kwargs)
    assert refusal(kwargs, v) == "replayed"


def test_an_envelope_only_proved_genuine_is_neither_taken_nor_refused_as_a_replay():
    v = verifier()
    kwargs = message()
    assert v.verify(kwargs, take=False).job_id == v.verify(kwargs).job_id  # not remembered by the first
    assert v.verify(kwargs, take=False).attempt == 1  # taken already: still genuine
    assert refusal(kwargs, v) == "replayed"


def test_an_envelope_given_back_unrun_can_be_taken_again():
    v = verifier()
    kwargs = message()
    taken = v.verify(kwargs)
    v.forget(taken.nonce)  # the agent stopped before claiming it: the message went back to the queue
    assert v.verify(kwargs).job_id == taken.job_id
    assert refusal(kwargs, v) == "replayed"  # taken again, it is remembered again


def test_nonces_are_kept_until_their_envelope_expires_and_no_longer():
    v = verifier()
    now = int(time.time())  # envelopes carry whole seconds
    soon = [message(job_id=f"soon-{i}", expires_at=now + 10 + i, now=now) for i in range(3)]
    late = message(job_id="late", expires_at=now + 100, now=now)
    for kwargs in (late, *soon):
        v.verify(kwargs, now=now)
    assert refusal(soon[2], v, now=now + 11.5) == "replayed"  # the last of them still valid: still remembered
    assert refusal(late, v, now=now + 11.5) == "replayed"
    assert len(v._seen) == 2  # the two expired ones are forgotten (they are refused as expired anyway)
    assert refusal(soon[0], v, now=now + 11.5) == "expired"
    assert refusal(late, v, now=now + 99) == "replayed"
    v.verify(message(job_id="next", now=now + 101), now=now + 101)
    assert len(v._seen) == 1  # however many were taken, only the unexpired are kept


def test_a_malformed_signing_key_is_a_clear_error():
    with pytest.raises(SigningError, match="automation keys generate"):
        load_signing_key("not-a-key")
    with pytest.raises(ValueError, match="JOB_VERIFY_KEY"):
        Verifier("bad", tenant="t", project="p", agent_id="a", platform="linux")
