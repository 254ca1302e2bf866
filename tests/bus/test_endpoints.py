from bus import endpoints


def test_topics_never_prefix_match_other_names() -> None:
    a = endpoints.topic_worker_metrics("a")
    ab = endpoints.topic_worker_metrics("ab")
    assert not ab.startswith(a)
    assert endpoints.topic_worker_state("a/b").count("/") == endpoints.topic_worker_state("ab").count("/")


def test_worker_endpoint_never_contains_the_model_name(tmp_path) -> None:
    ep = endpoints.worker(tmp_path, "../../etc/passwd", 7)
    assert ep.startswith(f"ipc://{tmp_path}/w-") and "passwd" not in ep and ".." not in ep.removeprefix(
        f"ipc://{tmp_path}")


def test_every_worker_process_has_its_own_address_and_its_socket_names_its_pid(tmp_path) -> None:
    """A job queued for a dead worker must not reach its replacement (same address: ZeroMQ delivered it)."""
    import os
    import subprocess

    assert endpoints.worker(tmp_path, "m", 1) != endpoints.worker(tmp_path, "m", 2)
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = tmp_path / endpoints.worker(tmp_path, "m", os.getpid()).rpartition("/")[2]
    dead = tmp_path / endpoints.worker(tmp_path, "m", gone.pid).rpartition("/")[2]
    other = tmp_path / endpoints.worker(tmp_path, "other", gone.pid).rpartition("/")[2]
    for p in (mine, dead, other):
        p.touch()
    assert sorted(endpoints.worker_sockets(tmp_path, "m")) == sorted([(mine, os.getpid()), (dead, gone.pid)])


def test_prepare_run_dir_is_private(tmp_path) -> None:
    d = endpoints.prepare_run_dir(tmp_path / "run")
    assert d.stat().st_mode & 0o777 == 0o700


def test_prepare_run_dir_narrows_wider_permissions(tmp_path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    assert endpoints.prepare_run_dir(d).stat().st_mode & 0o777 == 0o700


def test_prepare_run_dir_refuses_a_dir_of_another_user(tmp_path, monkeypatch) -> None:
    import os

    import pytest

    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: d.stat().st_uid + 1)
    with pytest.raises(endpoints.RunDirError, match="another user"):
        endpoints.prepare_run_dir(d)


def test_prepare_run_dir_refuses_a_file(tmp_path) -> None:
    import pytest

    (tmp_path / "run").write_text("x")
    with pytest.raises(endpoints.RunDirError, match="not a directory"):
        endpoints.prepare_run_dir(tmp_path / "run")


def test_llama_socket_is_hashed_and_short_enough_or_none(tmp_path) -> None:
    path = endpoints.llama_socket(tmp_path, "../../etc/passwd")
    assert path is not None and path.startswith(f"{tmp_path}/l-") and path.endswith(".sock")
    assert "passwd" not in path
    assert endpoints.llama_socket(tmp_path, "a") != endpoints.llama_socket(tmp_path, "b")
    deep = tmp_path / ("d" * (endpoints.UNIX_PATH_MAX - len(str(tmp_path))))
    assert endpoints.llama_socket(deep, "a") is None  # too long for a unix socket: the worker speaks TCP
