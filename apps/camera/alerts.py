"""Alerts: when an answer matches, run a command and/or POST a webhook, at most once per cool-down.

Side effects never block the camera loop: the command is started and reaped later, the
webhook is posted by a worker thread from a small bounded queue (a dead server costs
dropped alerts, not a stalled or ever-growing pipeline).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import urllib.request

from edge_vlm.errors import EdgeVLMError


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (tests, embedding): inherit instead
        return None


class AlertRule:
    """When an answer raises an alert.

    Free text: `yes` / `no` means the answer starts with that word (for yes/no questions), anything
    else is a regex. Structured answers (`structured` = "choice" or "json", from --choices /
    --json-schema) match the parsed value instead of guessing from text: a choice equals the pattern
    (case-insensitive); a JSON answer matches `KEY=VALUE` when that field (dots for nested keys) has
    that value (compared as JSON: `count=2`, `label=person`, `seen=true`), or else the pattern as a
    regex over the compact JSON text.
    """

    def __init__(self, pattern: str, structured: str | None = None):
        self.pattern, self.structured = pattern, structured
        word = pattern.strip().lower()
        self.yes_no = word if word in ("yes", "no") and structured is None else None
        self.field = None
        if structured == "json" and re.fullmatch(r"[\w.]+=.*", pattern.strip()):
            key, value = pattern.strip().split("=", 1)
            self.field = (key.split("."), value)
        elif structured is None or structured == "json":
            try:
                self.regex = re.compile(pattern, re.IGNORECASE)
            except re.error as e:
                raise EdgeVLMError(f"--alert {pattern!r} is not a valid regular expression: {e}") from None

    def matches(self, answer: str, value=None) -> bool:
        if self.structured == "choice":
            return value is not None and str(value).lower() == self.pattern.strip().lower()
        if self.structured == "json":
            if value is None:  # cut short or unparsable: nothing to decide on
                return False
            if self.field is not None:
                return _field_equals(value, *self.field)
            return self.regex.search(json.dumps(value, separators=(",", ":"))) is not None
        if self.yes_no:
            first = re.match(r"\W*(\w+)", answer)
            return bool(first) and first.group(1).lower() == self.yes_no
        return self.regex.search(answer) is not None


def _field_equals(value, path: list[str], want: str) -> bool:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    try:
        return value == json.loads(want)
    except json.JSONDecodeError:  # a bare word: compare with the field's text
        return isinstance(value, str) and value.lower() == want.lower()


class Alerter:
    """Fires the actions for matching answers, then stays quiet for `cooldown` seconds of stream time."""

    def __init__(self, rule: AlertRule, cooldown: float = 60.0, command: str | None = None,
                 webhook: str | None = None, webhook_timeout: float = 5.0, log=None):
        self.rule, self.cooldown = rule, cooldown
        self.command = shlex.split(command) if command else None
        self.webhook, self.webhook_timeout = webhook, webhook_timeout
        self.log = log or (lambda msg: print(f"edge-vlm camera: {msg}", file=sys.stderr))
        self.last_fired: float | None = None
        self.fired = 0
        self._children: list[subprocess.Popen] = []
        self._posts: queue.Queue = queue.Queue(maxsize=16)
        self._worker: threading.Thread | None = None
        if webhook:
            if not re.match(r"https?://", webhook):
                raise EdgeVLMError(f"--webhook must be an http:// or https:// URL, got {webhook!r}")
            self._worker = threading.Thread(target=self._post_loop, name="edge-vlm-webhook", daemon=True)
            self._worker.start()

    def maybe_fire(self, record: dict, now: float) -> bool:
        """True if `record` (a JSON-line dict with an 'answer') raised an alert now."""
        if not self.rule.matches(record["answer"], record.get("value")):
            return False
        if self.last_fired is not None and now - self.last_fired < self.cooldown:
            return False
        self.last_fired = now
        self.fired += 1
        self._reap()
        if self.command:
            env = dict(os.environ, EDGE_VLM_PROMPT=record["prompt"], EDGE_VLM_ANSWER=record["answer"],
                       EDGE_VLM_FRAME=str(record["frame"]), EDGE_VLM_TIMESTAMP=record["timestamp"])
            try:  # stdout goes to stderr: our stdout is the JSON-lines stream
                self._children.append(subprocess.Popen(self.command, env=env, stdout=_stderr_fd()))
            except OSError as e:
                self.log(f"alert command failed to start: {e}")
        if self._worker:
            try:
                self._posts.put_nowait(dict(record, alert=True))  # a copy: the caller goes on editing its own
            except queue.Full:
                self.log("webhook is not keeping up: alert dropped")
        return True

    def _reap(self) -> None:
        self._children = [p for p in self._children if p.poll() is None]

    def _post_loop(self) -> None:
        while True:
            record = self._posts.get()
            if record is None:
                return
            try:
                req = urllib.request.Request(self.webhook, data=json.dumps(record).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.webhook_timeout) as resp:
                    resp.read()
            except Exception as e:  # noqa: BLE001 - a failed post must never kill the pipeline
                self.log(f"webhook {self.webhook} failed: {e}")

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued and wait for running commands, for at most about `timeout` seconds."""
        if self._worker:
            try:
                self._posts.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._worker.join(timeout)
            self._worker = None
        for p in self._children:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.log(f"alert command {self.command[0]} still running at exit; leaving it")
        self._children.clear()
