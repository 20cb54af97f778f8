"""Accounts, token usage and the admin's credit call."""

from __future__ import annotations

from flask import Blueprint, current_app, request

from vramq.jobs import idempotency, ledger
from vramq.jobs.accounts import create_account, get_account
from vramq.jobs.db import writing
from vramq.jobs.errors import InputError
from vramq.jobs.views import iso

from .callers import client_address, current_caller, network_of, require_account, require_admin
from .guards import json_body
from .queries import limit_arg

bp = Blueprint("accounts", __name__)


def _services():
    return current_app.config["VRAMQ"]


def _body() -> dict:
    """The JSON object sent (strict, within the size limit: api.guards); {} for none."""
    body = json_body(empty={}, syntax_status=422)
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", [{"loc": [], "msg": "must be a JSON object"}])
    return body


def _only(body: dict, allowed: set[str]) -> None:
    """422 naming the first field the body has that the call does not take."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(
            f"unknown field {unknown[0]!r}", [{"loc": [unknown[0]], "msg": "extra inputs are not permitted"}]
        )


def _account_json(account) -> dict:
    return {
        "object": "account",
        "account_id": account.id,
        "name": account.name,
        "tier": account.tier,
        "key_prefix": account.key_prefix,
        "created_at": iso(account.created_at),
    }


@bp.post("/v1/accounts")
def create():
    """A free account. The API key is in this answer only: it is stored hashed.

    Each account is a new daily allowance, so accounts are counted per network (an IPv4
    address, an IPv6 /64) per day: at most ``VRAMQ_ACCOUNTS_PER_DAY`` (429 past it). The
    admin key is not counted; ``vramq accounts create`` makes accounts without limit."""
    body = _body()
    _only(body, {"name"})
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InputError("name must be a string", [{"loc": ["name"], "msg": "must be a string"}])
    if not current_caller().admin:
        current_app.extensions["vramq.limiter"].count_account(network_of(client_address()))
    with _services().sessions.begin() as session:
        account, key = create_account(session, name=name)
    return {**_account_json(account), "api_key": key}, 201


@bp.get("/v1/account")
def me():
    """The calling account (``key_prefix`` tells keys apart; the key itself is never shown again)."""
    caller = require_account("this call")
    with _services().sessions() as session:
        return (
            _account_json(get_account(session, caller.account_id))
            if caller.account_id is not None
            else {"object": "admin"}
        )


@bp.get("/v1/usage")
def usage():
    """Today's allowance, what is used of it, the purchased balance, and when it resets."""
    services = _services()
    caller = current_caller()
    with services.sessions() as session:
        return ledger.usage(session, caller.id, caller.tier, services.allowances, services.now()).to_json()


@bp.post("/v1/admin/accounts/<account_id>/credit")
def credit(account_id: str):
    """Add a token pack to an account's balance. Send an ``Idempotency-Key``: a retried
    credit with the same key is not counted twice."""
    require_admin()
    services = _services()
    body = _body()
    _only(body, {"tokens", "reason"})
    if "tokens" not in body:
        raise InputError("tokens is required", [{"loc": ["tokens"], "msg": "field required"}])

    def credit_once(remember: idempotency.Remember) -> None:
        now = services.now()
        with writing(services.sessions) as session:
            account = get_account(session, account_id)
            row = ledger.credit(session, account.id, body["tokens"], body.get("reason"), now)
            remember(session, str(row.id))

    # A retried credit (the same key and body, or the same key sent twice at once) is
    # answered as replayed and counted once. Its key is stored under the caller
    # ``credit:<account id>``, a namespace of its own: never the admin's own keys, nor the
    # account's (the account's keys are under its id).
    _, credited = idempotency.once(
        services,
        f"credit:{account_id}",
        request.headers.get("Idempotency-Key"),
        body,
        credit_once,
        lambda _entry_id: None,
    )
    if not credited:
        return _credited(services, account_id, replayed=True)
    return _credited(services, account_id, replayed=False), 201


def _credited(services, account_id: str, replayed: bool) -> dict:
    with services.sessions() as session:
        account = get_account(session, account_id)
        use = ledger.usage(session, account.id, account.tier, services.allowances, services.now())
    return {"account_id": account_id, "balance": use.balance, "replayed": replayed}


@bp.get("/v1/admin/accounts/<account_id>")
def show(account_id: str):
    """An account with its usage and latest ledger entries (admin only)."""
    require_admin()
    services = _services()
    with services.sessions() as session:
        account = get_account(session, account_id)
        use = ledger.usage(session, account.id, account.tier, services.allowances, services.now())
        rows = ledger.entries(session, account.id, limit=limit_arg(500, 50))
    return {**_account_json(account), "usage": use.to_json(), "ledger": [entry_json(r) for r in rows]}


def entry_json(row) -> dict:
    return {
        "id": row.id,
        "entry": row.entry,
        "job_id": row.job_id,
        "day": row.day,
        "allowance_delta": row.allowance_delta,
        "balance_delta": row.balance_delta,
        "reason": row.reason,
        "created_at": iso(row.created_at),
    }
