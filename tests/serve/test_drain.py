"""`python -m instructor_jax.serve.command` as its own process: start-up log, SIGTERM while requests are in
flight (every accepted one answered, new ones refused), exit 0."""

import concurrent.futures
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np


def _start(directory, *flags):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "instructor_jax.serve.command", "--model", str(directory),
                                "--port", "0", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    return process, lines


def _wait_for_line(lines, pattern, log, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(log)}")


def test_sigterm_answers_what_was_accepted_refuses_the_rest_and_exits_0(relu_reference, relu_instructor):
    # A long max_wait: the requests sit in the queue while the signal arrives.
    process, lines = _start(relu_reference[0], "--max_batch_tokens", "256", "--max_wait_ms", "1500",
                            "--served_model_name", "relu")
    log = []
    try:
        url = _wait_for_line(lines, r"ready at (http://127\.0\.0\.1:\d+)", log).group(1)
        assert any("serving relu at http://127.0.0.1:" in line and "pooling rule sentence-transformers" in line
                   for line in log)
        texts = [f"request number {k}" for k in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(httpx.post, f"{url}/embed", json={"inputs": t}, timeout=60) for t in texts]
            deadline = time.monotonic() + 30
            while "instructor_jax_in_flight_inputs 6.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            _wait_for_line(lines, "draining", log)
            try:
                late = httpx.post(f"{url}/embed", json={"inputs": "too late"}, timeout=30).status_code
            except httpx.TransportError:
                late = "refused"  # the queue drained first and the server had gone
            answers = [p.result() for p in pending]
        assert late in (503, "refused")
        assert [a.status_code for a in answers] == [200] * 6
        expected = relu_instructor.encode(texts, instruction="")
        np.testing.assert_allclose([a.json()[0] for a in answers], expected, atol=1e-6, rtol=0)
        assert process.wait(timeout=60) == 0
        _wait_for_line(lines, "drained: every accepted request was answered", log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
