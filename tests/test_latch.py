"""The Latch: per-account ARMED -> TRIPPED state machine, reset, restore."""

from __future__ import annotations

from killswitch.latch import Latch, TripRecord

ACCOUNTS = ("BINANCE", "KRAKEN/JOHN", "COINBASE")
FIRST = TripRecord(trip_id="t1", source="signal", reason="first", time=100.0)
SECOND = TripRecord(trip_id="t2", source="webhook", reason="second", time=200.0)


def test_latch_starts_with_every_account_armed():
    """A new latch knows its accounts and has nothing tripped."""
    latch = Latch(ACCOUNTS)
    assert latch.accounts == ACCOUNTS
    assert latch.tripped_accounts == ()
    assert not latch.is_any_tripped
    assert latch.last_trip is None
    assert all(latch.record(a) is None and not latch.is_tripped(a) for a in ACCOUNTS)


def test_latch_trip_latches_only_the_named_accounts():
    """Tripping two accounts latches those two, in configuration order."""
    latch = Latch(ACCOUNTS)
    latch.trip(["COINBASE", "BINANCE"], FIRST)
    assert latch.tripped_accounts == ("BINANCE", "COINBASE")
    assert latch.is_tripped("BINANCE")
    assert not latch.is_tripped("KRAKEN/JOHN")
    assert latch.is_any_tripped
    assert latch.record("COINBASE") == FIRST


def test_latch_trip_keeps_the_first_record_of_a_tripped_account():
    """A second trip leaves an account's first record but becomes the last trip."""
    latch = Latch(ACCOUNTS)
    latch.trip(["BINANCE"], FIRST)
    latch.trip(["BINANCE", "KRAKEN/JOHN"], SECOND)
    assert latch.record("BINANCE") == FIRST
    assert latch.record("KRAKEN/JOHN") == SECOND
    assert latch.last_trip == SECOND


def test_latch_reset_returns_what_was_tripped_and_arms_it():
    """Reset arms the named accounts and returns only those that were tripped."""
    latch = Latch(ACCOUNTS)
    latch.trip(["BINANCE", "KRAKEN/JOHN"], FIRST)
    assert latch.reset(["KRAKEN/JOHN", "COINBASE"]) == ("KRAKEN/JOHN",)
    assert latch.tripped_accounts == ("BINANCE",)
    assert latch.reset(ACCOUNTS) == ("BINANCE",)
    assert not latch.is_any_tripped
    assert latch.reset(ACCOUNTS) == ()


def test_latch_reset_then_trip_records_the_new_trip():
    """After a reset the next trip's record is the one kept."""
    latch = Latch(ACCOUNTS)
    latch.trip(["BINANCE"], FIRST)
    latch.reset(["BINANCE"])
    latch.trip(["BINANCE"], SECOND)
    assert latch.record("BINANCE") == SECOND


def test_latch_reset_of_an_unknown_account_changes_nothing():
    """Resetting an account the latch does not know neither fails nor adds it."""
    latch = Latch(ACCOUNTS)
    latch.trip(["BINANCE"], FIRST)
    assert latch.reset(["NOPE"]) == ()
    assert latch.accounts == ACCOUNTS
    assert latch.tripped_accounts == ("BINANCE",)


def test_latch_add_accounts_keeps_existing_latches():
    """A reload adds new accounts armed and leaves tripped ones tripped."""
    latch = Latch(ACCOUNTS)
    latch.trip(["BINANCE"], FIRST)
    latch.add_accounts(["BINANCE", "BITSTAMP/2574"])
    assert latch.accounts == (*ACCOUNTS, "BITSTAMP/2574")
    assert latch.record("BINANCE") == FIRST
    assert not latch.is_tripped("BITSTAMP/2574")


def test_latch_restore_latches_persisted_accounts_with_their_records():
    """Restore latches each account with its persisted record; the newest is last."""
    latch = Latch(ACCOUNTS)
    latch.restore({"KRAKEN/JOHN": SECOND, "BINANCE": FIRST})
    assert latch.tripped_accounts == ("BINANCE", "KRAKEN/JOHN")
    assert latch.record("KRAKEN/JOHN") == SECOND
    assert latch.record("BINANCE") == FIRST
    assert latch.last_trip == SECOND


def test_latch_restore_then_trip_keeps_the_restored_record():
    """A start-up sweep after a restore does not overwrite why the account tripped."""
    latch = Latch(ACCOUNTS)
    latch.restore({"BINANCE": FIRST})
    latch.trip(ACCOUNTS, SECOND)
    assert latch.record("BINANCE") == FIRST
    assert latch.record("COINBASE") == SECOND
    assert latch.last_trip == SECOND
