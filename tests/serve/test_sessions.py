"""The session table: ids, expiry, bounds and the errors that name the id."""

from __future__ import annotations

import pytest

from serve import sessions as ss


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _table(**kw):
    ended = []
    clock = Clock()
    t = ss.SessionTable(worker=kw.pop("worker", 3), ttl_s=kw.pop("ttl_s", 60), max_sessions=kw.pop("max", 4),
                        on_end=ended.append, clock=clock)
    return t, clock, ended


def test_ids_match_botocore_pattern_and_name_their_worker():
    t, _, _ = _table(worker=3)
    ids = {t.open().id for _ in range(4)}
    assert len(ids) == 4
    for sid in ids:
        assert ss.ID_PATTERN.match(sid) and len(sid) <= ss.MAX_ID_LEN
        assert ss.owner_of(sid) == 3
    assert ss.owner_of("client-made-id") is None


@pytest.mark.parametrize("raw", ["", "-x", "x-", "a b", "a_b", "x" * 257, "é"])
def test_malformed_ids_are_400(raw):
    with pytest.raises(ss.SessionError) as e:
        ss.check_id(raw)
    assert e.value.status == 400


def test_check_id_accepts_new_session_and_issued_ids():
    assert ss.check_id(" NEW_SESSION ") == ss.NEW_SESSION
    assert ss.check_id("w0-" + "a" * 32) == "w0-" + "a" * 32


def test_conversation_kept_between_turns_and_close_releases():
    t, _, ended = _table()
    s = t.open()
    got = t.acquire(s.id)
    t.release(got, ids=(1, 2, 3), messages=[{"role": "user", "content": "hi"}])
    again = t.acquire(s.id)
    assert again.ids == (1, 2, 3) and again.turns == 1 and again.messages[0]["content"] == "hi"
    t.release(again)
    closed = t.close(s.id)
    assert closed is s and ended == [s] and len(t) == 0
    with pytest.raises(ss.SessionError) as e:
        t.acquire(s.id)
    assert e.value.status == 410 and s.id in e.value.message and "closed" in e.value.message


def test_unknown_id_is_404_naming_it():
    t, _, _ = _table()
    with pytest.raises(ss.SessionError) as e:
        t.acquire("w3-" + "0" * 32)
    assert e.value.status == 404 and "w3-" + "0" * 32 in e.value.message


def test_idle_sessions_expire_and_use_refreshes():
    t, clock, ended = _table(ttl_s=60)
    a, b = t.open(), t.open()
    clock.t += 50
    t.release(t.acquire(a.id))  # a used at +50: lives until +110
    clock.t += 20  # +70: b idle for 70 s
    t.sweep()
    assert ended == [b] and len(t) == 1
    with pytest.raises(ss.SessionError) as e:
        t.acquire(b.id)
    assert e.value.status == 410 and "expired" in e.value.message
    clock.t += 100
    assert t.sweep() == [a]


def test_a_running_session_never_expires_under_its_request():
    t, clock, ended = _table(ttl_s=10)
    s = t.open()
    t.acquire(s.id)
    clock.t += 100
    assert t.sweep() == [] and not ended
    t.release(s)
    clock.t += 11
    assert t.sweep() == [s]


def test_one_request_at_a_time_per_session():
    t, _, _ = _table()
    s = t.open()
    t.acquire(s.id)
    with pytest.raises(ss.SessionError) as e:
        t.acquire(s.id)
    assert e.value.status == 409


def test_number_of_sessions_is_bounded():
    t, clock, _ = _table(max=2, ttl_s=5)
    t.open(), t.open()
    with pytest.raises(ss.SessionError) as e:
        t.open()
    assert e.value.status == 429 and "SESSION_MAX" in e.value.message
    clock.t += 6  # both idle past their expiry: room again
    t.open()
    assert len(t) == 1


def test_expires_text_is_utc_iso():
    assert ss.expires_text(0) == "1970-01-01T00:00:00Z"


def test_a_resent_history_with_tool_calls_is_not_appended_twice():
    """The session keeps its answer as generated (`<tool_call>` markup); an OpenAI client sends it back as
    tool_calls with JSON-encoded arguments: the same message, so the history is taken once."""
    t, _, _ = _table()
    s = t.open()
    user = {"role": "user", "content": "weather?"}
    s.messages = [user, {"role": "assistant", "content":
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": 1}}\n</tool_call>'}]
    turn = ss.Turn(s, t, engine=None)
    echoed = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"n": 1, "city": "Paris"}'}}]}
    tool = {"role": "tool", "content": "20 C", "tool_call_id": "call_1"}
    assert turn.chat_messages([user, echoed, tool]) == [user, echoed, tool]
    # other arguments are another message: the new ones are a continuation
    other = {**echoed, "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Lima", "n": 1}}}]}
    assert turn.chat_messages([user, other, tool]) == [*s.messages, user, other, tool]
    assert turn.chat_messages([tool]) == [*s.messages, tool]  # only the new turn: appended
# ---- a table on disk (serve/session_store.py): what a restarted worker finds ----------------------------------

def _disk_table(folder, clock, worker=3, max=4, ttl_s=60):
    ended = []
    t = ss.SessionTable(worker=worker, ttl_s=ttl_s, max_sessions=max, on_end=ended.append, clock=clock,
                        store_dir=str(folder))
    return t, ended


def _errors(t, sid) -> tuple[int, str]:
    with pytest.raises(ss.SessionError) as e:
        t.acquire(sid)
    return e.value.status, e.value.error_type


def test_a_restarted_table_finds_its_sessions_as_they_were(tmp_path):
    clock = Clock()
    t, _ = _disk_table(tmp_path, clock)
    live, closed, idle = t.open(), t.open(), t.open()
    s = t.acquire(live.id)
    t.release(s, ids=(5, 6, 7), messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    t.close(closed.id)
    clock.t += 30
    t.release(t.acquire(live.id))  # its clock restarts; idle's does not
    clock.t += 40  # idle is past its expiry now (nobody swept it before the "kill")
    t2, ended = _disk_table(tmp_path, clock)  # the restarted worker: a new table on the same folder
    assert len(t2) == 1 and t2.counters["restored"] == 2 and [e.id for e in ended] == [idle.id]
    got = t2.acquire(live.id)
    assert got.ids == (5, 6, 7) and got.turns == 1 and got.messages[1]["content"] == "yo"
    assert got.expires_at == clock.t + 60
    t2.release(got)
    assert _errors(t2, closed.id) == (410, "session_closed")
    assert _errors(t2, idle.id) == (410, "session_expired")
    assert set(t2.ended_ids()) == {closed.id, idle.id}
    clock.t += 61  # expiry holds after the restart as before
    t2.sweep()
    t3, _ = _disk_table(tmp_path, clock)
    assert len(t3) == 0 and _errors(t3, live.id) == (410, "session_expired")
    tombstone = (tmp_path / f"{live.id}.json").read_text()
    assert "5," not in tombstone and "yo" not in tombstone  # an ended session's conversation is not kept


def test_the_limit_holds_across_a_restart_and_other_workers_sessions_stay_out(tmp_path):
    clock = Clock()
    t, _ = _disk_table(tmp_path, clock, max=2)
    t.open(), t.open()
    other, _ = _disk_table(tmp_path, clock, worker=4, max=2)  # same folder, another index: loads none of them
    assert len(other) == 0
    t2, _ = _disk_table(tmp_path, clock, max=2)
    assert len(t2) == 2
    with pytest.raises(ss.SessionError) as e:
        t2.open()
    assert e.value.status == 429


def test_without_the_disk_tier_the_table_stays_in_memory(tmp_path):
    from serve.config import load_config
    from serve.server_state import ServerState

    on = ServerState(load_config({"SNAPSHOT_DISK_DIR": str(tmp_path)}))
    assert on.sessions.durable and (tmp_path / "w0" / "sessions").is_dir()
    assert on.config.engine.snapshot_disk_dir == str(tmp_path / "w0")
    off = ServerState(load_config({"SNAPSHOT_DISK_DIR": str(tmp_path / "off"), "SNAPSHOT_DISK_BYTES": "0"}))
    assert not off.sessions.durable and not (tmp_path / "off").exists()
    s = off.sessions.open()
    assert off.sessions.acquire(s.id) is s
