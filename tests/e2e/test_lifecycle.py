"""Lifecycle on the real system: on-demand start, operator restart, crash restarts, no orphans."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import openai
import psutil
import pytest

from bus import endpoints
from tests.conftest import ROOT, System, alive, start_system, stop_system, wait_for

pytestmark = pytest.mark.e2e
MODEL = "smollm2"


def ask(system: System, max_tokens: int = 4) -> str:
    c = openai.OpenAI(base_url=system.openai_url, api_key="x", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens)
    return r.choices[0].message.content or ""


def ready_pid(system: System, other_than: int = 0) -> int:
    def check() -> int:
        w = system.worker(MODEL)
        return w["pid"] if w["state"] == "ready" and w["pid"] != other_than else 0

    return wait_for(check, 120, f"{MODEL} READY (pid != {other_than})", interval=0.2)


def listens_on_its_unix_socket(system: System) -> bool:
    """Does the worker's llama-server listen on the unix socket in the run dir (where the worker speaks to it)?"""
    path = endpoints.llama_socket(system.run_dir, MODEL)
    backend = psutil.Process(system.worker(MODEL)["backend_pid"])
    return path is not None and any(c.laddr == path for c in backend.net_connections(kind="unix"))


def test_worker_starts_on_demand_and_restarts_on_command(system: System) -> None:
    assert system.worker(MODEL)["state"] in ("stopped", "ready")
    ask(system)
    pid = ready_pid(system)
    backend = system.worker(MODEL)["backend_pid"]
    assert backend and psutil.Process(backend).name().startswith("llama-server")
    assert listens_on_its_unix_socket(system)
    out = system.cli("restart", MODEL)
    assert out.returncode == 0, out.stderr
    new_pid = ready_pid(system, other_than=pid)
    assert new_pid != pid
    wait_for(lambda: not alive({pid, backend}), 10, "old worker and llama-server gone")
    assert ask(system) is not None


def test_killed_worker_is_restarted_and_serves_again(system: System) -> None:
    ask(system)
    w = system.worker(MODEL)
    os.kill(w["pid"], signal.SIGKILL)
    wait_for(lambda: not alive({w["backend_pid"]}), 10, "its llama-server gone with it")
    new_pid = ready_pid(system, other_than=w["pid"])
    assert system.worker(MODEL)["restarts"] >= 1
    assert new_pid and ask(system) is not None
    assert listens_on_its_unix_socket(system)  # (the dead llama-server's socket file was taken over)
    # (its llama-server's key file goes with it: they piled up in the run dir until a shutdown)
    assert not (system.run_dir / f"k-{w['pid']}.key").exists() and (system.run_dir / f"k-{new_pid}.key").exists()


def test_killed_llama_server_is_noticed_and_restarted(system: System) -> None:
    ask(system)
    w = system.worker(MODEL)
    os.kill(w["backend_pid"], signal.SIGKILL)
    # the reason is said where the operator looks (it was "worker exited with code 4"; the cause in a log)
    # (shown with the state it belongs to: it was shown for 0.1 s under "ready", before the exit was acted on)
    # (a signal is said as one: the message gave llama-server's start-up lines, as if they were the cause)
    said = wait_for(lambda: (w := system.worker(MODEL)) and "llama-server was killed by SIGKILL unexpectedly" in
                    w["message"] and w, 10, "the reason in the worker's state", interval=0.01)
    assert said["state"] == "backoff" and "restarting" in said["message"], said
    assert "out-of-memory" in said["message"] and "|" not in said["message"], said
    ready_pid(system, other_than=w["pid"])
    assert ask(system) is not None


def test_stop_and_start_commands(system: System) -> None:
    ask(system)
    out = system.cli("stop", MODEL)
    assert out.returncode == 0, out.stderr
    assert system.worker(MODEL)["state"] == "stopped"
    out = system.cli("stop", MODEL)  # idempotent
    assert out.returncode == 0, out.stderr
    out = system.cli("start", MODEL)
    assert out.returncode == 0
    ready_pid(system)
    unknown = system.cli("restart", "no-such-model")
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    empty = system.cli("start", "")  # (started the default model, said "starting ")
    assert empty.returncode == 1 and "a model name is required" in empty.stderr, empty


def test_a_stop_ends_a_request_under_way_with_an_error_and_the_model_stays_stopped(system: System) -> None:
    """A non-streamed request llama-server was answering was sent again after the stop: the model loaded again
    for it and the client got a 200 (the README: requests under way end with an error)."""
    import concurrent.futures

    import httpx

    ask(system)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, system.openai_url + "/chat/completions", json=body, timeout=120)
        # (under way: 1500 tokens take 9 s on a fast host, 30 s on a slow one)
        wait_for(lambda: system.worker(MODEL)["leases"] > 0 or answer.done(), 30, "the request under way")
        time.sleep(0.5)
        assert system.cli("stop", MODEL).returncode == 0
        r = answer.result(120)
    assert r.status_code == 503 and "stopping" in r.json()["error"]["message"], r.text
    time.sleep(2)
    assert system.worker(MODEL)["state"] == "stopped", system.worker(MODEL)


def test_supervisor_kill_9_leaves_no_process_behind() -> None:
    sysm = start_system()
    try:
        ask(sysm)
        sysm.status()
        tree = {p.pid for p in sysm.descendants()}
        assert len(tree) >= 4  # two gateways, the dashboard, a worker, its llama-server
        sysm.proc.kill()
        sysm.proc.wait()
        wait_for(lambda: not alive(tree | sysm.seen_pids), 15, "every child gone after kill -9 of the supervisor")
        # its socket files are left behind: the CLI tells at once that nothing runs there (it waited 30 s for an
        # answer; `metrics` forever)
        for args in (("status",), ("metrics", "--count", "1")):
            out = sysm.cli(*args, timeout=10)
            assert out.returncode == 1 and "no running instance" in out.stderr, out
    finally:
        if sysm.proc.poll() is None:
            stop_system(sysm)


def test_sigterm_shuts_down_cleanly_with_no_orphans() -> None:
    sysm = start_system()
    ask(sysm)
    sysm.status()
    tree = {p.pid for p in sysm.descendants()} | sysm.seen_pids
    assert list(sysm.run_dir.glob("*.sock"))
    assert stop_system(sysm) == 0
    wait_for(lambda: not alive(tree), 10, "no process of the instance left")
    assert not list(sysm.run_dir.glob("*.sock"))  # its socket files went with it


def test_a_shutdown_cuts_what_outlasts_its_grace_with_an_error_in_each_protocol(tmp_path) -> None:
    """Streams get their grace, then an error line / event; a request queued behind them a 503 in its shape (the
    streams ended without either, "incomplete chunked read"; the queued request got no answer at all)."""
    import concurrent.futures

    import httpx

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["limits"]["shutdown_grace_s"] = 3
    models = json.loads((ROOT / "config" / "models_config.json").read_text())
    models["models"][MODEL]["parameters"]["parallel"] = 1
    (cfg / "app_config.json").write_text(json.dumps(app))
    (cfg / "models_config.json").write_text(json.dumps(models))
    sysm = start_system(cfg)
    try:
        ask(sysm)

        import threading

        flowing = threading.Event()

        def ollama_stream() -> list[dict]:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                    "options": {"num_predict": 100000, "temperature": 0}}  # (greedy: 1500+ tokens, no early end)
            lines = []
            with httpx.stream("POST", sysm.ollama_url + "/api/chat", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(json.loads(line))
                        flowing.set()
            return lines

        def openai_queued() -> httpx.Response:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            return httpx.post(sysm.openai_url + "/chat/completions", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            stream = pool.submit(ollama_stream)
            assert flowing.wait(20), "the stream under way"
            queued = pool.submit(openai_queued)
            time.sleep(1)  # (queued at the worker behind the stream: one slot)
            t0 = time.monotonic()
            sysm.proc.send_signal(signal.SIGINT)
            lines, answer = stream.result(30), queued.result(30)
            waited = time.monotonic() - t0
        assert "shutting down" in lines[-1].get("error", ""), lines[-3:]
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"], answer.text
        assert waited < 3 + 1, waited
        assert sysm.proc.wait(30) == 0
    finally:
        if sysm.proc.poll() is None:
            stop_system(sysm)


def test_a_request_waiting_for_room_to_load_gets_a_503_at_a_shutdown(tmp_path) -> None:
    """One model loaded and busy, room for one: a request for another waits for room; at a stop it got no answer
    (the connection dropped: "Server disconnected without sending a response")."""
    import concurrent.futures
    import threading

    import httpx

    from tests.e2e.test_faults import A, B, two_model_config

    sysm = start_system(two_model_config(max_loaded_models=1, shutdown_grace_s=3))
    try:
        flowing = threading.Event()

        def busy() -> None:
            body = {"model": A, "prompt": "Tell a long story.", "options": {"num_predict": 100000, "temperature": 0}}
            with httpx.stream("POST", sysm.ollama_url + "/api/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        flowing.set()

        def waiting(url: str, body: dict) -> httpx.Response:
            return httpx.post(url, json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pool.submit(busy)
            assert flowing.wait(60), "A streaming"
            ollama = pool.submit(waiting, sysm.ollama_url + "/api/generate",
                                 {"model": B, "prompt": "Hi", "stream": False})
            openai_ = pool.submit(waiting, sysm.openai_url + "/chat/completions",
                                  {"model": B, "messages": [{"role": "user", "content": "Hi"}]})
            time.sleep(1.5)  # (both wait for room: A is busy)
            assert not ollama.done() and not openai_.done()
            sysm.proc.send_signal(signal.SIGINT)
            o, a = ollama.result(30), openai_.result(30)
        assert o.status_code == 503 and "shutting down" in o.json()["error"], o.text
        assert a.status_code == 503 and "shutting down" in a.json()["error"]["message"], a.text
        assert sysm.proc.wait(30) == 0
    finally:
        if sysm.proc.poll() is None:
            stop_system(sysm)


def test_a_request_waiting_for_a_model_gets_a_503_when_the_supervisor_is_killed(tmp_path) -> None:
    """kill -9 of the supervisor: a request waiting for room to load its model got no answer at all (its
    connection cut when the gateway stopped: "Server disconnected without sending a response")."""
    import concurrent.futures
    import threading

    import httpx

    from tests.e2e.test_faults import A, B, two_model_config

    sysm = start_system(two_model_config(max_loaded_models=1, shutdown_grace_s=3))
    try:
        flowing = threading.Event()

        def busy() -> None:
            body = {"model": A, "prompt": "Tell a long story.", "options": {"num_predict": 100000, "temperature": 0}}
            with contextlib.suppress(httpx.HTTPError), \
                    httpx.stream("POST", sysm.ollama_url + "/api/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        flowing.set()

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pool.submit(busy)
            assert flowing.wait(60), "A streaming"
            ollama = pool.submit(httpx.post, sysm.ollama_url + "/api/generate",
                                 json={"model": B, "prompt": "Hi", "stream": False}, timeout=60)
            openai_ = pool.submit(httpx.post, sysm.openai_url + "/chat/completions",
                                  json={"model": B, "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
            time.sleep(1.5)  # (both wait for room: A is busy)
            assert not ollama.done() and not openai_.done()
            sysm.proc.kill()
            o, a = ollama.result(30), openai_.result(30)
        assert o.status_code == 503 and "shutting down" in o.json()["error"], o.text
        assert a.status_code == 503 and "shutting down" in a.json()["error"]["message"], a.text
    finally:
        if sysm.proc.poll() is None:
            stop_system(sysm)
        wait_for(lambda: not alive(sysm.seen_pids), 15, "no process of the instance left")


def test_a_stop_refuses_the_requests_waiting_for_room_to_load_that_model(tmp_path) -> None:
    """A request waiting for room to load B; `stop B`: it said "stopped", then B loaded anyway for the request once
    room was made, and stayed (the README: queued requests end with a 503, the model stays stopped)."""
    import concurrent.futures
    import threading

    import httpx

    from tests.e2e.test_faults import A, B, two_model_config

    sysm = start_system(two_model_config(max_loaded_models=1))
    try:
        flowing = threading.Event()
        body = {"model": A, "prompt": "Tell a long story.", "options": {"num_predict": 400, "temperature": 0},
                "stream": True}

        def busy() -> None:
            with httpx.stream("POST", sysm.ollama_url + "/api/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        flowing.set()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(busy)
            assert flowing.wait(60), "A streaming"
            waiting = pool.submit(httpx.post, sysm.ollama_url + "/api/generate",
                                  json={"model": B, "prompt": "Hi", "stream": False}, timeout=60)
            time.sleep(0.5)
            assert not waiting.done()
            assert sysm.cli("stop", B).returncode == 0
            r = waiting.result(30)
            first.result(60)
        assert r.status_code == 503 and "stopped" in r.json()["error"], r.text
        time.sleep(1)
        assert sysm.worker(B)["state"] == "stopped", sysm.worker(B)
    finally:
        stop_system(sysm)


def test_a_dashboard_page_left_open_does_not_hold_up_a_shutdown() -> None:
    """The live event stream and a log tail never end by themselves: a stop ends them (it waited for them until
    the supervisor killed the dashboard after its grace, and a dashboard orphaned by a supervisor killed -9
    stayed alive as long as the page)."""
    import httpx

    sysm = start_system()
    base = f"http://127.0.0.1:{sysm.dashboard_port}"
    try:
        with httpx.Client(timeout=30) as c, c.stream("GET", base + "/api/events") as live, \
                c.stream("GET", base + "/api/logs/smollm2") as tail:
            assert live.status_code == 200 and tail.status_code == 200
            next(live.iter_lines())
            tree = {p.pid for p in sysm.descendants()} | sysm.seen_pids
            t0 = time.monotonic()
            assert stop_system(sysm) == 0
            took = time.monotonic() - t0
    finally:
        if sysm.proc.poll() is None:
            stop_system(sysm)
    wait_for(lambda: not alive(tree), 10, "no process of the instance left")
    assert took < 4, f"shutdown took {took:.1f}s with a page open"
    assert "kill_after_grace" not in sysm.logs()


def test_config_error_names_file_and_key(tmp_path) -> None:
    (tmp_path / "app_config.json").write_text(json.dumps({"proxies": {"ollama": {"port": "11434"}}}))
    (tmp_path / "models_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert "app_config.json" in out.stderr and "$.proxies.ollama.port" in out.stderr


def test_cli_without_instance_says_so(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1 and "no running instance" in out.stderr


def test_cli_with_sockets_left_by_a_gone_instance_says_so_at_once(tmp_path) -> None:
    """An instance gone without its pid file left its socket files: the CLI waited 30 s for an answer."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / endpoints.CONTROL_SOCK))  # (a socket file nobody listens on)
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1 and "no running instance" in out.stderr and time.monotonic() - t < 10


def test_cli_finds_the_instance_a_broken_config_names(system: System, tmp_path) -> None:
    """`reload --config-dir D` after an edit that broke D: the instance D's run_dir names is still found (it said
    "no running instance in /tmp/llama-runner-0", the default), and the config error is said."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text(json.dumps({"run_dir": str(system.run_dir), "limits": {"queue_size": "x"}}))
    (cfg / "models_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config-dir", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and MODEL in out.stdout, out
    (cfg / "app_config.json").write_text(json.dumps({"run_dir": str(tmp_path / "none"), "limits": {"queue_size": "x"}}))
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config-dir", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "no running instance" in out.stderr and "queue_size" in out.stderr, out


def test_up_refuses_a_host_that_names_nothing(tmp_path) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text(json.dumps({"host": "not a host!"}))
    (cfg / "models_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config-dir", str(cfg), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "host 'not a host!'" in out.stderr, out


def test_cli_refuses_bad_numbers_at_once(tmp_path) -> None:
    for args, said in ((("up", "--ollama-port", "89071"), "is not a port"), (("up", "--dashboard-port", "-1"), "port"),
                       (("metrics", "--count", "-1"), "0 or more"), (("status", "--timeout", "0"), "more than 0")):
        out = subprocess.run([sys.executable, "-m", "supervisor", *args, "--run-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 2 and said in out.stderr, (args, out)


def test_cli_output_into_a_closed_pipe_is_no_traceback(system: System) -> None:
    """`llama-runner status | head -1` printed a BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "--run-dir", str(system.run_dir)],
                             stdout=w, stderr=subprocess.PIPE, text=True, timeout=30, cwd=ROOT)
    finally:
        os.close(w)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_a_taken_port_is_reported_and_retried() -> None:
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    sysm = start_system(ollama_port=port, wait=False)
    try:
        def reported() -> bool:
            try:
                procs = {p["name"]: p for p in sysm.status()["processes"]}
            except AssertionError:  # not up yet
                return False
            gw = procs.get("gateway-ollama", {})
            return gw.get("state") == "backoff"

        wait_for(reported, 30, "the ollama gateway in backoff", interval=0.2)
        logs = (sysm.logs_dir / "supervisor.log").read_text()
        assert "cannot_listen" in logs and f":{port} (in use by another program?" in logs
        oai = openai.OpenAI(base_url=sysm.openai_url, api_key="x", max_retries=0)
        wait_for(lambda: _answers(oai.models), 30, "the other gateway serving")
        blocker.close()  # the port frees up: the gateway gets it on its next try
        wait_for(lambda: next(p for p in sysm.status()["processes"] if p["name"] == "gateway-ollama")["state"]
                 == "running", 60, "the ollama gateway running", interval=0.3)
        import ollama

        wait_for(lambda: _answers(ollama.Client(sysm.ollama_url)), 30, "the ollama gateway answering")
    finally:
        blocker.close()
        stop_system(sysm)


def _answers(client: object) -> bool:
    try:
        client.list()  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def test_the_dashboards_unload_leaves_a_busy_model_alone_by_any_of_its_names(system: System) -> None:
    """The busy check looked the name up as given: an alias matched nothing and the unload cut the stream off."""
    import concurrent.futures

    import httpx

    ask(system)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500,
            "ignore_eos": True}
    dash = f"http://127.0.0.1:{system.dashboard_port}/api/workers"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, system.openai_url + "/chat/completions", json=body, timeout=120)
        wait_for(lambda: system.worker(MODEL)["leases"] > 0 or answer.done(), 30, "the request under way")
        for name in ("smollm2-135m-instruct", "smollm2:latest", MODEL):  # (an alias, a tag, the name)
            r = httpx.post(f"{dash}/{name}/unload", timeout=30)
            assert r.status_code == 409 and "serving" in r.json()["message"], (name, r.text)
        assert not answer.done()
        assert system.cli("stop", MODEL).returncode == 0
        assert answer.result(120).status_code == 503
    r = httpx.post(f"{dash}/{MODEL}/unload", timeout=30)
    assert r.status_code == 200, r.text


def test_a_worker_that_stops_takes_its_job_socket_file_with_it(system: System) -> None:
    """libzmq leaves an ipc socket's file behind: every worker process that stopped left its w-...-PID.sock in the
    run dir (a new start of the model swept only the files of dead pids)."""
    ask(system)
    pid = system.worker(MODEL)["pid"]
    assert pid in {p for _, p in endpoints.worker_sockets(system.run_dir, MODEL)}
    assert system.cli("stop", MODEL).returncode == 0
    wait_for(lambda: system.worker(MODEL)["state"] == "stopped", 30, "stopped")
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the worker gone")
    assert pid not in {p for _, p in endpoints.worker_sockets(system.run_dir, MODEL)}
