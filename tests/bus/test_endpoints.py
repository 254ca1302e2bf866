from bus import endpoints


def test_topics_never_prefix_match_other_names() -> None:
    a = endpoints.topic_worker_metrics("a")
    ab = endpoints.topic_worker_metrics("ab")
    assert not ab.startswith(a)
    assert endpoints.topic_worker_state("a/b").count("/") == endpoints.topic_worker_state("ab").count("/")


def test_worker_endpoint_never_contains_the_model_name(tmp_path) -> None:
    ep = endpoints.worker(tmp_path, "../../etc/passwd")
    assert ep.startswith(f"ipc://{tmp_path}/w-") and "passwd" not in ep and ".." not in ep.removeprefix(
        f"ipc://{tmp_path}")


def test_prepare_run_dir_is_private(tmp_path) -> None:
    d = endpoints.prepare_run_dir(tmp_path / "run")
    assert d.stat().st_mode & 0o777 == 0o700
