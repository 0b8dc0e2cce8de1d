"""gunicorn settings and hooks, imported under a chosen environment (no server started here)."""

import importlib
import os
import types

import pytest


def load_conf(monkeypatch, **env):
    for key in list(os.environ):
        if key.startswith(("SAGEMAKER_", "SM_", "CUDA_", "MAX_", "DEVICE", "HOST", "PORT")):
            monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import serve.gunicorn_conf as conf

    return importlib.reload(conf)


def test_settings_for_sagemaker(monkeypatch):
    conf = load_conf(monkeypatch, SAGEMAKER_BIND_TO_PORT="9123")
    assert conf.bind == ["0.0.0.0:9123"]
    assert conf.worker_class == "gthread" and conf.preload_app is False
    assert conf.workers == 1 and conf.threads >= 256
    assert conf.timeout >= 600  # model load happens in the background, batch requests may run 600 s+
    assert 0 < conf.graceful_timeout < 30  # SageMaker sends SIGKILL 30 s after SIGTERM
    assert conf.wsgi_app == "serve.app:create_app()"


def test_workers_follow_gpus_and_override(monkeypatch):
    assert load_conf(monkeypatch, SM_NUM_GPUS="4").workers == 4
    assert load_conf(monkeypatch, SM_NUM_GPUS="4", SAGEMAKER_MODEL_SERVER_WORKERS="2").workers == 2
    assert load_conf(monkeypatch, HOST="::1", PORT="8000").bind == ["[::1]:8000"]


def test_each_worker_gets_its_own_gpu(monkeypatch):
    conf = load_conf(monkeypatch, CUDA_VISIBLE_DEVICES="3,5")
    assert conf.workers == 2
    server = types.SimpleNamespace(WORKERS={})
    workers = []
    for pid in (101, 102):
        w = types.SimpleNamespace(pid=pid)
        conf.pre_fork(server, w)  # master
        server.WORKERS[pid] = w
        workers.append(w)
    assert sorted(w.worker_index for w in workers) == [0, 1]
    del server.WORKERS[101]  # worker on GPU index 0 died: its replacement takes that GPU
    respawn = types.SimpleNamespace(pid=103)
    conf.pre_fork(server, respawn)
    assert respawn.worker_index == workers[0].worker_index
    conf.post_fork(server, respawn)  # in the worker, before torch is imported
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ("3", "5")[workers[0].worker_index]


def test_no_gpus_no_pinning(monkeypatch):
    conf = load_conf(monkeypatch)
    w = types.SimpleNamespace(pid=1)
    conf.pre_fork(types.SimpleNamespace(WORKERS={}), w)
    conf.post_fork(None, w)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_exit_hooks_drain_the_engine(monkeypatch):
    conf = load_conf(monkeypatch)
    calls = []
    state = types.SimpleNamespace(shutdown=lambda timeout: calls.append(timeout))
    worker = types.SimpleNamespace(wsgi=types.SimpleNamespace(extensions={"granite": state}))
    conf.worker_exit(None, worker)
    conf.worker_int(worker)
    assert len(calls) == 2 and all(t > 0 for t in calls)
    conf.worker_exit(None, types.SimpleNamespace())  # a worker that never loaded the app


@pytest.fixture(autouse=True)
def restore_conf(monkeypatch):
    from serve import affinity

    monkeypatch.setattr(affinity, "this_worker", None)  # post_fork sets it: later tests' apps are single-worker
    yield
    import serve.gunicorn_conf as conf

    importlib.reload(conf)


def test_workers_know_their_index_for_session_forwarding(monkeypatch):
    from serve import affinity

    conf = load_conf(monkeypatch, SAGEMAKER_MODEL_SERVER_WORKERS="2", DEVICE="cpu")
    monkeypatch.setattr(affinity, "this_worker", None)  # restored to None after the test: later apps are single
    server = types.SimpleNamespace(WORKERS={})
    conf.on_starting(server)
    try:
        seen = []
        for pid in (201, 202):
            w = types.SimpleNamespace(pid=pid)
            conf.pre_fork(server, w)
            server.WORKERS[pid] = w
            conf.post_fork(server, w)  # (each in its own process in real life)
            seen.append(affinity.this_worker)
        assert [s.index for s in seen] == [0, 1] and {s.count for s in seen} == {2}
        assert seen[0].run_dir == seen[1].run_dir and os.path.isdir(seen[0].run_dir)
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    finally:
        conf.on_exit(server)
    assert not os.path.exists(seen[0].run_dir)
