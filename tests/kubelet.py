"""The containers of a rendered Deployment, run on Docker the way the kubelet runs them.

Not a cluster: no scheduler, no kube-proxy. What the kubelet itself does to a container is done here, from
the manifest: the image's entrypoint replaced by `command` and its CMD by `args`, the env, the securityContext
(user and group, read-only root, dropped capabilities, no privilege escalation), the memory and CPU limits,
emptyDir volumes, and the startup, readiness and liveness probes run against the pod's IP on their declared
schedule (period, timeout, thresholds). Stopping follows the kubelet too: preStop, then SIGTERM, then SIGKILL
when the grace period is over. A Service's name becomes a network alias on the pod network, so Docker's DNS
answers it with every pod's address, as a headless Service does.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import requests

from engine import address, inspect, run


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(text)).groups()
    return int(float(number) * units.get(unit, 1))


def quantity_cpus(text: str) -> float:
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass
class ProbeRecord:
    kind: str  # startup, readiness, liveness
    at: float  # seconds since the container started
    ok: bool
    detail: str


@dataclass
class PodContainer:
    """One container of one pod replica, and its kubelet-style life."""

    name: str  # the Docker container name
    spec: dict  # the container as the manifest declares it
    pod_spec: dict
    network: str
    aliases: list[str]
    image: str  # what the pod's image is loaded as here (kind-load's job)
    records: list[ProbeRecord] = field(default_factory=list)
    started_at: float = 0.0
    started: bool = False  # the startupProbe has succeeded (or there is none)
    ready: bool = False
    ready_at: float | None = None
    liveness_failed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _prober: threading.Thread | None = None

    # ---- start ----------------------------------------------------------------------------------------

    def docker_run_command(self) -> list[str]:
        spec, pod = self.spec, self.pod_spec
        security = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
        command = ["docker", "run", "-d", "--name", self.name, "--network", self.network]
        for alias in self.aliases:
            command += ["--network-alias", alias]
        user = security.get("runAsUser")
        if security.get("runAsNonRoot"):
            assert user not in (None, 0), f"{spec['name']}: runAsNonRoot needs a numeric non-root runAsUser"
        if user is not None:
            command += ["--user", f"{user}:{security.get('runAsGroup', user)}"]
        if security.get("readOnlyRootFilesystem"):
            command.append("--read-only")
        for capability in security.get("capabilities", {}).get("drop", []):
            command += ["--cap-drop", capability]
        for capability in security.get("capabilities", {}).get("add", []):
            command += ["--cap-add", capability]
        if security.get("allowPrivilegeEscalation") is False:
            command += ["--security-opt", "no-new-privileges"]
        if security.get("seccompProfile", {}).get("type") not in (None, "RuntimeDefault"):
            raise AssertionError(f"{spec['name']}: only the runtime's default seccomp profile is run here")
        limits = spec.get("resources", {}).get("limits", {})
        requests_ = spec.get("resources", {}).get("requests", {})
        if "memory" in limits:
            command += ["--memory", str(quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            command += ["--cpus", str(quantity_cpus(limits["cpu"]))]
        if "cpu" in requests_:
            command += ["--cpu-shares", str(max(2, int(quantity_cpus(requests_["cpu"]) * 1024)))]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for mount in spec.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume, f"only emptyDir volumes are run here, not {volume}"
            size = volume["emptyDir"].get("sizeLimit")
            options = "mode=1777" + (f",size={quantity_bytes(size)}" if size else "")
            command += ["--tmpfs", f"{mount['mountPath']}:{options}"]
        for variable in spec.get("env", []):
            assert "value" in variable, f"only literal env values are run here, not {variable}"
            command += ["--env", f"{variable['name']}={variable['value']}"]
        # Kubernetes: `command` replaces the image's ENTRYPOINT and `args` its CMD.
        entrypoint = spec.get("command")
        if entrypoint:
            command += ["--entrypoint", entrypoint[0], self.image, *entrypoint[1:], *spec.get("args", [])]
        else:
            command += [self.image, *spec.get("args", [])]
        return command

    def start(self) -> None:
        run(self.docker_run_command(), timeout=60)
        self.started_at = time.monotonic()
        self._stop.clear()
        self._prober = threading.Thread(target=self._probe_loop, name=f"probes-{self.name}", daemon=True)
        self._prober.start()

    @property
    def ip(self) -> str:
        return address(self.name, self.network)

    def port(self, name_or_number) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        (port,) = [p["containerPort"] for p in self.spec.get("ports", []) if p.get("name") == name_or_number]
        return port

    # ---- probes ---------------------------------------------------------------------------------------

    def _probe_once(self, probe: dict) -> tuple[bool, str]:
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{self.ip}:{self.port(get['port'])}{get.get('path', '/')}"
            try:
                response = requests.get(url, timeout=timeout)
            except requests.RequestException as error:
                return False, f"GET {get.get('path', '/')}: {type(error).__name__}"
            # The kubelet counts 200-399 as success.
            return 200 <= response.status_code < 400, f"GET {get.get('path', '/')}: {response.status_code}"
        if "tcpSocket" in probe:
            port = self.port(probe["tcpSocket"]["port"])
            try:
                socket.create_connection((self.ip, port), timeout=timeout).close()
                return True, f"tcp {port}: open"
            except OSError as error:
                return False, f"tcp {port}: {error}"
        if "exec" in probe:
            try:
                result = subprocess.run(
                    ["docker", "exec", self.name, *probe["exec"]["command"]], capture_output=True, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                return False, "exec: timed out"
            return result.returncode == 0, f"exec: exit {result.returncode}"
        raise AssertionError(f"probe kind not run here: {probe}")

    def _probe_loop(self) -> None:
        spec = self.spec
        startup, readiness, liveness = (spec.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe"))
        now = time.monotonic
        due = {}
        if startup:
            due["startup"] = self.started_at + startup.get("initialDelaySeconds", 0)
        else:
            self.started = True
        streaks = {"startup": [0, 0], "readiness": [0, 0], "liveness": [0, 0]}  # successes, failures in a row
        while not self._stop.is_set():
            if self.started:
                for kind, probe in (("readiness", readiness), ("liveness", liveness)):
                    if probe and kind not in due:
                        due[kind] = now() + (0 if startup else probe.get("initialDelaySeconds", 0))
                if not readiness:
                    self.ready = True
            for kind, at in list(due.items()):
                if now() < at or self._stop.is_set():
                    continue
                probe = {"startup": startup, "readiness": readiness, "liveness": liveness}[kind]
                ok, detail = self._probe_once(probe)
                self.records.append(ProbeRecord(kind, round(now() - self.started_at, 2), ok, detail))
                streak = streaks[kind]
                streak[0], streak[1] = (streak[0] + 1, 0) if ok else (0, streak[1] + 1)
                due[kind] = now() + probe.get("periodSeconds", 10)
                failure_threshold = probe.get("failureThreshold", 3)
                if kind == "startup":
                    if ok:
                        self.started = True
                        del due["startup"]
                    elif streak[1] >= failure_threshold:
                        self.liveness_failed = True  # the kubelet would restart the container
                        del due["startup"]
                elif kind == "readiness":
                    if ok and streak[0] >= probe.get("successThreshold", 1):
                        if not self.ready:
                            self.ready_at = now() - self.started_at
                        self.ready = True
                    elif not ok and streak[1] >= failure_threshold:
                        self.ready = False
                elif not ok and streak[1] >= failure_threshold:
                    self.liveness_failed = True
            self._stop.wait(0.05)

    def startup_budget(self) -> float:
        """The longest the kubelet lets this container take to start and become Ready."""
        startup, readiness = self.spec.get("startupProbe"), self.spec.get("readinessProbe") or {}
        budget = 0.0
        if startup:
            budget += startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
                "failureThreshold", 3
            )
        budget += readiness.get("initialDelaySeconds", 0) + readiness.get("periodSeconds", 10) * readiness.get(
            "successThreshold", 1
        )
        return budget

    def wait_ready(self) -> float:
        """Seconds to Ready; fails if it took longer than the probes allow or the container died."""
        budget = self.startup_budget()
        while not self.ready:
            state = inspect(self.name)["State"]
            elapsed = time.monotonic() - self.started_at
            if self.liveness_failed or not state["Running"] or elapsed > budget + 5:
                raise AssertionError(
                    f"{self.name} not Ready after {elapsed:.0f} s (budget {budget:.0f} s, running {state['Running']}, "
                    f"exit {state['ExitCode']}); probes: {self.records[-5:]}\n{self.logs()}"
                )
            time.sleep(0.1)
        return self.ready_at

    def probe_failures(self, kind: str, since: float = 0.0) -> list[ProbeRecord]:
        return [r for r in self.records if r.kind == kind and not r.ok and r.at >= since]

    def seconds(self) -> float:
        return time.monotonic() - self.started_at

    # ---- stop -----------------------------------------------------------------------------------------

    def terminate(self, on_sigterm=None) -> dict:
        """preStop, SIGTERM, SIGKILL after terminationGracePeriodSeconds: how it went."""
        grace = self.pod_spec.get("terminationGracePeriodSeconds", 30)
        started = time.monotonic()
        pre_stop = self.spec.get("lifecycle", {}).get("preStop", {})
        if "exec" in pre_stop:
            subprocess.run(["docker", "exec", self.name, *pre_stop["exec"]["command"]], timeout=grace, check=False)
        elif pre_stop:
            raise AssertionError(f"preStop kind not run here: {pre_stop}")
        if on_sigterm:
            on_sigterm()
        sigterm_at = time.monotonic() - started
        run(["docker", "kill", "--signal", "TERM", self.name], check=False)
        killed = False
        while inspect(self.name)["State"]["Running"]:
            if time.monotonic() - started > grace:
                run(["docker", "kill", "--signal", "KILL", self.name], check=False)
                killed = True
                break
            time.sleep(0.1)
        self._stop.set()
        state = inspect(self.name)["State"]
        return {
            "sigterm_after_s": round(sigterm_at, 1),
            "exited_after_s": round(time.monotonic() - started, 1),
            "sigkill": killed,
            "exit_code": state["ExitCode"],
        }

    def stop_probing(self) -> None:
        self._stop.set()

    def logs(self, lines: int = 40) -> str:
        result = run(["docker", "logs", "--tail", str(lines), self.name], check=False)
        return result.stdout + result.stderr
