"""Security of the cloud service, end to end over real gRPC on 127.0.0.1 (port 0).

Covers TLS and mutual TLS with certificates made by ``tests/certs.py``, bearer tokens per
tenant enforced by the server's interceptor, tenant-scoped LoRA adapters (own and shared
ones only, PERMISSION_DENIED otherwise), token reload on SIGHUP and drain on SIGTERM in a
real ``tandem cloud serve`` process, plain text refused off loopback unless ``--insecure``,
and the message size limit. Every server started here is drained or killed on the way out.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from certs import Pki, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from serving import ROOT, config, make_repo, running, server_process
from torch.func import functional_call

import tandem.adapters
import tandem.cloud.compute
from tandem import codec
from tandem.adapters import load_adapter, merged_state, save_adapter
from tandem.bundle import HeadRunner, TailRunner
from tandem.cloud.config import ServeConfig
from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.edge.client import ClientSecurity, CloudClient, RetryPolicy
from tandem.protocol import from_message, to_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

TOKEN_A = "token-acme-0001"
TOKEN_B = "token-globex-02"
TOKEN_C = "token-acme-0003"
TOKENS = {TOKEN_A: "acme", TOKEN_B: "globex"}
WIDTH, BITS = 0.5, 4
RANK, ALPHA = 4, 8.0
# The adapters target the tail's final Linear (CloudTail.tail.fc); PEFT matches "fc" as a
# suffix of the module path.
TARGET = "tail.fc"
# One attempt: CloudClient retries UNAVAILABLE forever by default, which is exactly the code
# a refused handshake produces, so a failing test would hang instead of failing.
ONE_SHOT = RetryPolicy(max_attempts=1, attempt_timeout_s=20.0)
# Bound on each wait of the forced interleaving below; only reached once the race is fixed.
RACE_WAIT_S = 2.0


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the module: the certificates are read-only inputs."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def payloads(digits_bundle: Path) -> list[bytes]:
    """Codec payloads of a few test digits, encoded by the bundle's head."""
    x = load_data("digits").test.x[:16]
    return HeadRunner.from_bundle(digits_bundle).encode(x, WIDTH, BITS)


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    """A fresh repository per test: adapter tests write into its bundle copy."""
    return make_repo(tmp_path, digits_bundle)


@pytest.fixture()
def tokens_file(tmp_path: Path) -> Path:
    return _write_tokens(tmp_path / "tokens.json", TOKENS)


# ---------------------------------------------------------------------------- helpers


def _write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text(json.dumps(tokens), encoding="utf-8")
    return path


def _cfg(repo: Path, **overrides: Any) -> ServeConfig:
    # No metrics port: these tests never read it, and one listener fewer is less to leak.
    return config(repo, metrics_listen=None, **overrides)


def _request(payload: bytes, request_id: str, **fields: Any) -> pb.InferRequest:
    return pb.InferRequest(
        request_id=request_id,
        model="digits",
        width=WIDTH,
        features=to_message(payload),
        return_logits=True,
        **fields,
    )


def _client(target: str, **security: Any) -> CloudClient:
    return CloudClient(target, security=ClientSecurity(**security), retry=ONE_SHOT, seed=0)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _outcome(call: Awaitable[Any]) -> Any:
    """The call's result, or its status code when it fails."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    result = await _outcome(call)
    return result if isinstance(result, grpc.StatusCode) else grpc.StatusCode.OK


def _publish(bundle: Path, name: str, version: str, *, tenant: str, seed: int) -> Path:
    """Write a LoRA adapter for ``tail.fc`` with seeded random weights; return its directory.

    B is non-zero (unlike PEFT's initialisation) and alpha/r is 2, so the delta dwarfs the
    trained weights and the predictions change.
    """
    fc = TailRunner.from_bundle(bundle).model.get_submodule(TARGET)
    assert isinstance(fc, torch.nn.Linear)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(RANK, fc.in_features, generator=gen)
    b = torch.randn(fc.out_features, RANK, generator=gen)
    path = bundle / "adapters" / name / version
    save_adapter(
        path, lora={TARGET: (a, b)}, rank=RANK, alpha=ALPHA, target_modules=["fc"], tenant=tenant
    )
    return path


def _publish_three(bundle: Path) -> dict[str, Path]:
    """A shared adapter, one of acme's and one of globex's, each with its own weights."""
    return {
        "shared": _publish(bundle, "shared", "1", tenant="", seed=1),
        "acme-a": _publish(bundle, "acme-a", "1", tenant="acme", seed=2),
        "globex-a": _publish(bundle, "globex-a", "1", tenant="globex", seed=3),
    }


def _expected_logits(
    bundle: Path, adapter_dir: Path | None, requests: list[pb.InferRequest]
) -> np.ndarray:
    """Decoder + tail in-process on what the requests carry, with the adapter merged in."""
    tail = TailRunner.from_bundle(bundle)
    decoded = [codec.decode(from_message(r.features)) for r in requests]
    x = torch.from_numpy(np.stack(decoded).astype(np.float32))
    with torch.inference_mode():
        if adapter_dir is None:
            return tail.model(x).numpy()
        adapter = load_adapter(adapter_dir, adapter_dir.parent.name, adapter_dir.name)
        merged = merged_state(tail.model, adapter)
        return functional_call(tail.model, merged, (x,)).numpy()


def _logits(responses: list[pb.InferResponse]) -> np.ndarray:
    return np.array([list(r.logits) for r in responses], dtype=np.float32)


def _assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
    """``got`` is ``want`` up to float32 rounding. Served batches group requests differently
    from run to run, and a sum's rounding error scales with its largest terms: a logit near
    zero in a row of logits near 85 may move by 1e-5. So the absolute tolerance follows the
    logits' magnitude; a wrong adapter or base model moves them by far more."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))


async def _adapters(stub: pb_grpc.SplitInferenceStub, token: str | None) -> set[tuple[str, ...]]:
    listed = await stub.ListAdapters(
        pb.ListAdaptersRequest(model="digits"), metadata=_metadata(token), timeout=20
    )
    return {(a.name, a.version, a.tenant) for a in listed.adapters}


# ---------------------------------------------------------------------------- TLS / mTLS


def test_tls_answers_with_the_right_ca_and_refuses_plain_text_and_a_foreign_ca(
    repo: Path, pki: Pki, payloads: list[bytes]
) -> None:
    cfg = _cfg(repo, tls_cert=pki.server_cert, tls_key=pki.server_key)

    async def main() -> tuple[Any, ...]:
        async with running(cfg) as server:
            async with _client(server.address, ca=pki.ca_cert) as trusted:
                answer = await trusted.infer(_request(payloads[0], "tls-ok"))
                info = await trusted.server_info()
            async with _client(server.address) as plain:
                plain_code = await _code(plain.infer(_request(payloads[0], "tls-plain")))
            async with _client(server.address, ca=pki.other_ca_cert) as foreign:
                foreign_code = await _code(foreign.infer(_request(payloads[0], "tls-foreign")))
            return answer, info, plain_code, foreign_code

    answer, info, plain_code, foreign_code = asyncio.run(main())
    assert answer.attempts == 1 and answer.response.model == "digits"
    assert len(answer.response.top) == 1 and info.tenant == ""
    assert plain_code == grpc.StatusCode.UNAVAILABLE
    assert foreign_code == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_the_ca_signed_client_only(
    repo: Path, pki: Pki, payloads: list[bytes]
) -> None:
    cfg = _cfg(repo, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert)
    clients = {
        "signed": {"ca": pki.ca_cert, "cert": pki.client_cert, "key": pki.client_key},
        "no cert": {"ca": pki.ca_cert},
        "rogue": {"ca": pki.ca_cert, "cert": pki.rogue_client_cert, "key": pki.rogue_client_key},
    }

    async def main() -> dict[str, grpc.StatusCode]:
        codes = {}
        async with running(cfg) as server:
            for name, security in clients.items():
                async with _client(server.address, **security) as client:
                    request = _request(payloads[0], f"mtls-{name}")
                    codes[name] = await _code(client.infer(request))
        return codes

    assert asyncio.run(main()) == {
        "signed": grpc.StatusCode.OK,
        "no cert": grpc.StatusCode.UNAVAILABLE,
        "rogue": grpc.StatusCode.UNAVAILABLE,
    }


# ---------------------------------------------------------------------------- bearer tokens


def test_bearer_tokens_name_the_tenant_and_health_needs_none(
    repo: Path, tokens_file: Path, payloads: list[bytes]
) -> None:
    wrong = "token-wrong-999"

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with running(_cfg(repo, tokens=tokens_file)) as server:
            for name, token in (("none", None), ("wrong", wrong)):
                async with _client(server.address, token=token) as client:
                    out[f"{name} info"] = await _outcome(client.server_info())
                    out[f"{name} infer"] = await _outcome(
                        client.infer(_request(payloads[0], f"tok-{name}"))
                    )
                    try:
                        await client.server_info()
                    except grpc.aio.AioRpcError as exc:
                        out[f"{name} details"] = exc.details() or ""
            for name, token in (("acme", TOKEN_A), ("globex", TOKEN_B)):
                async with _client(server.address, token=token) as client:
                    out[f"{name} tenant"] = (await client.server_info()).tenant
                    answer = await client.infer(_request(payloads[1], f"tok-{name}"))
                    out[f"{name} infer"] = answer.response.model
            # Load balancers and orchestrators probe health without credentials.
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="tandem.v1.SplitInference"), timeout=20
                )
                out["health"] = health.status
        return out

    out = asyncio.run(main())
    for name in ("none", "wrong"):
        assert out[f"{name} info"] == grpc.StatusCode.UNAUTHENTICATED
        assert out[f"{name} infer"] == grpc.StatusCode.UNAUTHENTICATED
    # Tokens are secrets: a refusal must not echo the one presented.
    assert wrong not in out["wrong details"]
    assert out["acme tenant"] == "acme" and out["acme infer"] == "digits"
    assert out["globex tenant"] == "globex" and out["globex infer"] == "digits"
    assert out["health"] == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------- adapters


def test_tenant_uses_own_and_shared_adapters_and_is_denied_others(
    repo: Path, tokens_file: Path, payloads: list[bytes]
) -> None:
    bundle = repo / "digits"
    paths = _publish_three(bundle)
    n = len(payloads)
    asks: dict[str, list[pb.InferRequest]] = {
        adapter: [
            _request(p, f"{adapter or 'base'}-{i}", adapter=adapter) for i, p in enumerate(payloads)
        ]
        for adapter in ("", "shared", "acme-a")
    }

    # One worker: concurrent batches with adapters corrupt each other's weights (see
    # test_concurrent_adapter_batches_keep_their_own_weights); this test checks the tenant
    # rules and the merged arithmetic, so it keeps batches one at a time.
    cfg = _cfg(repo, tokens=tokens_file, workers=1)

    async def main() -> tuple[Any, ...]:
        async with (
            running(cfg) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.SplitInferenceStub(channel)
            async with _client(server.address, token=TOKEN_A) as acme:
                answers = {
                    adapter: [a.response for a in await asyncio.gather(*map(acme.infer, reqs))]
                    for adapter, reqs in asks.items()
                }
                denied = await _code(acme.infer(_request(payloads[0], "steal", adapter="globex-a")))
                # Naming the version too must not get around the tenant check.
                denied_versioned = await _code(
                    acme.infer(
                        _request(payloads[0], "steal-v", adapter="globex-a", adapter_version="1")
                    )
                )
            async with _client(server.address, token=TOKEN_B) as globex:
                globex_denied = await _code(
                    globex.infer(_request(payloads[0], "steal", adapter="acme-a"))
                )
            listed = {t: await _adapters(stub, t) for t in (TOKEN_A, TOKEN_B)}
            return answers, denied, denied_versioned, globex_denied, listed

    answers, denied, denied_versioned, globex_denied, listed = asyncio.run(main())
    assert denied == denied_versioned == globex_denied == grpc.StatusCode.PERMISSION_DENIED
    assert listed[TOKEN_A] == {("shared", "1", ""), ("acme-a", "1", "acme")}
    assert listed[TOKEN_B] == {("shared", "1", ""), ("globex-a", "1", "globex")}

    base = answers[""]
    assert all(r.adapter == "" and r.adapter_version == "" for r in base)
    _assert_same_logits(_logits(base), _expected_logits(bundle, None, asks[""]))
    for adapter in ("shared", "acme-a"):
        got = answers[adapter]
        assert len(got) == n
        assert all(r.adapter == adapter and r.adapter_version == "1" for r in got)
        want = _expected_logits(bundle, paths[adapter], asks[adapter])
        _assert_same_logits(_logits(got), want)
        # The adapter really is applied: some prediction moves away from the base model's.
        assert (_logits(got).argmax(1) != _logits(base).argmax(1)).any()
    # Distinct weights give distinct answers: the server did not mix up the two adapters.
    assert not np.allclose(_logits(answers["shared"]), _logits(answers["acme-a"]))


def test_without_auth_only_shared_adapters_are_usable(repo: Path, payloads: list[bytes]) -> None:
    _publish_three(repo / "digits")

    async def main() -> tuple[Any, ...]:
        async with (
            running(_cfg(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.SplitInferenceStub(channel)
            codes = {
                name: await _code(stub.Infer(_request(payloads[0], name, adapter=name), timeout=20))
                for name in ("shared", "acme-a", "globex-a")
            }
            info = await stub.GetServerInfo(pb.ServerInfoRequest(), timeout=20)
            return codes, await _adapters(stub, None), info.tenant

    codes, listed, tenant = asyncio.run(main())
    assert tenant == ""
    assert codes == {
        "shared": grpc.StatusCode.OK,
        "acme-a": grpc.StatusCode.PERMISSION_DENIED,
        "globex-a": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert listed == {("shared", "1", "")}


def test_new_adapter_version_dropped_in_is_picked_up(
    repo: Path, tokens_file: Path, payloads: list[bytes]
) -> None:
    bundle = repo / "digits"
    _publish(bundle, "acme-a", "1", tenant="acme", seed=2)
    # No timer scans (poll_s) and no rate limit on miss rescans: only the request that names
    # the unknown version can make the server look again, so the test is deterministic.
    cfg = _cfg(repo, tokens=tokens_file, poll_s=3600, miss_rescan_s=0)

    async def main() -> tuple[Any, ...]:
        async with (
            running(cfg) as server,
            grpc.aio.insecure_channel(server.address) as channel,
            _client(server.address, token=TOKEN_A) as acme,
        ):
            stub = pb_grpc.SplitInferenceStub(channel)
            first = (await acme.infer(_request(payloads[0], "v-1", adapter="acme-a"))).response
            _publish(bundle, "acme-a", "2", tenant="acme", seed=4)
            named = await acme.infer(
                _request(payloads[0], "v-2", adapter="acme-a", adapter_version="2")
            )
            newest = await acme.infer(_request(payloads[0], "v-new", adapter="acme-a"))
            return first, named.response, newest.response, await _adapters(stub, TOKEN_A)

    first, named, newest, listed = asyncio.run(main())
    assert (first.adapter, first.adapter_version) == ("acme-a", "1")
    assert (named.adapter, named.adapter_version) == ("acme-a", "2")
    # Without a version the newest one is served now that the server knows of it.
    assert (newest.adapter, newest.adapter_version) == ("acme-a", "2")
    assert list(newest.logits) == list(named.logits)
    assert not np.allclose(first.logits, named.logits)
    assert listed == {("acme-a", "1", "acme"), ("acme-a", "2", "acme")}


def test_adapter_scanned_while_being_saved_stays_with_its_tenant(
    repo: Path, tokens_file: Path, payloads: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = repo / "digits"
    cfg = _cfg(repo, tokens=tokens_file, poll_s=3600, miss_rescan_s=0)

    async def main() -> grpc.StatusCode:
        async with running(cfg) as server, _client(server.address, token=TOKEN_B) as globex:
            _save_with_a_scan_after_the_weights(monkeypatch, server)
            _publish(bundle, "acme-a", "1", tenant="acme", seed=2)
            # A later full scan (the poller's) must see acme's tenant file by now.
            await server.rescan(force=True)
            return await _code(globex.infer(_request(payloads[0], "race", adapter="acme-a")))

    assert asyncio.run(main()) == grpc.StatusCode.PERMISSION_DENIED


def _save_with_a_scan_after_the_weights(mp: pytest.MonkeyPatch, server: CloudServer) -> None:
    """Make the server's repository scan run right after save_adapter writes the weights.

    This is the interleaving the poller's timer (or a request's miss rescan) can hit while
    an operator publishes an adapter: the config and weights exist, tandem.json does not yet.
    """
    original = tandem.adapters.save_file

    def save_then_scan(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        server.repo.scan()

    mp.setattr(tandem.adapters, "save_file", save_then_scan)


class _Interleaving:
    """Forces one order on the acme and globex batches' tail passes.

    The forward pre-hook on the tail model runs right after a pass has put its weights in
    place. acme's pass goes first and waits there until globex's pass has put its own in;
    globex's then waits until acme's pass is over, and only then computes. Roles come from
    the batch key, not from arrival order, so the order is the same on every run. Waits are
    bounded: a server that serialises its passes, or gives each worker its own model, just
    runs on after at most RACE_WAIT_S.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.first_in = threading.Event()
        self.second_in = threading.Event()
        self.first_left = threading.Event()

    def pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        role = getattr(self._local, "role", None)
        if role == "first":
            self.first_in.set()
            self.second_in.wait(RACE_WAIT_S)
        elif role == "second":
            self.second_in.set()
            self.first_left.wait(RACE_WAIT_S)

    def wrap(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``run_targets`` with roles, from the adapter the batch's targets name."""

        def wrapped(targets: Any) -> Any:
            adapter = targets[0].adapter.name if targets[0].adapter else ""
            role = {"acme-a": "first", "globex-a": "second"}.get(adapter)
            self._local.role = role
            if role == "second":
                self.first_in.wait(RACE_WAIT_S)
            try:
                return run(targets)
            finally:
                self._local.role = None
                if role == "first":
                    self.first_left.set()

        return wrapped


def test_concurrent_adapter_batches_keep_their_own_weights(
    repo: Path, tokens_file: Path, payloads: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = repo / "digits"
    paths = _publish_three(bundle)
    acme_ask = _request(payloads[0], "acme-0", adapter="acme-a")
    globex_ask = _request(payloads[0], "globex-0", adapter="globex-a")
    base_ask = _request(payloads[0], "base-0")
    race = _Interleaving()
    # The thread backend calls this function per batch: wrapping it gives each worker its
    # role and tells the hook when a whole pass is over.
    monkeypatch.setattr(
        tandem.cloud.compute, "run_targets", race.wrap(tandem.cloud.compute.run_targets)
    )
    # One request per batch: requests naming different adapters would otherwise share one.
    cfg = _cfg(repo, tokens=tokens_file, workers=2, poll_s=3600, max_batch=1)

    async def main() -> tuple[pb.InferResponse, ...]:
        async with running(cfg) as server:
            model = server.repo.resolve("digits").runner.model
            hook = model.register_forward_pre_hook(race.pre_hook)
            try:
                async with (
                    _client(server.address, token=TOKEN_A) as acme,
                    _client(server.address, token=TOKEN_B) as globex,
                ):
                    # Two batches, one on each worker.
                    mine, theirs = await asyncio.gather(
                        acme.infer(acme_ask), globex.infer(globex_ask)
                    )
            finally:
                hook.remove()
            async with _client(server.address, token=TOKEN_A) as acme:
                base = await acme.infer(base_ask)
            return mine.response, theirs.response, base.response

    mine, theirs, base = asyncio.run(main())
    _assert_same_logits(_logits([mine]), _expected_logits(bundle, paths["acme-a"], [acme_ask]))
    _assert_same_logits(
        _logits([theirs]), _expected_logits(bundle, paths["globex-a"], [globex_ask])
    )
    # The base model must come out of it unchanged, for every tenant's later requests.
    _assert_same_logits(_logits([base]), _expected_logits(bundle, None, [base_ask]))


# ---------------------------------------------------------------------------- SIGHUP / SIGTERM


def test_sighup_reloads_tokens_and_sigterm_drains_a_real_process(
    repo: Path, tokens_file: Path
) -> None:
    args = ["--models", str(repo), "--listen", "127.0.0.1:0", "--metrics-listen", "off"]
    with server_process(*args, "--tokens", str(tokens_file)) as (proc, ready):
        address = ready["address"]
        assert ready["auth"] is True

        async def tenant(token: str) -> Any:
            async with _client(address, token=token) as client:
                result = await _outcome(client.server_info(timeout=10))
                return result if isinstance(result, grpc.StatusCode) else result.tenant

        async def main() -> dict[str, Any]:
            out = {"a before": await tenant(TOKEN_A), "c before": await tenant(TOKEN_C)}
            _write_tokens(tokens_file, {TOKEN_C: "acme", TOKEN_B: "globex"})
            proc.send_signal(signal.SIGHUP)
            # The reload happens in the server's event loop at some point after the signal:
            # poll for it, bounded, rather than guessing a sleep.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (c_after := await tenant(TOKEN_C)) != "acme" and loop.time() < deadline:
                await asyncio.sleep(0.05)
            out["c after"] = c_after
            out["a after"] = await tenant(TOKEN_A)
            out["b after"] = await tenant(TOKEN_B)
            return out

        out = asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)

    assert out == {
        "a before": "acme",
        "c before": grpc.StatusCode.UNAUTHENTICATED,
        "c after": "acme",
        "a after": grpc.StatusCode.UNAUTHENTICATED,
        "b after": "globex",
    }
    assert code == 0


# ---------------------------------------------------------------------------- plain text


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:50051"])
def test_plain_text_off_loopback_needs_insecure(repo: Path, listen: str) -> None:
    with pytest.raises(ValidationError, match="--insecure"):
        ServeConfig(models=repo, listen=listen)
    assert ServeConfig(models=repo, listen=listen, insecure=True).insecure


def test_plain_text_on_loopback_and_tls_anywhere_are_allowed(repo: Path, pki: Pki) -> None:
    for listen in ("127.0.0.1:0", "localhost:0", "[::1]:0"):
        assert not ServeConfig(models=repo, listen=listen).tls
    tls = ServeConfig(
        models=repo, listen="0.0.0.0:0", tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    assert tls.tls


def test_cli_refuses_plain_text_off_loopback(repo: Path) -> None:
    command = [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--models", str(repo)]
    # The timeout bounds the test should the server start listening instead of refusing.
    done = subprocess.run(
        [*command, "--listen", "0.0.0.0:0", "--metrics-listen", "off"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tandem: error:")
    assert "--insecure" in lines[0]


# ---------------------------------------------------------------------------- message size


def test_message_size_limit_is_enforced(repo: Path, payloads: list[bytes]) -> None:
    limit = 16384
    big = _request(payloads[0], "big")
    # Past the limit by a margin: rejected by gRPC before the servicer sees it.
    big.features.payload = bytes(range(256)) * 80
    assert big.ByteSize() > limit

    async def main() -> tuple[Any, ...]:
        async with (
            running(_cfg(repo, max_message_bytes=limit)) as server,
            _client(server.address) as client,
        ):
            refused = await _code(client.infer(big))
            answer = await client.infer(_request(payloads[0], "small"))
            info = await client.server_info()
            return refused, answer.response, info.max_message_bytes

    refused, response, advertised = asyncio.run(main())
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert response.request_id == "small" and len(response.top) == 1
    assert advertised == limit


def test_a_token_revoked_while_a_stream_is_open_stops_working_on_that_stream(
    repo: Path, tmp_path: Path, payloads: list[bytes]
) -> None:
    tokens = _write_tokens(tmp_path / "tokens.json", TOKENS)

    async def main() -> tuple[pb.StreamResult, pb.StreamResult]:
        async with (
            running(_cfg(repo, tokens=tokens)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = pb_grpc.SplitInferenceStub(channel).InferStream(
                metadata=_metadata(TOKEN_A), timeout=30
            )
            await call.write(_request(payloads[0], "before"))
            before = await call.read()
            _write_tokens(tokens, {TOKEN_B: "globex"})
            assert server.reload_tokens()
            await call.write(_request(payloads[1], "after"))
            after = await call.read()
            await call.done_writing()
            return before, after

    before, after = asyncio.run(main())
    assert before.HasField("response")
    assert after.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_another_tenants_newer_version_does_not_change_which_version_a_tenant_gets(
    repo: Path, tokens_file: Path, payloads: list[bytes]
) -> None:
    bundle = repo / "digits"
    _publish(bundle, "x", "1", tenant="acme", seed=5)
    _publish(bundle, "x", "2", tenant="globex", seed=6)

    async def main() -> tuple[pb.InferResponse, Any]:
        async with running(_cfg(repo, tokens=tokens_file)) as server:
            async with _client(server.address, token=TOKEN_A) as acme:
                mine = (await acme.infer(_request(payloads[0], "a", adapter="x"))).response
                theirs = await _outcome(
                    acme.infer(_request(payloads[0], "b", adapter="x", adapter_version="2"))
                )
            return mine, theirs

    mine, theirs = asyncio.run(main())
    assert (mine.adapter, mine.adapter_version) == ("x", "1")
    assert theirs == grpc.StatusCode.PERMISSION_DENIED


def test_the_edge_daemon_serves_over_mtls_with_a_token_file(
    repo: Path, tmp_path: Path, pki: Pki, tokens_file: Path
) -> None:
    from tandem.edge.config import DaemonConfig
    from tandem.edge.daemon import EdgeDaemon

    test = load_data("digits").test
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"input": x.tolist(), "label": int(y)}) + "\n" for x, y in zip(
            test.x[:8], test.y[:8], strict=True))
    )  # fmt: skip
    token = tmp_path / "token"
    token.write_text(TOKEN_A + "\n")
    server_cfg = _cfg(
        repo, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert,
        tokens=tokens_file,
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        async with running(server_cfg) as server:
            daemon = DaemonConfig(
                bundle=repo / "digits", cloud=f"localhost:{server.port}",
                source=f"jsonl:{source}", sink=str(tmp_path / "out.jsonl"), width=WIDTH,
                bits=BITS, fallback=False, ca=pki.ca_cert, cert=pki.client_cert,
                key=pki.client_key, token_file=token,
            )  # fmt: skip
            return await EdgeDaemon(daemon).run()

    summary = asyncio.run(main())
    assert summary["served"] == 8 and summary["errors"] == 0
